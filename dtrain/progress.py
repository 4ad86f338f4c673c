"""Rank-0 progress: a bar on a terminal, plain periodic lines in a log file."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, total_steps: int, first_step: int, enabled: bool):
        self.enabled = enabled
        self.interactive = enabled and sys.stderr.isatty()
        self.bar = tqdm(
            total=total_steps, initial=first_step, unit="step", dynamic_ncols=True, disable=not self.interactive
        )
        self.total_steps = total_steps

    def step(self, record: dict | None) -> None:
        """One step done; ``record`` is the metrics line when one was logged."""
        if self.interactive:
            self.bar.update(1)
            if record:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        elif self.enabled and record:
            print(
                f"step {record['step']}/{self.total_steps} epoch {record['epoch']} "
                f"loss {record['loss']:.4f} lr {record['lr']:.2e} "
                f"{record['samples_per_s']:.0f} samples/s",
                flush=True,
            )

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.interactive else print)(text)

    def close(self) -> None:
        self.bar.close()
