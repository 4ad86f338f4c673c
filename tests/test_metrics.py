import numpy as np
import pytest
import torch
from conftest import launch, read_jsonl

from dtrain.metrics import kmeans_centres, set_mean_centres, squared_error, wasserstein


def test_wasserstein_is_zero_for_a_permutation_and_positive_otherwise():
    rng = np.random.default_rng(0)
    clouds = rng.normal(size=(3, 10, 2))
    assert np.allclose(wasserstein(clouds[:, ::-1], clouds), 0)
    shifted = clouds + np.array([3.0, 4.0])
    assert np.allclose(wasserstein(shifted, clouds), 5.0)


def test_kmeans_recovers_well_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[-10.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = rng.integers(0, 3, size=60)
    targets = centres[labels][None]
    points = targets + 0.1 * rng.normal(size=targets.shape)
    predicted = kmeans_centres(points, [3], seeds=[0])
    assert np.abs(predicted - targets).max() < 0.2


def test_trivial_predictor_and_squared_error():
    points = torch.tensor([[[0.0, 0.0], [2.0, 4.0]]])
    assert torch.equal(set_mean_centres(points), torch.tensor([[[1.0, 2.0], [1.0, 2.0]]]))
    assert squared_error(points, torch.zeros_like(points)).item() == 5.0


def test_tensorboard_curves_hold_each_step_once_across_a_resume_that_rolls_back(tmp_path):
    """A start that resumes from step 8 after a first one drew up to 12: TensorBoard's own reader
    finds each step once, with the values of the start that trained it last."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    common = [
        *("--preset", "tiny", "--run-dir", str(run_dir), "--train.log_interval=2", "--train.eval_interval=4"),
        *("--checkpoint.interval_steps=8", "--metrics.tensorboard=true"),
    ]
    assert launch([*common, "--train.max_steps=12"]).returncode == 0
    again = launch([*common, "--train.max_steps=20", "--resume", "8"])
    assert again.returncode == 0, again.stderr[-2000:]
    curves = EventAccumulator(str(run_dir / "tensorboard"))
    curves.Reload()
    latest = {(r["kind"], r["step"]): r for r in read_jsonl(run_dir / "metrics.jsonl")}  # later lines win
    loss = curves.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(2, 21, 2))
    assert all(e.value == pytest.approx(latest["train", e.step]["loss"]) for e in loss)
    val = curves.Scalars("eval/val_mse")
    assert [e.step for e in val] == [0, 4, 8, 12, 16, 20]
    assert all(e.value == pytest.approx(latest["eval", e.step]["val_mse"]) for e in val)
    saved = sorted({e["step"] for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "checkpoint"})
    assert [e.step for e in curves.Scalars("checkpoint/blocked_s")] == saved == [4, 8, 12, 16, 20]  # once each


def test_goodput_splits_the_wall_clock_into_steps_that_count_and_badput_by_kind():
    """Two legs (steps 0-30, killed; resumed from 20 to 50): every category from its own record."""
    from dtrain.goodput import goodput

    legs = [
        {"leg": "a", "started": 10.0, "from_step": 0, "last_step": 30, "lost_steps": 10, "ended": "killed"},
        {"leg": "b", "started": 50.0, "from_step": 20, "last_step": 50, "lost_steps": 0, "ended": "finished"},
    ]
    events = [
        {
            "event": "start",
            "leg": "a",
            "time": 10.0,
            "global_batch_size": 16,
            "startup": {"process": 5.0, "built": 8.0, "restored": 9.0},
        },
        {"event": "checkpoint", "step": 20, "time": 30.0, "blocked_s": 1.0},
        {
            "event": "resume",
            "leg": "b",
            "time": 50.0,
            "global_batch_size": 16,
            "startup": {"process": 45.0, "built": 47.0, "restored": 49.5},
        },
        {"event": "end", "step": 50, "time": 100.0},
    ]
    metrics = [
        *({"kind": "train", "leg": "a", "step": s, "time": 10.0 + s, "samples_per_s": 16.0} for s in (10, 20, 30)),
        {"kind": "eval", "step": 20, "time": 31.0, "eval_s": 2.0},
        *(
            {"kind": "train", "leg": "b", "step": s, "time": 30.0 + s, "samples_per_s": 8.0 if s == 30 else 16.0}
            for s in (30, 40, 50)
        ),
    ]
    result = goodput(legs, events, metrics)
    assert result["wall_s"] == 95.0  # the first process start to the last record
    assert result["productive_s"] == 20 + 30  # 1 s steps (b's first line, slower, is start-up's)
    assert result["badput_s"] == {
        "start-up": (10 - 5 - 1) + (50 - 45 - 2.5),
        "checkpoint load": 1 + 2.5,
        "checkpoint save": 1.0,
        "evaluation": 2.0,
        "lost to interruptions": 10.0,
        "between legs": 45 - 40,  # leg a's last line at 40, leg b's process at 45
        "other": 95 - 50 - (6.5 + 3.5 + 1 + 2 + 10 + 5),
    }
    assert result["goodput"] == 50 / 95
