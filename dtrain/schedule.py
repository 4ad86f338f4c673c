"""Learning-rate schedules as functions of training progress, counted in samples.

Progress is samples consumed, not steps, so a resume with a different global
batch size stays on the same curve.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass
class LRSchedule:
    kind: str  # constant, linear, cosine, step, warmup_decay
    peak_lr: float
    total_samples: int
    warmup_samples: int = 0
    min_lr_ratio: float = 0.0
    milestones: tuple[float, ...] = ()  # step: progress fractions
    gamma: float = 0.1  # step: factor at each milestone
    # After a re-plan: from start_samples on, decay from start_lr to the end, same shape.
    start_samples: int = 0
    start_lr: float | None = None

    @classmethod
    def from_config(cls, train_cfg, total_samples: int) -> LRSchedule:
        milestones = tuple(float(x) for x in train_cfg.step_milestones.split(",") if x.strip())
        return cls(
            train_cfg.schedule,
            train_cfg.lr,
            total_samples,
            round(train_cfg.warmup_fraction * total_samples),
            train_cfg.min_lr_ratio,
            milestones,
            train_cfg.step_gamma,
        )

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, tuple(value) if key == "milestones" else value)

    def replan(self, at_samples: int, total_samples: int) -> LRSchedule:
        """The same kind of curve from the current point to a new end, with no jump here.

        A warmup still in progress is kept; the decay is re-planned from where it
        stands (or from the warmup's end) to ``total_samples``.
        """
        start = max(at_samples, self.warmup_samples)
        return dataclasses.replace(
            self, total_samples=max(total_samples, start + 1), start_samples=start, start_lr=self(start)
        )

    def scaled(self, factor: float) -> LRSchedule:
        """The whole curve times ``factor`` (a new peak LR, or linear scaling with batch size)."""
        return dataclasses.replace(
            self, peak_lr=self.peak_lr * factor, start_lr=None if self.start_lr is None else self.start_lr * factor
        )

    def __call__(self, samples: int) -> float:
        """The learning rate of the step that brings progress to ``samples``."""
        if samples < self.warmup_samples:
            return self.peak_lr * samples / self.warmup_samples
        if self.start_lr is not None and samples >= self.start_samples:
            return self._replanned(samples)
        if self.kind == "warmup_decay":  # inverse square root after the warmup
            return self.peak_lr * math.sqrt(max(self.warmup_samples, 1) / max(samples, 1))
        progress = min(samples, self.total_samples) / self.total_samples
        decay = (min(samples, self.total_samples) - self.warmup_samples) / max(
            self.total_samples - self.warmup_samples, 1
        )
        floor = self.min_lr_ratio
        if self.kind == "linear":
            factor = 1.0 - (1.0 - floor) * decay
        elif self.kind == "cosine":
            factor = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * decay))
        elif self.kind == "step":
            factor = self.gamma ** sum(progress >= m for m in self.milestones)
        else:
            factor = 1.0
        return self.peak_lr * factor

    def _replanned(self, samples: int) -> float:
        start, lr0 = self.start_samples, self.start_lr
        if self.kind == "warmup_decay":
            return lr0 * math.sqrt(max(start, 1) / max(samples, 1))
        q = (min(samples, self.total_samples) - start) / max(self.total_samples - start, 1)
        floor = min(self.peak_lr * self.min_lr_ratio, lr0)
        if self.kind == "linear":
            return lr0 + (floor - lr0) * q
        if self.kind == "cosine":
            return floor + (lr0 - floor) * 0.5 * (1.0 + math.cos(math.pi * q))
        if self.kind == "step":
            return lr0 * self.gamma ** sum(q >= m for m in self.milestones)
        return lr0
