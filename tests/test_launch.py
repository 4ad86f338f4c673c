"""End to end under the real torchrun (gloo, CPU) and as a plain single process."""

import json

import numpy as np
import pytest
from conftest import launch, read_jsonl

WORLD_SIZES = (1, 2, 4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny job (global batch 16, accumulation where needed) on 1, 2 and 4 ranks."""
    out = {}
    for world in WORLD_SIZES:
        run_dir = tmp_path_factory.mktemp(f"w{world}")
        args = [
            "--preset",
            "tiny",
            "--run-dir",
            str(run_dir),
            "--train.max_steps=6",
            "--train.log_interval=1",
            "--train.eval_interval=3",
            "--train.micro_batch_size=4",
            "--data.record_indices=true",
        ]
        result = launch(args, nproc=None if world == 1 else world)
        assert result.returncode == 0, result.stderr[-3000:]
        out[world] = run_dir
    return out


def test_parameters_are_sharded_one_slice_per_rank(runs):
    for world, run_dir in runs.items():
        start = read_jsonl(run_dir / "events.jsonl")[0]
        per_rank = start["parameters_per_rank"]
        assert start["world_size"] == world and len(per_rank) == world
        assert sum(per_rank) == start["parameters"]
        # Each tensor is cut along dim 0 into W near-equal slices.
        assert max(per_rank) - min(per_rank) <= start["parameters"] * 0.02
        assert max(per_rank) <= start["parameters"] / world * 1.05


def test_world_sizes_see_the_same_global_batches_in_the_same_order(runs):
    def global_batches(run_dir, world):
        per_rank = [read_jsonl(run_dir / "samples" / f"rank_{r}.jsonl") for r in range(world)]
        return [sum((records[step]["indices"] for records in per_rank), []) for step in range(6)]

    reference = global_batches(runs[1], 1)
    assert all(len(batch) == 16 for batch in reference)
    for world in WORLD_SIZES[1:]:
        assert global_batches(runs[world], world) == reference


def test_loss_curves_agree_across_world_sizes(runs):
    def losses(run_dir):
        return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"]

    reference = losses(runs[1])
    assert len(reference) == 6
    for world in WORLD_SIZES[1:]:
        np.testing.assert_allclose(losses(runs[world]), reference, rtol=1e-5)
    start = read_jsonl(runs[4] / "events.jsonl")[0]
    assert (start["micro_batch_size"], start["accumulation"]) == (4, 1)
    assert read_jsonl(runs[1] / "events.jsonl")[0]["accumulation"] == 4


def test_run_directory_holds_config_metrics_and_events(runs):
    run_dir = runs[2]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["preset"] == "tiny" and config["train"]["max_steps"] == 6
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in metrics if r["kind"] == "train"]
    assert {"step", "epoch", "samples_seen", "loss", "lr", "samples_per_s"} <= set(train[0])
    assert [r["step"] for r in metrics if r["kind"] == "eval"] == [0, 3, 6]
    events = [e["event"] for e in read_jsonl(run_dir / "events.jsonl")]
    assert events[0] == "start" and events[-2:] == ["checkpoint", "end"]


def files_of(run_dir):
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def test_a_finished_run_says_so_and_changes_nothing(runs):
    run_dir = runs[1]
    before = files_of(run_dir)
    result = launch(["--preset", "tiny", "--run-dir", str(run_dir)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "already finished at step 6" in result.stdout
    assert before == files_of(run_dir)


def test_resume_never_refuses_an_existing_run(runs):
    run_dir = runs[1]
    before = files_of(run_dir)
    result = launch(["--run-dir", str(run_dir), "--resume", "never"])
    assert result.returncode == 2
    assert "already holds a run" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert before == files_of(run_dir)


def test_a_batch_the_world_size_cannot_make_is_refused_before_anything_is_written(tmp_path):
    result = launch(["--preset", "tiny", "--run-dir", str(tmp_path / "r"), "--train.global_batch_size=5"], nproc=2)
    assert result.returncode != 0
    assert "--train.global_batch_size=5 cannot be split over 2 ranks; use a multiple of 2" in result.stderr
    assert not (tmp_path / "r").exists()


def test_training_beats_the_trivial_predictor(tmp_path):
    result = launch(["--preset", "tiny", "--run-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    first, last = evals[0], evals[-1]
    assert last["val_mse"] < 0.5 * first["val_mse"]
    assert last["val_mse"] < 0.5 * last["trivial_mse"]
