"""What a resume may change, and what each change does: the whole contract in one place.

A resumed start takes the run's stored configuration (the newest committed
checkpoint's, see ``RunDirectory.stored_config``) and applies the options given.
Plain functions over plain values decide the rest, so every row of docs/resuming.md's
resume table is a unit test (``tests/test_resume_rules.py``), no process group:

- ``refusal(stored, config, preset)``: why this start may not change the run (a new
  model shape, another preset), or "".
- ``reconcile(config, position)``: the position (sampler, schedule, best) after the
  changes, and a ``Change`` for each, which becomes a printed line and an event.

A change of world size or micro-batch split needs nothing here: DCP reshards, and
the sampler deals the same global batches.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

from .config import ExperimentConfig, all_keys
from .errors import ConfigError
from .sampler import ElasticSampler
from .schedule import LRSchedule

# Keys a checkpoint cannot follow: they change the shapes of the saved tensors.
SHAPE_KEYS = ("model.width", "model.layers", "model.heads", "model.mlp_ratio", "data.dim")


@dataclass(frozen=True)
class Change:
    event: str  # the events.jsonl kind
    message: str  # the line printed on rank 0
    fields: dict = field(default_factory=dict)


@dataclass
class Position:
    """Where a checkpoint left training, and the plan it was saved under."""

    step: int
    samples_seen: int
    sampler: ElasticSampler
    schedule: LRSchedule
    best: dict  # {"val_mse", "step"}
    plan: dict  # plan_record() of the configuration that saved it


def plan_record(config: ExperimentConfig) -> dict:
    """The settings a resume compares against to see what the user changed."""
    return {
        "global_batch_size": config.train.global_batch_size,
        "lr": config.train.lr,
        "val_seed": config.data.val_seed,
        "val_samples": config.data.val_samples,
    }


def planned_samples(train_cfg, step: int, samples_seen: int, sampler: ElasticSampler) -> int:
    """Samples seen when training ends, counted from the current point.

    max_steps counts optimizer steps, whatever batch size they had; otherwise
    training ends with epoch num_epochs - 1, whatever lengths its epochs had.
    """
    if train_cfg.max_steps:
        return samples_seen + max(train_cfg.max_steps - step, 0) * train_cfg.global_batch_size
    if sampler.epoch >= train_cfg.num_epochs:
        return samples_seen
    return (
        samples_seen
        + sampler.epoch_length
        - sampler.samples_in_epoch
        + (train_cfg.num_epochs - sampler.epoch - 1) * sampler.train_samples
    )


def changed_keys(old: ExperimentConfig, new: ExperimentConfig) -> dict[str, list]:
    """``{"section.key": [old, new]}`` for every key the start changes."""
    before, after = old.to_dict(), new.to_dict()
    out = {}
    for key in all_keys():
        section, name = key.split(".")
        if before[section][name] != after[section][name]:
            out[key] = [before[section][name], after[section][name]]
    return out


def refusal(stored: ExperimentConfig, config: ExperimentConfig, preset: str | None) -> str:
    """Why this start may not continue the stored run with ``config`` ("" if it may)."""
    if preset and preset != stored.preset_name:
        return (
            f"--preset {preset} differs from the run's preset {stored.preset_name}; "
            "omit --preset to continue the run, or pass a new --run-dir"
        )
    changed = changed_keys(stored, config)
    for key in SHAPE_KEYS:
        if key in changed:
            return (
                f"--{key}={changed[key][1]} differs from the run's {changed[key][0]}: "
                "a checkpoint cannot change the model's shape; pass a new --run-dir"
            )
    return ""


def reconcile(config: ExperimentConfig, saved: Position) -> tuple[Position, list[Change]]:
    """The position after applying what ``config`` changes relative to the checkpoint.

    Deterministic, so every rank makes the same changes. Raises ``ConfigError`` for a
    new data order that was not allowed.
    """
    data, train = config.data, config.train
    position = dataclasses.replace(saved, sampler=copy.deepcopy(saved.sampler), best=dict(saved.best))
    sampler, plan = position.sampler, saved.plan
    changes = []
    if (data.seed, data.mode) != (sampler.seed, sampler.mode):
        if not data.allow_new_order:
            raise ConfigError(
                f"--data.seed={data.seed} --data.mode={data.mode} differ from the "
                f"checkpoint's seed {sampler.seed}, mode {sampler.mode}: the sample order would "
                "not continue; pass --data.allow_new_order=true to start a new epoch with them"
            )
        old = {"seed": sampler.seed, "mode": sampler.mode}
        sampler.reidentify(data.seed, data.mode)
        changes.append(
            Change(
                "data_order_changed",
                f"new data order {old} -> seed {data.seed}, mode {data.mode}; epoch {sampler.epoch} starts now",
                {"old": old, "epoch": sampler.epoch},
            )
        )
    if data.train_samples != sampler.train_samples:
        old, epoch = sampler.train_samples, sampler.epoch
        sampler.resize(data.train_samples, now=data.resize_now)
        when = "now" if sampler.epoch != epoch or sampler.samples_in_epoch == 0 else "from the next epoch"
        changes.append(
            Change(
                "epoch_length_changed",
                f"epoch length {old} -> {data.train_samples} {when} "
                f"(epoch {sampler.epoch}, position {sampler.samples_in_epoch})",
                {"old": old, "new": data.train_samples, "when": when, "epoch": sampler.epoch},
            )
        )
    factor = train.lr / plan["lr"]
    if train.scale_lr and train.global_batch_size != plan["global_batch_size"]:
        factor *= train.global_batch_size / plan["global_batch_size"]
    if factor != 1.0:
        position.schedule = position.schedule.scaled(factor)
        changes.append(
            Change(
                "lr_scaled",
                f"learning-rate curve scaled by {factor:g} (lr {plan['lr']:g} -> "
                f"{train.lr:g}, global batch {plan['global_batch_size']} -> "
                f"{train.global_batch_size}, scale_lr={train.scale_lr})",
                {"factor": factor},
            )
        )
    end = planned_samples(train, position.step, position.samples_seen, sampler)
    if end != position.schedule.total_samples:
        old_end, seen = position.schedule.total_samples, position.samples_seen
        if train.reconfigure_scheduler:
            position.schedule = position.schedule.replan(seen, end)
            message = (
                f"LR schedule re-planned from sample {seen} to {end} (was {old_end}), "
                f"continuing from lr {position.schedule(seen):.3g}"
            )
        else:
            message = (
                f"the plan now ends at sample {end} (was {old_end}); the LR keeps its old curve "
                "(pass --train.reconfigure_scheduler=true to re-plan it)"
            )
        changes.append(
            Change(
                "schedule_replanned" if train.reconfigure_scheduler else "schedule_kept",
                message,
                {"old_total": old_end, "new_total": end, "samples_seen": seen},
            )
        )
    if (data.val_seed, data.val_samples) != (plan["val_seed"], plan["val_samples"]):
        position.best = {"val_mse": math.inf, "step": -1}  # scores on another set do not compare
        changes.append(
            Change(
                "validation_changed",
                f"new validation set (seed {plan['val_seed']} -> "
                f"{data.val_seed}, {plan['val_samples']} -> {data.val_samples} examples): metrics "
                f"before and after step {position.step} are not comparable, and best restarts",
                {"old": [plan["val_seed"], plan["val_samples"]]},
            )
        )
    return position, changes
