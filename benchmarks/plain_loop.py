"""The reference for benchmarks/train_throughput.py: a plain FSDP2 training loop, as a PyTorch user
writes one, on dtrain's model, data and AdamW, under torchrun. No checkpoints, no logging, no
guards: the examples are made inline each step, the gradient norm clipped, AdamW stepped. Prints
the steady-state samples/s by wall-clock (the steps after the first quarter) as JSON on rank 0.

    torchrun --standalone --nproc_per_node=2 benchmarks/plain_loop.py --preset small --steps 80
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from dtrain.config import ExperimentConfig
from dtrain.data import make_examples, mixture_spec, train_streams
from dtrain.metrics import squared_error
from dtrain.model import build_model
from dtrain.parallel import resolve_precision, shard_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0)) if args.device == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = ExperimentConfig.preset(args.preset)
    train, data = config.train, config.data
    torch.manual_seed(train.seed)
    model = shard_model(
        build_model(config.model, data.dim),
        init_device_mesh(device.type, (world,)),
        resolve_precision(train.precision, device),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay, fused=True)
    spec, per_rank = mixture_spec(data), train.global_batch_size // world
    order = np.random.default_rng(data.seed).permutation(data.train_samples)
    started = None
    for step in range(args.steps):
        if step == args.steps // 4:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        first = (step * train.global_batch_size + rank * per_rank) % data.train_samples
        indices = order[np.arange(first, first + per_rank) % data.train_samples]
        examples = make_examples(spec, data.seed, train_streams(data.mode, np.zeros_like(indices)), indices)
        predicted = model(examples["points"].to(device))
        loss = squared_error(predicted, examples["targets"].to(device)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    if rank == 0:
        samples = (args.steps - args.steps // 4) * train.global_batch_size
        print(json.dumps({"samples_per_s": samples / elapsed}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # no interpreter teardown: a gloo thread can abort it (docs/design.md)


if __name__ == "__main__":
    main()
