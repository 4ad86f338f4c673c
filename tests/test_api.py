"""The Python API, as docs/python-api.md shows it, on the tiny preset."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import launch, read_jsonl

from dtrain import ExperimentConfig, ExperimentManager, ModelManager


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """The issue's first code sample, written out as a user would, small sizes."""
    root = tmp_path_factory.mktemp("api")
    config = ExperimentConfig.preset("tiny")
    config.data.train_samples = 320  # 20 steps an epoch
    exp = ExperimentManager(config, run_dir=str(root / "runs/a"))
    metrics = exp.run(num_epochs=5)
    assert metrics["val_mse"] < metrics["trivial_mse"]
    return root


def test_the_documented_code_samples_run_as_written(run_a, tmp_path):
    run_dir = str(tmp_path / "runs/a")
    shutil.copytree(run_a / "runs/a", run_dir)

    exp = ExperimentManager.load(run_dir)  # config + latest committed checkpoint
    exp.resume_training()  # finish the original plan: it is finished
    exp.resume_training(num_epochs=10, batch_size=64, train_samples=640, reconfigure_scheduler=True)

    best = ExperimentManager.load_best_model(run_dir)
    mm = best.get_model_manager()
    points = torch.randn(3, 16, 2) * 5
    centres = mm.predict(points)  # [B, N, D] -> [B, N, D], no process group needed
    assert centres.shape == points.shape
    metrics = mm.evaluate(num_samples=200)
    assert metrics["mse"] < metrics["trivial_mse"] and {"wasserstein", "kmeans_mse"} <= set(metrics)
    path = best.export_model(str(tmp_path / "exports/model.pt"))
    assert torch.load(path, weights_only=True)["model"]

    events = read_jsonl(tmp_path / "runs/a/events.jsonl")
    changed = [e for e in events if e["event"] == "config_changed"][-1]["changed"]
    assert changed["train.num_epochs"] == [5, 15] and changed["train.global_batch_size"] == [16, 64]
    assert changed["data.train_samples"] == [320, 640]
    kinds = {e["event"] for e in events}
    assert {"schedule_replanned", "epoch_length_changed"} <= kinds
    manifests = sorted((tmp_path / "runs/a/checkpoints").glob("step_*/manifest.json"))
    final = json.loads(manifests[-1].read_text())
    assert final["progress"]["epoch"] == 15 and "final" in final["tags"]
    assert final["config"]["train"]["num_epochs"] == 15  # the change persists for later resumes
    assert "already finished" in _resume_output(run_dir)


def _resume_output(run_dir):
    result = launch(["--run-dir", run_dir])
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_num_epochs_means_more_epochs_and_changes_persist(run_a, tmp_path):
    run_dir = str(tmp_path / "a")
    shutil.copytree(run_a / "runs/a", run_dir)
    exp = ExperimentManager.load(run_dir)
    exp.resume_training(num_epochs=1)
    assert exp.config.train.num_epochs == 6
    again = ExperimentManager.load(run_dir)  # reads the newest checkpoint's configuration
    assert again.config.train.num_epochs == 6
    again.resume_training()  # nothing left to do: the plan is 6 epochs now
    last = json.loads(sorted((tmp_path / "a/checkpoints").glob("step_*/manifest.json"))[-1].read_text())
    assert last["progress"]["epoch"] == 6


def test_predict_of_an_export_equals_predict_from_the_sharded_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    result = launch(["--preset", "tiny", "--run-dir", str(run_dir), "--train.max_steps=20"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = ModelManager.load(str(run_dir))
    exp = ExperimentManager.load_latest_model(str(run_dir))
    points = torch.from_numpy(np.random.default_rng(0).normal(size=(4, 16, 2)) * 4)
    for name in ("model.pt", "model.safetensors"):
        exported = ModelManager.load(str(exp.export_model(str(tmp_path / name))))
        assert torch.equal(exported.predict(points), sharded.predict(points))
    assert torch.equal(sharded.predict(points[0]), sharded.predict(points)[0])  # one set, [N, D]


def test_visualize_and_curves_write_pngs(run_a, tmp_path):
    from dtrain.plots import plot_run

    manager = ExperimentManager.load_best_model(str(run_a / "runs/a")).get_model_manager()
    for path in (
        manager.visualize(str(tmp_path / "examples.png")),
        plot_run(str(run_a / "runs/a"), str(tmp_path / "curves.png")),
    ):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_save_checkpoint_pins_a_tagged_copy_that_retention_keeps(run_a, tmp_path):
    run_dir = str(tmp_path / "a")
    shutil.copytree(run_a / "runs/a", run_dir)
    steps = [json.loads(m.read_text())["step"] for m in (tmp_path / "a/checkpoints").glob("*/manifest.json")]
    best = ExperimentManager.load_best_model(run_dir)
    with pytest.raises(ValueError, match="tag 'best'"):
        best.save_checkpoint(tag="best")
    oldest, newest = min(steps), max(steps)
    directory = ExperimentManager.load(run_dir, checkpoint=str(oldest)).save_checkpoint(tag="paper")
    manifest = json.loads((tmp_path / "a/checkpoints" / directory / "manifest.json").read_text())
    assert manifest["tags"] == ["paper"] and manifest["copy_of"] and manifest["step"] == oldest < newest
    ExperimentManager.load(run_dir).resume_training(num_epochs=3)  # many more commits and retention
    assert (tmp_path / "a/checkpoints" / directory / "manifest.json").exists()
    resumed = [e for e in read_jsonl(tmp_path / "a/events.jsonl") if e["event"] == "resume"]
    assert resumed[-1]["step"] == newest  # the copy did not move the run back to its step


def test_model_manager_scores_a_checkpoint_as_training_did(run_a):
    """Training (sharded validation on the trainer's ranks) and ModelManager share one validation."""
    run_dir = run_a / "runs/a"
    final = [json.loads(m.read_text()) for m in (run_dir / "checkpoints").glob("*/manifest.json")]
    final = max(final, key=lambda m: m["sequence"])
    scores = ModelManager.load(str(run_dir)).evaluate(num_samples=final["config"]["data"]["val_samples"])
    for ours, training in (
        ("mse", "val_mse"),
        ("wasserstein", "val_wasserstein"),
        ("trivial_mse", "trivial_mse"),
        ("kmeans_mse", "kmeans_mse"),
        ("kmeans_wasserstein", "kmeans_wasserstein"),
    ):
        assert scores[ours] == pytest.approx(final["metrics"][training], rel=1e-5), ours


def test_separated_model_and_optimizer_files_continue_training(tmp_path):
    """The framework's acceptance test: 50 steps of AdamW with linear warmup, saved as
    separate model and optimizer files, loaded into a fresh model and optimizer."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from dtrain.data import TRAIN_STREAM, make_examples, mixture_spec
    from dtrain.export import export, load_from_run, load_separate
    from dtrain.metrics import squared_error
    from dtrain.model import build_model

    config = ExperimentConfig.preset("tiny")
    config.train.max_steps, config.train.schedule, config.train.warmup_fraction = 50, "linear", 0.4
    run_dir = str(tmp_path / "run")
    ExperimentManager(config, run_dir).run()
    export(run_dir, str(tmp_path / "separate"), separate=True)

    model = build_model(config.model, config.data.dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=123.0, weight_decay=0.5, betas=(0.1, 0.2))
    header = load_separate(str(tmp_path / "separate"), model, optimizer)
    assert header["step"] == 50
    _, reference, _, _ = load_from_run(run_dir, optimizer=True)
    _, loaded = get_state_dict(model, optimizer)
    last_lr = [r["lr"] for r in read_jsonl(tmp_path / "run/metrics.jsonl") if r["kind"] == "train"][-1]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(last_lr)
    for fqn, entries in reference["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(loaded["state"][fqn][name], entries[name], rtol=0, atol=1e-6)
        assert float(loaded["state"][fqn]["step"]) == 50
    for got, want in zip(loaded["param_groups"], reference["param_groups"]):
        assert got == want  # lr, betas, eps, weight_decay, amsgrad, ... and the parameter names

    spec = mixture_spec(config.data)
    losses = []
    for step in range(50, 100):
        batch = make_examples(spec, config.data.seed, TRAIN_STREAM, np.arange(step * 16, step * 16 + 16) % 4096)
        loss = squared_error(model(batch["points"]), batch["targets"]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    before = [r["loss"] for r in read_jsonl(tmp_path / "run/metrics.jsonl") if r["kind"] == "train"][-1]
    assert 0.2 < np.mean(losses) / before < 5  # the same order of magnitude: no restart from scratch
