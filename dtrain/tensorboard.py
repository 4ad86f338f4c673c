"""The run's curves as TensorBoard event files (``--metrics.tensorboard=true``), written by rank 0
beside metrics.jsonl (docs/training.md, "Curves").

A start that resumes from step S purges what an earlier start drew past S (TensorBoard's
``purge_step``): steps a resume rolled back are drawn once, as the new start trains them.
"""

from __future__ import annotations

import importlib.util
import os

from .errors import ConfigError

TRAIN_SCALARS = ("loss", "lr", "samples_per_s")


def check_tensorboard(metrics, run_url: str) -> None:
    """Before a start writes anything: the package is there, and the files have a local home."""
    if not metrics.tensorboard:
        return
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--metrics.tensorboard=true needs the tensorboard package: pip install 'dtrain[tensorboard]'")
    if not metrics.tensorboard_dir and "://" in run_url:
        raise ConfigError(
            f"--metrics.tensorboard=true on {run_url}: TensorBoard writes local files; "
            "give --metrics.tensorboard_dir=LOCAL_DIRECTORY"
        )


class TensorBoardLog:
    def __init__(self, run_url: str, directory: str, resumed_step: int):
        from torch.utils.tensorboard import SummaryWriter  # the tensorboard package: checked at admission

        self.directory = directory or os.path.join(run_url, "tensorboard")
        self.writer = SummaryWriter(self.directory, purge_step=resumed_step + 1 if resumed_step else None)

    def log(self, kind: str, record: dict) -> None:
        """A metrics.jsonl record: train lines' loss, lr and samples/s; eval lines' every score."""
        step = record["step"]
        if kind == "train":
            names = TRAIN_SCALARS
        else:
            names = [k for k, v in record.items() if k not in ("step", "samples_seen") and isinstance(v, float)]
        for name in names:
            self.writer.add_scalar(f"{kind}/{name}", record[name], step)

    def checkpoint(self, step: int, seconds: float) -> None:
        self.writer.add_scalar("checkpoint/blocked_s", seconds, step)

    def close(self) -> None:
        self.writer.close()
