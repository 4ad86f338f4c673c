"""Every row of docs/resuming.md's resume table, as plain functions (no process group, no torchrun)."""

import math

import pytest

from dtrain.config import ExperimentConfig
from dtrain.errors import ConfigError
from dtrain.resume import Position, changed_keys, plan_record, planned_samples, reconcile, refusal
from dtrain.sampler import ElasticSampler
from dtrain.schedule import LRSchedule


def stored_run(samples_in_epoch=36, epoch=0):
    """A tiny run of one 96-sample epoch in steps of 12, saved after 3 steps."""
    config = ExperimentConfig.preset("tiny")
    config.data.train_samples, config.train.global_batch_size = 96, 12
    config.train.max_steps, config.train.num_epochs, config.train.warmup_fraction = 0, 1, 0.0
    sampler = ElasticSampler(96, config.data.seed, config.data.mode)
    sampler.epoch, sampler.samples_in_epoch = epoch, samples_in_epoch
    seen = epoch * 96 + samples_in_epoch
    schedule = LRSchedule.from_config(config.train, 96)
    position = Position(
        step=seen // 12,
        samples_seen=seen,
        sampler=sampler,
        schedule=schedule,
        best={"val_mse": 1.0, "step": 2},
        plan=plan_record(config),
    )
    return config, position


def resumed(change: dict):
    stored, saved = stored_run()
    config = ExperimentConfig.from_dict(stored.to_dict())
    for key, value in change.items():
        config.set(key, value)
    position, changes = reconcile(config, saved)
    return stored, config, saved, position, {c.event: c for c in changes}


def test_world_size_and_micro_batch_change_nothing_but_the_split():
    stored, config, saved, position, changes = resumed({"train.micro_batch_size": 4})
    assert changes == {} and refusal(stored, config, None) == ""
    assert changed_keys(stored, config) == {"train.micro_batch_size": [0, 4]}
    assert position.sampler.state_dict() == saved.sampler.state_dict() and position.schedule == saved.schedule


def test_a_new_global_batch_keeps_the_samples_and_the_lr_curve_unless_scaled():
    _, _, saved, position, changes = resumed({"train.global_batch_size": 24})
    assert "lr_scaled" not in changes and position.schedule(60) == saved.schedule(60)
    assert position.sampler.state_dict() == saved.sampler.state_dict()  # same sample sequence
    _, _, saved, position, changes = resumed({"train.global_batch_size": 24, "train.scale_lr": True})
    assert changes["lr_scaled"].fields == {"factor": 2.0}
    assert position.schedule(60) == pytest.approx(2 * saved.schedule(60))


def test_a_new_end_keeps_the_old_curve_or_replans_it_without_a_jump():
    _, _, saved, position, changes = resumed({"train.num_epochs": 2})
    assert changes["schedule_kept"].fields["new_total"] == 192
    assert position.schedule == saved.schedule
    _, _, saved, position, changes = resumed({"train.num_epochs": 2, "train.reconfigure_scheduler": True})
    assert changes["schedule_replanned"].fields == {"old_total": 96, "new_total": 192, "samples_seen": 36}
    assert position.schedule(36) == pytest.approx(saved.schedule(36))  # no jump here
    assert position.schedule(192) == pytest.approx(1e-3 * 0.1)  # the floor at the new end
    _, _, _, _, changes = resumed({"train.max_steps": 20})  # steps instead of epochs
    assert changes["schedule_kept"].fields["new_total"] == 36 + 17 * 12


def test_a_new_peak_lr_scales_the_curve():
    _, _, saved, position, changes = resumed({"train.lr": 2e-3})
    assert changes["lr_scaled"].fields == {"factor": 2.0}
    assert position.schedule(50) == pytest.approx(2 * saved.schedule(50))


@pytest.mark.parametrize("now", [False, True])
def test_a_new_epoch_length_applies_from_the_next_epoch_or_now(now):
    _, _, _, position, changes = resumed({"data.train_samples": 60, "data.resize_now": now})
    change = changes["epoch_length_changed"]
    sampler = position.sampler
    if now:  # the current epoch ends where it stands; the next has the new length
        assert change.fields["when"] == "now" and (sampler.epoch, sampler.samples_in_epoch) == (1, 0)
        assert sampler.epoch_length == 60
    else:  # the current epoch finishes at its old length
        assert change.fields["when"] == "from the next epoch"
        assert (sampler.epoch, sampler.samples_in_epoch, sampler.epoch_length) == (0, 36, 96)
        assert sampler.train_samples == 60


@pytest.mark.parametrize("key, value", [("data.seed", 5), ("data.mode", "dynamic")])
def test_a_new_data_order_is_refused_unless_allowed(key, value):
    with pytest.raises(ConfigError, match="--data.allow_new_order=true"):
        resumed({key: value})
    _, _, _, position, changes = resumed({key: value, "data.allow_new_order": True})
    assert changes["data_order_changed"].fields["epoch"] == 1
    assert (position.sampler.epoch, position.sampler.samples_in_epoch) == (1, 0)


@pytest.mark.parametrize("key, value", [("data.val_seed", 9), ("data.val_samples", 32)])
def test_a_new_validation_set_is_announced_and_best_restarts(key, value):
    _, _, saved, position, changes = resumed({key: value})
    assert "validation_changed" in changes
    assert position.best == {"val_mse": math.inf, "step": -1} and saved.best["val_mse"] == 1.0


@pytest.mark.parametrize(
    "key, value",
    [("model.width", 64), ("model.layers", 3), ("model.heads", 4), ("model.mlp_ratio", 2), ("data.dim", 3)],
)
def test_a_new_model_shape_is_refused(key, value):
    stored, config, *_ = resumed({})
    config.set(key, value)
    assert f"--{key}={value} differs from the run's" in refusal(stored, config, None)


def test_another_preset_is_refused():
    stored, config, *_ = resumed({})
    assert "differs from the run's preset tiny" in refusal(stored, config, "small")


def test_planned_samples_counts_steps_or_epochs_from_where_training_stands():
    config, position = stored_run(samples_in_epoch=36, epoch=1)
    config.train.num_epochs = 3
    assert planned_samples(config.train, position.step, position.samples_seen, position.sampler) == 3 * 96
    config.train.max_steps = 20
    assert planned_samples(config.train, 11, 132, position.sampler) == 132 + 9 * 12


def test_a_resume_trains_on_the_runs_own_device_unless_told_otherwise(tmp_path):
    from dtrain.config import Settings
    from dtrain.rundir import CONFIG, RunDirectory
    from dtrain.train import start_device

    stored = ExperimentConfig.preset("tiny")
    stored.train.device = "cpu"
    RunDirectory(str(tmp_path / "run")).write_text(CONFIG, stored.to_json())
    requested = Settings(preset="tiny").resolve()
    assert requested.train.device == "auto"
    assert start_device(Settings(preset="tiny"), str(tmp_path / "run"), requested) == "cpu"
    given = Settings(preset="tiny", values={"train.device": "auto"}, sources={"train.device": "the command line"})
    assert start_device(given, str(tmp_path / "run"), requested) == "auto"
    assert start_device(Settings(preset="tiny"), str(tmp_path / "new"), requested) == "auto"
