"""Torn and corrupt checkpoints are never loaded; the previous committed one is."""

import shutil
import subprocess
import sys

import pytest
from conftest import dtrain_tool, launch, read_jsonl, torchrun_script

from dtrain.checkpoint.catalog import CheckpointCatalog
from dtrain.checkpoint.manifest import MANIFEST, Manifest

TINY = [
    "--preset",
    "tiny",
    "--train.log_interval=1",
    "--train.eval_interval=0",
    "--checkpoint.interval_steps=2",
    "--checkpoint.keep_last=2",
]


def checkpoint_dirs(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_sigkill_of_a_rank_mid_save_leaves_a_torn_checkpoint_that_is_never_loaded(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "--run-dir", str(run_dir), "--train.max_steps=8"]
    crashed = torchrun_script("crash_in_save.py", args, nproc=2, env={"DTRAIN_TEST_KILL_IN": "step_00000006"})
    assert crashed.returncode != 0
    assert checkpoint_dirs(run_dir) == ["step_00000002", "step_00000004", "step_00000006"]
    assert not (run_dir / "checkpoints/step_00000006" / MANIFEST).exists()
    listing = dtrain_tool("inspect", str(run_dir)).stdout
    assert "step_00000006          torn" in listing
    assert "step_00000006: torn: no manifest" in dtrain_tool("verify", str(run_dir)).stdout

    resumed = launch([*args], nproc=4)  # restarted on another world size
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step_00000004 (step 4, saved on 2 ranks) on 4 ranks" in resumed.stdout
    # The torn directory was replaced by a committed one, and retention kept the last two.
    assert checkpoint_dirs(run_dir) == ["step_00000006", "step_00000008"]
    assert (run_dir / "checkpoints/step_00000006" / MANIFEST).exists()
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]  # steps 5-6 ran before the crash, and again after


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """One 2-rank run of 6 steps (checkpoints at 4 and 6), built once: each test damages a copy."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = launch([*TINY, "--run-dir", str(run_dir), "--train.max_steps=6"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture
def finished_run(two_rank_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_rank_run, run_dir)
    return run_dir


def damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0x01
        path.write_bytes(data)


@pytest.mark.parametrize(
    "how, reason, nproc", [("truncate", "size", 2), ("flip", "CRC32C of bytes", 2), ("flip", "CRC32C of bytes", 1)]
)
def test_a_damaged_shard_is_named_by_verify_and_resume_falls_back(finished_run, how, reason, nproc):
    """A wrong size is found before loading; a flipped byte as the load (same size or resharded)
    reads it."""
    run_dir = finished_run
    damage(run_dir / "checkpoints/step_00000006/__1_0.distcp", how)
    verdict = dtrain_tool("verify", str(run_dir), "6")
    assert verdict.returncode == 1
    assert f"step_00000006: CORRUPT: __1_0.distcp: {reason}" in verdict.stdout
    assert dtrain_tool("verify", str(run_dir), "4").returncode == 0

    resumed = launch(["--run-dir", str(run_dir), "--train.max_steps=8"], nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint step_00000006 is unusable (__1_0.distcp" in resumed.stdout
    assert "resuming from step_00000004" in resumed.stdout
    events = read_jsonl(run_dir / "events.jsonl")
    assert any(e["event"] == "fallback" and e["rejected"] == ["step_00000006"] for e in events)


def test_checkpoints_load_with_plain_pytorch_and_exports_with_weights_only(finished_run, tmp_path):
    export = tmp_path / "model.pt"
    assert dtrain_tool("export", str(finished_run), "--out", str(export)).returncode == 0
    assert (
        dtrain_tool(
            "export",
            str(finished_run),
            "--step",
            "best",
            "--format",
            "safetensors",
            "--out",
            str(tmp_path / "model.safetensors"),
        ).returncode
        == 0
    )
    separate = dtrain_tool("export", str(finished_run), "--separate", "--out", str(tmp_path / "sep"))
    assert separate.returncode == 0, separate.stderr
    script = f"""
import sys, torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
dcp_to_torch_save({str(finished_run / "checkpoints/step_00000006")!r}, {str(tmp_path / "full.pt")!r})
full = torch.load({str(tmp_path / "full.pt")!r}, weights_only=False)
export = torch.load({str(export)!r}, weights_only=True)
optimizer = torch.load({str(tmp_path / "sep/optimizer.pt")!r}, weights_only=True)["optimizer"]
model = full["model"]
assert model.keys() == export["model"].keys(), (model.keys(), export["model"].keys())
assert all(torch.equal(model[k], export["model"][k]) for k in model)
adam = full["optimizer"]["state"]
assert all(torch.equal(adam[k]["exp_avg"], optimizer["state"][k]["exp_avg"]) for k in adam)
assert "dtrain" not in sys.modules
print("plain", len(model))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "plain" in result.stdout


def fake_checkpoint(catalog, step, tags=(), commit=True):
    """A directory with DCP-shaped files; committed with a manifest that describes them."""
    import hashlib

    name = f"step_{step:08d}"
    directory = catalog.directory(name)
    catalog.fs.makedirs(directory, exist_ok=True)
    catalog.fs.pipe_file(f"{directory}/__0_0.distcp", b"x")
    if commit:
        catalog.fs.pipe_file(f"{directory}/.metadata", b"m")
        files = {
            n: {"size": 1, "sha256": hashlib.sha256(c).hexdigest()}
            for n, c in (("__0_0.distcp", b"x"), (".metadata", b"m"))
        }
        manifest = Manifest(
            step=step,
            tags=list(tags),
            progress={},
            world_size=1,
            global_batch_size=1,
            micro_batch_size=1,
            config_fingerprint="",
            files=files,
            sequence=catalog.next_sequence(),
        )
        catalog.write_manifest(name, manifest.to_json())


def test_retention_keeps_last_best_every_mth_and_removes_torn(tmp_path):
    catalog = CheckpointCatalog(str(tmp_path / "checkpoints"), keep_last=2, keep_every=40)
    for step in (10, 20, 30, 40, 50, 60):
        fake_checkpoint(catalog, step, tags=["best"] if step == 20 else [])
    fake_checkpoint(catalog, 55, commit=False)  # a crashed save: no .metadata
    removed = catalog.apply_retention()
    assert sorted(removed) == ["step_00000010", "step_00000030", "step_00000055"]
    listing = catalog.scan()
    assert [m.step for m in listing.committed] == [20, 40, 50, 60] and not listing.torn
    # The newest is kept even with keep_last=1, and a fresh best replaces the old one.
    catalog.keep_last, catalog.keep_every = 1, 0
    fake_checkpoint(catalog, 70, tags=["best"])
    catalog.apply_retention()
    assert [m.step for m in catalog.scan().committed] == [70]


def test_retention_counts_commits_in_commit_order_and_keeps_what_may_be_a_lost_commit(tmp_path):
    catalog = CheckpointCatalog(str(tmp_path / "checkpoints"), keep_last=2)
    for step in (10, 20, 30):
        fake_checkpoint(catalog, step)
    fake_checkpoint(catalog, 15)  # resumed from 10: committed after 30, the newest commit
    catalog.fs.rm_file(catalog.directory("step_00000020/manifest.json"))  # complete files, no manifest
    removed = catalog.apply_retention()
    assert removed == ["step_00000010"]
    listing = catalog.scan()
    assert [m.step for m in listing.committed] == [30, 15]  # 15 just committed: kept, and "latest"
    assert listing.candidates("latest")[0].step == 15
    assert listing.torn == {"step_00000020": True}  # never removed automatically


def test_a_scan_reads_only_manifests_it_has_not_parsed_and_sees_a_rewritten_one(tmp_path):
    for step in (10, 20, 30):
        fake_checkpoint(CheckpointCatalog(str(tmp_path / "checkpoints")), step)
    catalog = CheckpointCatalog(str(tmp_path / "checkpoints"), keep_last=5)
    reads = []
    read = catalog.fs.cat_file
    catalog.fs.cat_file = lambda path, *a, **k: reads.append(path.rsplit("/", 2)[-2]) or read(path, *a, **k)
    catalog.scan()
    fake_checkpoint(catalog, 40)
    catalog.scan(), catalog.scan()  # as a save's scans (a free name, the sequence, retention)
    assert reads == ["step_00000010", "step_00000020", "step_00000030", "step_00000040"]
    reads.clear()
    text = catalog.fs.cat_file(catalog.directory("step_00000020/manifest.json"))
    catalog.write_manifest("step_00000020", text.decode().replace('"tags":[]', '"tags":["mine"]'))
    listing = catalog.scan()
    assert reads == ["step_00000020", "step_00000020"]  # the read just above, then the changed file only
    assert [m.tags for m in listing.committed] == [[], ["mine"], [], []]


def test_async_saves_hold_the_state_of_their_step(tmp_path):
    """Training goes on while an async save copies and writes the state: it must still capture
    its own step's weights and optimizer state, even when the copy is slower than a step."""
    import torch

    from dtrain.export import load_from_run

    runs = {}
    for mode in ("false", "true"):
        run_dir = tmp_path / f"async_{mode}"
        args = [
            *TINY,
            "--run-dir",
            str(run_dir),
            "--train.max_steps=6",
            "--checkpoint.keep_last=0",
            f"--checkpoint.async_save={mode}",
        ]
        result = torchrun_script("slow_staging.py", args, nproc=2, env={"DTRAIN_TEST_STAGING_DELAY": "1.0"})
        assert result.returncode == 0, result.stderr[-3000:]
        runs[mode] = run_dir
    saves = [e for e in read_jsonl(runs["true"] / "events.jsonl") if e["event"] == "checkpoint"]
    assert [(e["step"], e["mode"]) for e in saves] == [(2, "async"), (4, "async"), (6, "sync")]
    assert all(e["blocked_s"] < 1.0 for e in saves[:2]), saves  # the delayed copy ran in the background
    for step in ("2", "4", "6"):
        sync_model, sync_optim = load_from_run(str(runs["false"]), step, optimizer=True)[:2]
        async_model, async_optim = load_from_run(str(runs["true"]), step, optimizer=True)[:2]
        assert all(torch.equal(v, async_model.state_dict()[k]) for k, v in sync_model.state_dict().items())
        for key, state in sync_optim["state"].items():
            assert all(torch.equal(v, async_optim["state"][key][name]) for name, v in state.items())


def test_epoch_and_time_intervals(tmp_path):
    run_dir = tmp_path / "epochs"
    result = launch(
        [
            "--preset",
            "tiny",
            "--run-dir",
            str(run_dir),
            "--data.train_samples=40",
            "--train.max_steps=10",
            "--checkpoint.interval_steps=0",
            "--checkpoint.interval_epochs=1",
            "--checkpoint.keep_last=0",
            "--train.eval_interval=0",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saves = [e["step"] for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "checkpoint"]
    assert saves == [3, 5, 8, 10]  # 16-sample steps cross epochs of 40 at steps 3, 5, 8; final at 10
    run_dir = tmp_path / "seconds"
    result = launch(
        [
            "--preset",
            "tiny",
            "--run-dir",
            str(run_dir),
            "--train.max_steps=4",
            "--checkpoint.interval_steps=0",
            "--checkpoint.interval_seconds=0.000001",
            "--checkpoint.keep_last=0",
            "--train.eval_interval=0",
        ],
        nproc=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saves = [e["step"] for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "checkpoint"]
    assert saves == [1, 2, 3, 4]


def test_resuming_an_older_step_never_writes_over_a_newer_checkpoint(finished_run):
    run_dir = finished_run
    step_6 = {p.name: p.read_bytes() for p in (run_dir / "checkpoints/step_00000006").iterdir()}
    # On 2 ranks: rank 0 names the new directory and every rank writes its shard into it.
    result = launch(
        ["--run-dir", str(run_dir), "--resume", "4", "--train.max_steps=7", "--checkpoint.keep_last=0"], nproc=2
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from step_00000004" in result.stdout
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoints/step_00000006").iterdir()} == step_6
    assert checkpoint_dirs(run_dir) == ["step_00000004", "step_00000006", "step_00000006_1", "step_00000007"]
    again = launch(["--run-dir", str(run_dir), "--resume", "best"])  # one process: it only reads
    assert again.returncode == 0 and "already finished at step 7" in again.stdout, again.stdout


def test_resume_refuses_a_step_that_is_not_there_and_a_new_model_shape(finished_run):
    before = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    missing = launch(["--run-dir", str(finished_run), "--resume", "5"])
    assert missing.returncode == 2 and "no committed checkpoint at step 5" in missing.stderr
    reshaped = launch(["--run-dir", str(finished_run), "--model.width=64"])
    assert reshaped.returncode == 2
    assert "--model.width=64 differs from the run's 32" in reshaped.stderr
    assert before == {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}


def test_the_commit_gather_brings_every_share_to_rank_0_and_a_failure_on_any_rank_to_all():
    result = torchrun_script("agreed_gather.py", [], nproc=3)
    assert result.returncode == 0, result.stderr[-3000:]
    said = ["rank 0 got [0, 10, 20]", "rank 1 got None", "rank 2 got None"]
    said += [f"rank {r} raised StorageError: the store on rank 1 failed" for r in range(3)]
    assert all(words in result.stdout for words in said), result.stdout  # the ranks' lines interleave
