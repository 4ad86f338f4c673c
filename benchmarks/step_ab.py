"""dtrain's step against a plain FSDP2 step, alternating in one process (benchmarks/train_throughput.py
runs it under torchrun). This machine's speed drifts by a quarter within a minute, more than the
difference being measured between separate runs; blocks of steps taken in turn on the same model
see the same machine. dtrain's side is what its loop does per step outside log, eval and save
steps (``train_step``, the save poll, the step boundary); the plain side makes the examples inline,
steps forward, backward, ``clip_grad_norm_`` and the same fused AdamW. Prints the median of the
per-round ratios (dtrain's samples/s over the plain step's) as JSON on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

from dtrain.config import ExperimentConfig
from dtrain.data import make_examples, train_streams
from dtrain.dist import init_distributed
from dtrain.metrics import squared_error
from dtrain.preempt import StopRequest
from dtrain.rundir import RunDirectory
from dtrain.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--block", type=int, default=10, help="steps per block")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    ctx = init_distributed(args.device)
    config = ExperimentConfig.preset(args.preset)
    config.train.device = args.device
    train, data = config.train, config.data
    trainer = Trainer(config, ctx, RunDirectory(tempfile.mkdtemp(prefix="dtrain-ab-")))
    trainer.stop = stop = StopRequest("")
    share = train.global_batch_size // ctx.world_size

    def dtrain_step() -> None:
        trainer.train_step()
        trainer.checkpoints.poll()
        trainer._boundary(stop)

    def plain_step(step: int) -> None:
        first = (step * train.global_batch_size + ctx.rank * share) % data.train_samples
        indices = np.arange(first, first + share) % data.train_samples
        examples = make_examples(trainer.spec, data.seed, train_streams(data.mode, np.zeros_like(indices)), indices)
        loss = squared_error(trainer.model(examples["points"].to(ctx.device)), examples["targets"].to(ctx.device))
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), train.grad_clip)
        trainer.optimizer.found_inf = None
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    def timed(block) -> float:
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        started = time.perf_counter()
        block()
        trainer.sums.read(now=True)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    for _ in range(2):  # warm-up of both
        dtrain_step()
        plain_step(0)
    ratios = []
    for r in range(args.rounds):
        ours = timed(lambda: [dtrain_step() for _ in range(args.block)])
        plain = timed(lambda: [plain_step(r * args.block + i) for i in range(args.block)])
        ratios.append(plain / ours)  # samples/s ratio: time per block, inverted
    if ctx.rank == 0:
        print(json.dumps({"ratio": statistics.median(ratios), "rounds": ratios}), flush=True)
    dist.barrier()
    os._exit(0)  # no interpreter teardown: a gloo thread can abort it (docs/design.md)


if __name__ == "__main__":
    main()
