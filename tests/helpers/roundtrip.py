"""Run under torchrun. ``save RUN OUT``: train a few steps, save, dump the full state.
``load OUT RUN...``: restore each run's checkpoint on this world size and dump the full state.

The dumps hold full (unsharded) model and optimizer state dicts gathered to rank 0,
so a test can compare them exactly across world sizes.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from dtrain.config import ExperimentConfig
from dtrain.dist import init_distributed, shutdown
from dtrain.rundir import RunDirectory
from dtrain.train import exit_now
from dtrain.trainer import Trainer


def make_trainer(run_dir: str, ctx) -> Trainer:
    config = ExperimentConfig.preset("tiny")
    config.train.global_batch_size = 24  # divisible by 1, 2, 3 and 4 ranks
    return Trainer(config, ctx, RunDirectory(run_dir))


def dump(trainer: Trainer, path: str) -> None:
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model, optimizer = get_state_dict(trainer.model, trainer.optimizer, options=options)
    if dist.get_rank() == 0:
        torch.save(
            {
                "model": model,
                "optimizer": optimizer,
                "step": trainer.step,
                "samples_seen": trainer.samples_seen,
                "sampler": trainer.sampler.state_dict(),
                "schedule": trainer.schedule.state_dict(),
            },
            path,
        )


def main() -> None:
    mode, out, *runs = sys.argv[1:]
    ctx = init_distributed("cpu")
    if mode == "save":
        trainer = make_trainer(runs[0], ctx)
        for _ in range(3):
            trainer.train_step()
        trainer.save(["final"], blocking=True)
        dump(trainer, out)
    else:
        for i, run in enumerate(runs):
            trainer = make_trainer(run, ctx)
            assert trainer.restore("latest") is not None
            dump(trainer, f"{out}.{i}")
    shutdown(ctx)


if __name__ == "__main__":
    main()
    exit_now(0)  # no interpreter teardown, as dtrain.train: a gloo thread can abort it
