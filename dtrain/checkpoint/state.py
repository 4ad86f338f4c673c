"""What a checkpoint holds, and how it is laid out (docs/design.md, "One training state").

The trainer's components are separate DCP ``Stateful`` objects, saved and
loaded with one DCP call: ``model`` and ``optimizer`` (sharded DTensors through
``get_model_state_dict``/``get_optimizer_state_dict`` and their setters, so
every rank writes and reads only its slices and DCP reshards when the world size
changes), ``progress``, ``sampler`` and ``schedule``. Checkpoints written before this layout hold the same values
under one ``train`` key; ``load_parts`` reads both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from .dcp_io import SafeLoadPlanner, gc_paused

LEGACY_KEY = "train"  # the single key of checkpoints written before the components were split


class ModelState(Stateful):
    def __init__(self, model):
        self.model = model

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.model, state)


class OptimizerState(Stateful):
    """AdamW's state keyed by parameter names, so it loads into any world size."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


@dataclass
class Counters(Stateful):
    """Where training stands: steps and samples done, the best validation so far, and the
    plan (``resume.plan_record``) this point was reached under."""

    step: int = 0
    samples_seen: int = 0
    best: dict = field(default_factory=lambda: {"val_mse": math.inf, "step": -1})
    plan: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return asdict(self)  # copies best and plan too

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.best, self.plan = dict(state["best"]), dict(state["plan"])


def load_parts(reader, parts: dict[str, dict], no_dist: bool = False) -> dict[str, dict]:
    """Read ``parts`` (plain state dicts by component name, any subset) from the checkpoint
    behind ``reader``, in whichever layout it was written; returns them filled in.

    Only the requested keys are read; the rest stays on storage. Nothing in the
    checkpoint runs code (``SafeLoadPlanner``; the reader's metadata is restricted).
    """
    to_load, unpack = _in_stored_layout(parts, reader.read_metadata())
    with gc_paused():  # the load plan is an object graph of every stored chunk (dcp_io.gc_paused)
        dcp.load(to_load, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=no_dist)
    return unpack(to_load)


def _in_stored_layout(parts: dict, metadata) -> tuple[dict, Callable[[dict], dict]]:
    if not any(key.startswith(f"{LEGACY_KEY}.") for key in metadata.state_dict_metadata):
        return parts, lambda loaded: loaded
    # train.{model, optimizer, sampler, schedule}, train.progress = {step, samples_seen},
    # train.best and train.plan.
    legacy = {name: part for name, part in parts.items() if name != "progress"}
    if "progress" in parts:
        counters = parts["progress"]
        legacy.update(
            progress={"step": counters["step"], "samples_seen": counters["samples_seen"]},
            best=counters["best"],
            plan=counters["plan"],
        )

    def unpack(loaded: dict) -> dict:
        old = loaded[LEGACY_KEY]
        out = {name: old[name] for name in parts if name != "progress"}
        if "progress" in parts:
            out["progress"] = {**old["progress"], "best": old["best"], "plan": old["plan"]}
        return out

    return {LEGACY_KEY: legacy}, unpack
