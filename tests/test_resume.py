"""Exact resumption: same world size bitwise, other world sizes and batch sizes exactly once."""

import shutil

import numpy as np
import pytest
import torch
from conftest import launch, read_jsonl

COMMON = [
    "--preset",
    "tiny",
    "--train.log_interval=1",
    "--train.eval_interval=0",
    "--checkpoint.interval_steps=0",
    "--data.record_indices=true",
]
EPOCH = [
    "--data.train_samples=96",
    "--train.global_batch_size=12",
    "--train.max_steps=0",
    "--train.num_epochs=1",
    "--train.warmup_fraction=0",
]


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def train_records(run_dir):
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def consumed(run_dir):
    """Every (epoch, position, index) any rank consumed, in any leg of the run."""
    rows = []
    for path in (run_dir / "samples").glob("rank_*.jsonl"):
        for record in read_jsonl(path):
            rows += zip(record["epochs"], record["positions"], record["indices"])
    return rows


def assert_exactly_once(run_dir, epoch, length):
    rows = [r for r in consumed(run_dir) if r[0] == epoch]
    assert sorted(r[1] for r in rows) == list(range(length))
    assert sorted(r[2] for r in rows) == list(range(length))


def to_legacy_layout(directory, scratch):
    """Rewrite a checkpoint, with plain torch tools, in the layout dtrain wrote before its components
    were separate DCP objects: everything under one "train" key (docs/design.md)."""
    import hashlib
    import json

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

    dcp_to_torch_save(directory, scratch / "full.pt")
    full = torch.load(scratch / "full.pt", weights_only=False)
    progress = full.pop("progress")
    full.update(
        progress={"step": progress["step"], "samples_seen": progress["samples_seen"]},
        best=progress["best"],
        plan=progress["plan"],
    )
    torch.save({"train": full}, scratch / "legacy.pt")
    for file in directory.iterdir():
        if file.name != "manifest.json":
            file.unlink()
    torch_save_to_dcp(scratch / "legacy.pt", directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"] = {
        f.name: {"size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
        for f in directory.iterdir()
        if f.name != "manifest.json"
    }
    manifest["format"] = 2  # as dtrain wrote manifests then: one SHA-256 per file
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_same_world_size_resume_is_bitwise_identical(tmp_path):
    args = [*COMMON, "--train.max_steps=8", "--model.dropout=0.1"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    ok(launch([*args, "--run-dir", str(whole)], nproc=2))
    ok(launch([*args, "--run-dir", str(split), "--stop-at-step", "3"], nproc=2))
    again = ok(launch([*args, "--run-dir", str(split), "--stop-at-step", "3"]))  # one process: it only reads
    assert "is at step 3, past --stop-at-step 3; nothing to do" in again.stdout
    legacy = tmp_path / "legacy"
    shutil.copytree(split, legacy)
    to_legacy_layout(legacy / "checkpoints/step_00000003", tmp_path)
    ok(launch([*args, "--run-dir", str(split)], nproc=2))
    assert [r["loss"] for r in train_records(whole)] == [r["loss"] for r in train_records(split)]
    ok(launch([*args, "--run-dir", str(legacy)], nproc=2))  # checkpoints of earlier dtrain versions resume too
    assert [r["loss"] for r in train_records(whole)] == [r["loss"] for r in train_records(legacy)]
    events = [e["event"] for e in read_jsonl(split / "events.jsonl")]
    assert events == ["start", "checkpoint", "stop", "resume", "checkpoint", "end"]
    from dtrain.export import load_from_run

    a_model, a_optim, *_ = load_from_run(str(whole), optimizer=True)
    b_model, b_optim, *_ = load_from_run(str(split), optimizer=True)
    for key, value in a_model.state_dict().items():
        assert torch.equal(value, b_model.state_dict()[key]), key
    for fqn, entries in a_optim["state"].items():
        for name, value in entries.items():
            assert torch.equal(value, b_optim["state"][fqn][name]), (fqn, name)


@pytest.fixture(scope="module")
def epoch_runs(tmp_path_factory):
    """An uninterrupted 2-rank epoch, and the same run stopped after 3 of its 8 steps."""
    base = tmp_path_factory.mktemp("epoch")
    ok(launch([*COMMON, *EPOCH, "--run-dir", str(base / "whole")], nproc=2))
    ok(launch([*COMMON, *EPOCH, "--run-dir", str(base / "leg1"), "--stop-at-step", "3"], nproc=2))
    return base


def continue_copy(epoch_runs, tmp_path, args, nproc):
    """Resume a copy of the stopped run with ``args``: on ``nproc`` ranks under torchrun, or in one
    process (None) where the rule under test does not depend on the world size (each rank is a
    process start, most of a short run's cost)."""
    run_dir = tmp_path / "run"
    shutil.copytree(epoch_runs / "leg1", run_dir)
    return run_dir, ok(launch(["--run-dir", str(run_dir), *args], nproc=nproc))


@pytest.mark.parametrize("world", [1, 3, 4])
def test_resume_on_another_world_size_sees_every_sample_once(epoch_runs, tmp_path, world):
    run_dir, result = continue_copy(epoch_runs, tmp_path, [], world)
    assert f"saved on 2 ranks) on {world} ranks" in result.stdout
    assert_exactly_once(run_dir, epoch=0, length=96)
    # The loss curve goes on as if never interrupted (same global batches, float tolerance).
    resumed = [r["loss"] for r in train_records(run_dir)]
    reference = [r["loss"] for r in train_records(epoch_runs / "whole")]
    np.testing.assert_allclose(resumed, reference, rtol=1e-5)


def test_a_new_global_batch_mid_epoch_sees_every_sample_once(epoch_runs, tmp_path):
    run_dir, result = continue_copy(epoch_runs, tmp_path, ["--train.global_batch_size=20"], 2)
    assert_exactly_once(run_dir, epoch=0, length=96)
    records = train_records(run_dir)
    assert [r["samples_seen"] for r in records] == [12, 24, 36, 56, 76, 96]
    # No LR jump: every step's LR is the same curve of samples seen, whatever the batch.
    from dtrain.config import ExperimentConfig
    from dtrain.schedule import LRSchedule

    config = ExperimentConfig.preset("tiny")
    config.train.warmup_fraction = 0
    curve = LRSchedule.from_config(config.train, total_samples=96)
    assert [r["lr"] for r in records] == pytest.approx([curve(r["samples_seen"]) for r in records])
    scaled_dir, scaled = continue_copy(
        epoch_runs, tmp_path / "s", ["--train.global_batch_size=24", "--train.scale_lr=true"], 2
    )
    assert "scaled by 2" in scaled.stdout
    event = [e for e in read_jsonl(scaled_dir / "events.jsonl") if e["event"] == "lr_scaled"]
    assert event and event[0]["factor"] == 2.0 and event[0]["step"] == 3


def test_extending_the_plan_keeps_or_replans_the_lr_curve(epoch_runs, tmp_path):
    kept_dir, kept = continue_copy(epoch_runs, tmp_path / "k", ["--train.num_epochs=2"], None)
    assert "keeps its old curve" in kept.stdout
    lrs = [r["lr"] for r in train_records(kept_dir)]
    assert len(lrs) == 16 and lrs[7] == lrs[15]  # the old curve ended at step 8: flat after it
    replanned_dir, replanned = continue_copy(
        epoch_runs, tmp_path / "r", ["--train.num_epochs=2", "--train.reconfigure_scheduler=true"], None
    )
    assert "re-planned" in replanned.stdout
    lrs = [r["lr"] for r in train_records(replanned_dir)]
    assert len(lrs) == 16
    assert abs(lrs[3] - lrs[2]) < 0.05 * lrs[2] and lrs[3] < lrs[2]  # continuous, and decaying
    assert lrs[15] == pytest.approx(1e-3 * 0.1)  # reaches the floor at the new end
    assert_exactly_once(replanned_dir, epoch=0, length=96)
    assert_exactly_once(replanned_dir, epoch=1, length=96)
    events = [e["event"] for e in read_jsonl(replanned_dir / "events.jsonl")]
    assert "config_changed" in events and "schedule_replanned" in events


@pytest.mark.parametrize("now", [False, True])
def test_a_new_epoch_length_applies_from_the_next_epoch_or_now(epoch_runs, tmp_path, now):
    run_dir, result = continue_copy(
        epoch_runs,
        tmp_path,
        ["--data.train_samples=60", "--train.num_epochs=2", f"--data.resize_now={str(now).lower()}"],
        None,
    )
    if now:
        assert "60 now" in result.stdout
        rows = [r for r in consumed(run_dir) if r[0] == 0]
        assert len(rows) == 36 and len({r[2] for r in rows}) == 36  # the epoch ended where it stood
    else:
        assert "60 from the next epoch" in result.stdout
        assert_exactly_once(run_dir, epoch=0, length=96)
    assert_exactly_once(run_dir, epoch=1, length=60)


def test_a_new_data_order_is_refused_unless_asked(epoch_runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(epoch_runs / "leg1", run_dir)
    refused = launch(["--run-dir", str(run_dir), "--data.seed=5"])
    assert refused.returncode != 0
    assert "--data.allow_new_order=true" in refused.stderr
    accepted = ok(
        launch(["--run-dir", str(run_dir), "--data.seed=5", "--data.allow_new_order=true", "--train.num_epochs=2"])
    )
    assert "new data order" in accepted.stdout
    assert_exactly_once(run_dir, epoch=1, length=96)  # the new order's whole epoch


def test_the_validation_set_survives_resumes_unless_replaced(epoch_runs, tmp_path):
    run_dir, _ = continue_copy(epoch_runs, tmp_path, ["--train.eval_interval=4"], 2)  # sums in one order
    trivial = {r["trivial_mse"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "eval"}
    assert len(trivial) == 1  # the same examples before and after the resume
    new_dir, new = continue_copy(epoch_runs, tmp_path / "n", ["--data.val_seed=9"], 2)
    assert "new validation set" in new.stdout
    trivial = [r["trivial_mse"] for r in read_jsonl(new_dir / "metrics.jsonl") if r["kind"] == "eval"]
    assert len(set(trivial)) == 2
