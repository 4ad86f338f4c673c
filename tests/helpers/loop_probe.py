"""Run under torchrun: dtrain.train, counting per step what makes the host wait on a GPU (reads of
a tensor's value: ``aten._local_scalar_dense``, behind ``.item()``, ``bool()`` and ``float()``) and
dtrain's own collectives (FSDP2's all-gathers and reduce-scatters are not counted). A step's count
covers its ``train_step`` and the loop's work after it, until the next step starts.

DTRAIN_TEST_NAN_AT=N makes the loss of step N not finite (every gradient NaN). Rank 0 writes
{"steps": {step: {"syncs": n, "collectives": n}}, "weights_finite": bool} to $DTRAIN_TEST_COUNTS
when the loop ends, however it ends."""

import collections
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from dtrain import train
from dtrain.trainer import Trainer

counts = collections.defaultdict(lambda: {"syncs": 0, "collectives": 0})
current = {"step": None}


class CountSyncs(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and current["step"] is not None:
            counts[current["step"]]["syncs"] += 1
        return func(*args, **(kwargs or {}))


def counted(collective):
    def wrapper(*args, **kwargs):
        if current["step"] is not None:
            counts[current["step"]]["collectives"] += 1
        return collective(*args, **kwargs)

    return wrapper


for name in ("all_reduce", "broadcast", "broadcast_object_list", "all_gather", "all_gather_object", "barrier"):
    setattr(dist, name, counted(getattr(dist, name)))

train_step, loop, forward_backward = Trainer.train_step, Trainer._loop, Trainer._forward_backward
nan_at = int(os.environ.get("DTRAIN_TEST_NAN_AT", "0"))


def forward_backward_poisoned(self, *args, **kwargs):
    loss_sum = forward_backward(self, *args, **kwargs)
    if self.step + 1 == nan_at:
        for p in self.model.parameters():
            p.grad.mul_(float("nan"))
        loss_sum = loss_sum * float("nan")
    return loss_sum


def train_step_counted(self):
    current["step"] = self.step + 1  # the step it makes
    return train_step(self)


def loop_counted(self, *args, **kwargs):
    try:
        with CountSyncs():
            return loop(self, *args, **kwargs)
    finally:
        current["step"] = None
        finite = all(bool(torch.isfinite(p.full_tensor()).all()) for p in self.model.parameters())
        if int(os.environ["RANK"]) == 0:
            with open(os.environ["DTRAIN_TEST_COUNTS"], "w") as f:
                json.dump({"steps": counts, "weights_finite": finite}, f)


Trainer.train_step, Trainer._loop, Trainer._forward_backward = (
    train_step_counted,
    loop_counted,
    forward_backward_poisoned,
)
train.exit_now(train.main(sys.argv[1:]))
