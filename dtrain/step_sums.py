"""A step's one small all-reduce, read on the host a step later (docs/how-it-works.md, "A step
that does not wait").

Each rank adds in: the squared norm of its gradient shards (summed, the global norm squared, for
clipping), 1 if its loss is not finite, and its stop request (a failed log write, a lost torchrun
agent, a signal) as a 1 in that request's slot. The optimizer skips the update on the device when
the sums say the step is not finite (AdamW's ``found_inf``, as ``GradScaler`` uses it), so nothing
waits for the host before the next step is queued. The host reads the sums one step later, or at
once where it stops anyway (a log line, an evaluation, a save, the end): a non-finite step then
stops the run (exit 65) before anything is logged or saved, and a stop request stops it at that
boundary, at most one step after it was made.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

STOP_CODES = (3, 2, 1)  # a failure, a lost agent, a signal (dtrain/preempt.py): one slot each


class StepSums:
    def __init__(self, device: torch.device, nonfinite: Callable[[int, float], Exception]):
        self.device, self.nonfinite = device, nonfinite  # nonfinite(previous step, norm): the error to raise
        self._unread: list[tuple[int, torch.Tensor, torch.cuda.Event | None]] = []
        self.agreed = 0  # the weightiest stop request read since the last boundary

    def reduce(self, step: int, grads: list[torch.Tensor], loss_sum: torch.Tensor, stop_code: int):
        """Collective: the sums of the step after ``step``; returns its global gradient norm and
        found-inf flag, both on the device."""
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        sums = torch.zeros(2 + len(STOP_CODES), device=self.device)
        if local:
            sums[0] = torch.stack(torch._foreach_norm(local)).float().square().sum()
        sums[1] = (~torch.isfinite(loss_sum)).float()
        if stop_code:
            sums[2 + STOP_CODES.index(stop_code)] = 1.0
        dist.all_reduce(sums)
        self._unread.append((step, *self._to_host(sums)))
        norm = sums[0].sqrt()
        found_inf = (~torch.isfinite(norm) | (sums[1] > 0)).float()
        return norm, found_inf

    def _to_host(self, sums: torch.Tensor):
        if sums.device.type != "cuda":
            return sums, None
        host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
        host.copy_(sums, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done

    def read(self, now: bool) -> None:
        """Host: the sums of every unread step but the newest (all of them with ``now``); raises at a
        non-finite step, keeps the weightiest stop request."""
        while len(self._unread) > (0 if now else 1):
            step, host, done = self._unread.pop(0)
            if done is not None:
                done.synchronize()
            norm_sq, nonfinite, *stops = host.tolist()
            for code, count in zip(STOP_CODES, stops):
                if count:
                    self.agreed = max(self.agreed, code)
            if nonfinite or not math.isfinite(norm_sq):
                self._unread.clear()
                raise self.nonfinite(step, math.sqrt(norm_sq) if norm_sq >= 0 else norm_sq)

    def take_agreed(self) -> int:
        agreed, self.agreed = self.agreed, 0
        return agreed
