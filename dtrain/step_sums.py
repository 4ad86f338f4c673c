"""A step's one small all-reduce, read on the host a step later (docs/how-it-works.md, "A step
that does not wait").

Each rank adds in: the squared norm of its gradient shards (summed, the global norm squared, for
clipping), its loss times 0 (NaN or inf if the loss is not finite), and its stop request (a failed
log write, a lost torchrun agent, a signal) as a 1 in that request's slot. The optimizer skips the
update on the device when the sums say the step is not finite (AdamW's ``found_inf``, as
``GradScaler`` uses it), so nothing waits for the host before the next step is queued. The host
reads the sums one step later, or at once where it stops anyway (a log line, an evaluation, a
save, the end): a non-finite step then stops the run (exit 65) before anything is logged or saved,
and a stop request stops it at that boundary, at most one step after it was made.
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
        self._stop_slots: dict[int, torch.Tensor] = {}

    @torch.no_grad()  # to_local() is then the shard itself, not an autograd call
    def reduce(self, step: int, grads: list[torch.Tensor], loss_sum: torch.Tensor, stop_code: int):
        """Collective: the sums of the step after ``step``; returns its global gradient norm and
        found-inf flag, both on the device. Few small ops: on a tiny model each costs a percent."""
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        norm_sq = torch.stack(torch._foreach_norm(local)).float().square().sum().view(1)
        # 0 for a finite loss, NaN or inf for one that is not: the sum of the first two slots is
        # finite only if the gradients and every rank's loss are.
        sums = torch.cat([norm_sq, (loss_sum.float() * 0).view(1), self._stops(stop_code)])
        dist.all_reduce(sums)
        self._unread.append((step, *self._to_host(sums)))
        found_inf = (~torch.isfinite(sums[0] + sums[1])).float()
        return sums[0].sqrt(), found_inf

    def _stops(self, code: int) -> torch.Tensor:
        """The stop slots for this rank's request, made once per code and kept on the device."""
        if code not in self._stop_slots:
            slots = [1.0 if code == c else 0.0 for c in STOP_CODES]
            self._stop_slots[code] = torch.tensor(slots, device=self.device)
        return self._stop_slots[code]

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
            norm_sq, loss_slot, *stops = host.tolist()
            for code, count in zip(STOP_CODES, stops):
                if count:
                    self.agreed = max(self.agreed, code)
            if not math.isfinite(norm_sq + loss_slot):
                self._unread.clear()
                raise self.nonfinite(step, math.sqrt(norm_sq) if norm_sq >= 0 else norm_sq)

    def take_agreed(self) -> int:
        agreed, self.agreed = self.agreed, 0
        return agreed
