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
