"""One training state, saved and loaded with one DCP call (docs/design.md, "One training state")."""
from __future__ import annotations

from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful


class TrainingState(Stateful):
    """Model, optimizer, schedule, progress, sampler and best-metric bookkeeping of a trainer.

    Model and optimizer go through ``get_state_dict``/``set_state_dict``, so they
    stay sharded (DTensors): every rank writes and reads only its slices, and DCP
    reshards when the world size changes.
    """

    KEY = "train"

    def __init__(self, trainer):
        self.trainer = trainer

    def state_dict(self) -> dict:
        t = self.trainer
        model, optimizer = get_state_dict(t.model, t.optimizer)
        return {"model": model, "optimizer": optimizer,
                "progress": {"step": t.step, "samples_seen": t.samples_seen},
                "sampler": t.sampler.state_dict(),
                "schedule": t.schedule.state_dict(),
                "best": dict(t.best),
                "plan": t.plan_record()}

    def load_state_dict(self, state: dict) -> None:
        t = self.trainer
        set_state_dict(t.model, t.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        t.step = int(state["progress"]["step"])
        t.samples_seen = int(state["progress"]["samples_seen"])
        t.sampler.load_state_dict(state["sampler"])
        t.schedule.load_state_dict(state["schedule"])
        t.best = dict(state["best"])
        t.saved_plan = dict(state["plan"])
