import math

import pytest

from dtrain.config import TrainConfig
from dtrain.schedule import LRSchedule


def schedule(kind, **overrides):
    cfg = TrainConfig(schedule=kind, lr=1.0, warmup_fraction=0.1, min_lr_ratio=0.1, **overrides)
    return LRSchedule.from_config(cfg, total_samples=1000)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine", "step", "warmup_decay"])
def test_warmup_is_linear_and_reaches_the_peak(kind):
    s = schedule(kind)
    assert s(0) == 0 and s(50) == pytest.approx(0.5) and s(100) == pytest.approx(1.0)


def test_decays_end_where_configured():
    assert schedule("constant")(1000) == 1.0
    assert schedule("linear")(1000) == pytest.approx(0.1)
    assert schedule("linear")(550) == pytest.approx(0.55)
    assert schedule("cosine")(1000) == pytest.approx(0.1)
    assert schedule("cosine")(550) == pytest.approx(0.55)
    step = schedule("step", step_milestones="0.5,0.75", step_gamma=0.1)
    assert [step(s) for s in (499, 500, 749, 750, 1000)] == pytest.approx([1, 0.1, 0.1, 0.01, 0.01])
    assert schedule("warmup_decay")(400) == pytest.approx(math.sqrt(100 / 400))


@pytest.mark.parametrize("kind", ["linear", "cosine", "warmup_decay"])
def test_schedules_have_no_jumps(kind):
    s = schedule(kind)
    values = [s(x) for x in range(0, 1001)]
    assert max(abs(a - b) for a, b in zip(values, values[1:])) < 0.011


def test_a_function_of_samples_not_steps():
    s = schedule("cosine")
    # Batches of 10 or of 50 samples meet the same curve at the same progress.
    assert [s(x) for x in range(0, 1001, 50)] == [s(x) for x in range(0, 1001, 10)][::5]


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine", "step", "warmup_decay"])
def test_a_replan_continues_from_the_current_point_to_the_new_end(kind):
    old = schedule(kind)
    new = old.replan(600, 3000)
    assert new(600) == pytest.approx(old(600))  # no jump at the resume point
    if kind in ("linear", "cosine"):
        assert new(3000) == pytest.approx(0.1) and new(1000) > old(1000)
        steps = [new(x) for x in range(600, 3001, 10)]
        assert all(a >= b for a, b in zip(steps, steps[1:]))
    if kind == "step":  # milestones re-applied over the remaining span
        assert new(600 + 1200) == pytest.approx(old(600) * 0.1)


def test_a_replan_during_warmup_keeps_the_warmup():
    new = schedule("cosine").replan(50, 2000)
    assert new(50) == pytest.approx(0.5) and new(100) == pytest.approx(1.0)
    assert new(2000) == pytest.approx(0.1)


def test_scaling_multiplies_the_whole_curve():
    old = schedule("cosine").replan(500, 2000)
    doubled = old.scaled(2.0)
    assert all(doubled(x) == pytest.approx(2 * old(x)) for x in (10, 500, 1200, 2000))
