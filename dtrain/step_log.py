"""What the loop writes while it trains: metrics windows and each rank's log lines.

A storage failure while writing a line does not stop the rank where it happens: it is kept
and agreed on at the step boundary, so every rank stops together (docs/reliability.md). On
object stores lines are shipped in parts (dtrain/rundir.py), at checkpoints and at the end.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .errors import DtrainError
from .rundir import METRICS
from .tensorboard import TensorBoardLog


class StepLog:
    def __init__(self, run):
        self.run = run
        self.failure: DtrainError | None = None  # this rank's, until the boundary agrees on it
        self.tensorboard: TensorBoardLog | None = None  # rank 0's, with --metrics.tensorboard

    def open_tensorboard(self, directory: str, resumed_step: int) -> None:
        self.tensorboard = TensorBoardLog(self.run.url, directory, resumed_step)

    def metric(self, kind: str, record: dict) -> None:
        """A train or eval record (rank 0): a metrics.jsonl line, and TensorBoard's scalars."""
        self.write(METRICS, {"kind": kind, **record})
        if self.tensorboard is not None:
            self.tensorboard.log(kind, record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def write(self, name: str, record: dict) -> None:
        if self.failure is None:
            try:
                self.run.append_jsonl(name, record)
            except DtrainError as error:
                self.failure = error

    def ship(self) -> None:
        try:
            self.run.ship()
        except DtrainError as error:
            self.failure = self.failure or error

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure


class LossWindow:
    """The loss and throughput of the steps since the last train line; throughput counts step
    time only (uncommitted replica steps included), not evaluation or saving."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.steps, self.busy = 0, 0.0

    def add(self, loss_sum: torch.Tensor | None, seconds: float) -> None:
        self.busy += seconds
        if loss_sum is not None:  # None: a replica step that was not committed
            self.loss += loss_sum
            self.steps += 1

    def close(self, global_batch_size: int) -> tuple[float, float]:
        """Collective: the window's mean loss per sample and its samples/s; opens the next one."""
        dist.all_reduce(self.loss)
        samples = self.steps * global_batch_size
        loss, rate = self.loss.item() / samples, samples / self.busy
        self.loss.zero_()
        self.steps, self.busy = 0, 0.0
        return loss, rate
