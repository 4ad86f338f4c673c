"""Nothing lost, nothing executed, one line for every fault: one test per class of fault.

Each test damages a run the way a user or the storage would, through the real
command line, and checks three things: the job says what is wrong in one line
(or recovers and says so), exits with the documented code, and leaves every
committed checkpoint where it was.
"""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import dtrain_tool, launch, read_jsonl

TINY = [
    "--preset",
    "tiny",
    "--train.log_interval=1",
    "--train.eval_interval=0",
    "--checkpoint.interval_steps=2",
    "--checkpoint.keep_last=2",
]
ROOT = Path(__file__).parent.parent


def one_line(result) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def committed(run_dir) -> list[str]:
    return sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step_*/manifest.json"))


def files_of(run_dir) -> dict:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished one-rank run of 8 steps, checkpoints at 4, 6, 8 (keep_last 3), none tagged best."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    result = launch(
        [
            *TINY,
            "--run-dir",
            str(run_dir),
            "--train.max_steps=8",
            "--checkpoint.keep_last=3",
            "--checkpoint.save_best=false",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert committed(run_dir) == ["step_00000004", "step_00000006", "step_00000008"]
    return run_dir


@pytest.fixture
def run_copy(base_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    return run_dir


# ---- 1. retention never drops what it just committed; a resumed older step is the current line ----
def test_resuming_an_older_step_keeps_its_new_commits_and_continues_from_them(run_copy):
    result = launch(["--run-dir", str(run_copy), "--resume", "4", "--stop-at-step", "5"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint committed" in result.stdout
    kept = committed(run_copy)
    assert "step_00000005" in kept  # the commit just made survives its own retention
    last = [e for e in read_jsonl(run_copy / "events.jsonl") if e["event"] == "checkpoint"][-1]
    assert last["directory"] == "step_00000005" and "step_00000005" not in last["removed"]
    again = launch(["--run-dir", str(run_copy), "--stop-at-step", "6"])  # latest = the newest commit
    assert "resuming from step_00000005" in again.stdout, again.stdout + again.stderr


# ---- 2. a --resume that names something missing stops with one line ----
@pytest.mark.parametrize(
    "which, words", [("best", "holds no checkpoint tagged best"), ("5", "holds no committed checkpoint at step 5")]
)
def test_resume_of_a_missing_checkpoint_is_one_line_and_changes_nothing(run_copy, which, words):
    before = files_of(run_copy)
    result = launch(["--run-dir", str(run_copy), "--resume", which])
    assert result.returncode == 2
    line = one_line(result)
    assert f"--resume={which}" in line and words in line and "committed steps: 4, 6, 8" in line
    assert files_of(run_copy) == before


# ---- 3. checkpoint directories without any committed checkpoint: never a silent restart ----
def test_a_run_whose_manifests_are_gone_is_refused_until_asked_to_restart(run_copy):
    for manifest in (run_copy / "checkpoints").glob("step_*/manifest.json"):
        manifest.unlink()
    before = files_of(run_copy)
    refused = launch(["--run-dir", str(run_copy)])
    assert refused.returncode == 2
    line = one_line(refused)
    assert "no committed checkpoint" in line and "step_00000008 (DCP files but no manifest)" in line
    assert "--resume=restart" in line
    assert files_of(run_copy) == before  # nothing deleted, nothing written
    restarted = launch(["--run-dir", str(run_copy), "--resume", "restart", "--train.max_steps=2"])
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "starting" in restarted.stdout and "over from step 0" in restarted.stdout
    for name in ("step_00000004", "step_00000006", "step_00000008"):  # left where they were
        assert (run_copy / "checkpoints" / name / ".metadata").exists()
    assert "step_00000002" in committed(run_copy)


# ---- 4. one job per run directory ----
def test_a_second_job_is_refused_and_a_dead_jobs_lease_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "dtrain.train", *TINY, "--run-dir", str(run_dir), "--train.max_steps=100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not committed(run_dir):
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()[1][-3000:]
            time.sleep(0.1)
        second = launch(["--run-dir", str(run_dir)])
        assert second.returncode == 2
        line = one_line(second)
        assert f"run directory {run_dir} is in use by another job" in line and f"pid {first.pid}" in line
        assert first.poll() is None  # the first job goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert (run_dir / "lease.json").exists()  # a killed job cannot release it
    third = launch(["--run-dir", str(run_dir), "--stop-at-step", "1"])
    assert third.returncode == 0, third.stderr[-3000:]
    assert "took over the lease" in third.stdout and "is gone" in third.stdout
    assert not (run_dir / "lease.json").exists()


# ---- 5. non-finite loss: stop, commit nothing non-finite, say where to resume ----
def test_a_diverging_run_stops_without_committing_non_finite_state(tmp_path):
    run_dir = tmp_path / "run"
    result = launch(
        [
            *TINY,
            "--run-dir",
            str(run_dir),
            "--train.max_steps=40",
            "--train.lr=1e6",
            "--train.warmup_fraction=0",
            "--checkpoint.interval_steps=1",
            "--checkpoint.keep_last=0",
            "--train.grad_clip=0",
        ]
    )
    assert result.returncode == 65, result.stdout[-2000:] + result.stderr[-2000:]
    line = one_line(result)
    assert "training diverged" in line and "nothing non-finite was saved" in line
    assert "resume from step_" in line and "--train.lr=" in line
    verdict = dtrain_tool("verify", str(run_dir))
    assert verdict.returncode == 0, verdict.stdout
    for manifest in (run_dir / "checkpoints").glob("step_*/manifest.json"):
        assert "NaN" not in manifest.read_text() and "Infinity" not in manifest.read_text()
    export = dtrain_tool("export", str(run_dir), "--out", str(tmp_path / "m.pt"))  # finite weights
    assert export.returncode == 0, export.stderr
    assert dtrain_tool("status", str(run_dir)).returncode == 65
    events = [e["event"] for e in read_jsonl(run_dir / "events.jsonl")]
    assert events[-1] == "diverged"


# ---- 6. config.json lost or garbage: the newest manifest's config, said so ----
@pytest.mark.parametrize("damage", ["missing", "empty"])  # garbage takes the path of empty
def test_an_unusable_config_json_falls_back_to_the_newest_manifest(run_copy, damage):
    config = run_copy / "config.json"
    if damage == "missing":
        config.unlink()
    else:
        config.write_text("" if damage == "empty" else "{not json")
    result = launch(["--run-dir", str(run_copy), "--train.max_steps=10"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "using the configuration recorded in step_00000008" in result.stdout
    assert "resuming from step_00000008" in result.stdout
    assert "step_00000010" in committed(run_copy)


def test_an_empty_config_json_and_no_checkpoint_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("")  # what ENOSPC during the first write leaves
    result = launch([*TINY, "--run-dir", str(run_dir)])
    assert result.returncode == 2 and "config.json is empty" in one_line(result)


# ---- 7. loading a checkpoint runs no code ----
class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_metadata_pickle_is_refused_everywhere_and_runs_nothing(run_copy, tmp_path):
    marker = tmp_path / "pwned"
    (run_copy / "checkpoints/step_00000008/.metadata").write_bytes(pickle.dumps(Payload(marker)))
    commit_as_is(run_copy / "checkpoints/step_00000008")  # the attacker controls the manifest too
    inspect = dtrain_tool("inspect", str(run_copy), "--step", "8")
    assert inspect.returncode != 0 and "not allowed" in one_line(inspect)
    for checker in ("verify", "report"):  # the run checker checks what verify checks
        found = dtrain_tool(checker, str(run_copy))
        assert found.returncode == 1 and "not allowed" in found.stdout, found.stdout
    export = dtrain_tool("export", str(run_copy), "--step", "8", "--out", str(tmp_path / "m.pt"))
    assert export.returncode == 2 and "no sound committed checkpoint" in one_line(export)
    assert "skipping step_00000008" in export.stdout and "not allowed" in export.stdout
    resumed = launch(["--run-dir", str(run_copy), "--train.max_steps=9"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint step_00000008 is unusable (.metadata" in resumed.stdout
    assert "resuming from step_00000006" in resumed.stdout
    assert not marker.exists()


def test_a_crafted_object_inside_a_shard_is_refused_and_runs_nothing(run_copy, tmp_path):
    """The small training-state objects are pickles inside a shard: point one at a payload."""
    import dataclasses
    import io

    import torch

    marker = tmp_path / "pwned"
    directory = run_copy / "checkpoints/step_00000008"
    metadata = pickle.loads((directory / ".metadata").read_bytes())  # the test trusts its own file
    key = next(k for k in metadata.storage_data if k.fqn.startswith("progress."))
    info = metadata.storage_data[key]
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)
    shard = directory / info.relative_path
    offset = shard.stat().st_size
    shard.write_bytes(shard.read_bytes() + payload.getvalue())
    metadata.storage_data[key] = dataclasses.replace(info, offset=offset, length=len(payload.getvalue()))
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    commit_as_is(directory)
    resumed = launch(["--run-dir", str(run_copy), "--train.max_steps=9"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint step_00000008 is unusable" in resumed.stdout
    assert "resuming from step_00000006" in resumed.stdout
    assert not marker.exists()


def commit_as_is(directory: Path, step: int | None = None, sequence: int | None = None) -> None:
    """Write a manifest that matches the directory's files (as an attacker could)."""
    from dtrain.checkpoint.integrity import BlockChecksum

    previous = sorted(directory.parent.glob("step_*/manifest.json"))[-1]
    manifest = json.loads(previous.read_text())
    manifest["files"] = {}
    for p in directory.iterdir():
        if p.name not in ("manifest.json", "rejected.json"):
            checksum = BlockChecksum()
            checksum.update(p.read_bytes())
            manifest["files"][p.name] = checksum.entry()
    if step is not None:
        manifest["step"] = step
    if sequence is not None:
        manifest["sequence"] = sequence
    (directory / "manifest.json").write_text(json.dumps(manifest))


# ---- 11 and 13. damaged manifests: rejected, quarantined, not counted, named ----
@pytest.mark.parametrize("content", ["describes-nothing"])  # the other shapes: the verify test below
def test_a_damaged_manifest_is_rejected_and_the_previous_checkpoint_used(run_copy, content):
    manifest = run_copy / "checkpoints/step_00000008/manifest.json"
    if content == "describes-nothing":
        values = json.loads(manifest.read_text())
        values["files"] = {".metadata": values["files"][".metadata"]}  # no shard listed
        content = json.dumps(values)
    manifest.write_text(content)
    for tool in ("verify", "inspect"):
        checked = dtrain_tool(tool, str(run_copy))
        assert checked.returncode == 1 and "step_00000008" in checked.stdout and "damaged" in checked.stdout.lower()
    resumed = launch(["--run-dir", str(run_copy), "--train.max_steps=12"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step_00000006" in resumed.stdout
    events = read_jsonl(run_copy / "events.jsonl")
    assert any(e["event"] == "checkpoint_rejected" and e["directory"] == "step_00000008" for e in events)
    # Quarantined: kept, reported, and not counted by keep_last (which keeps 3 good ones).
    assert (run_copy / "checkpoints/step_00000008/rejected.json").exists()
    good = [
        p.parent.name
        for p in (run_copy / "checkpoints").glob("step_*/manifest.json")
        if not (p.parent / "rejected.json").exists()
    ]
    assert sorted(good) == ["step_00000008_1", "step_00000010", "step_00000012"]
    assert "rejected" in dtrain_tool("inspect", str(run_copy)).stdout


@pytest.mark.parametrize(
    "content",
    [
        '{"step": 8',
        "[1, 2, 3]",
        '{"format": 2}',
        "\x00\x01",
        "null",
        '{"format": 1, "step": "8"}',
        "wrong-size",
        "unlisted-shard",
        "nan-metrics",
    ],
)
def test_every_shape_of_damaged_manifest_is_named_by_verify_and_inspect(run_copy, content):
    manifest = run_copy / "checkpoints/step_00000008/manifest.json"
    values = json.loads(manifest.read_text())
    if content == "wrong-size":
        values["files"][".metadata"]["size"] += 1
        values["files"][".metadata"]["crc32c"][-1][0] += 1  # blocks that add up to the wrong size
        content, words = json.dumps(values), ".metadata: size"
    elif content == "unlisted-shard":
        del values["files"]["__0_0.distcp"]
        values["files"]["__9_0.distcp"] = values["files"][".metadata"]
        content, words = json.dumps(values), "CORRUPT"
    elif content == "nan-metrics":
        values["metrics"] = {"val_mse": float("nan")}
        content, words = json.dumps(values), "not finite"
    else:
        words = "damaged"
    manifest.write_text(content)
    checked = dtrain_tool("verify", str(run_copy))
    assert checked.returncode == 1 and "step_00000008: " in checked.stdout and words in checked.stdout, checked.stdout
    assert dtrain_tool("verify", str(run_copy), "6").returncode == 0


# ---- 12. the exit code reaches whoever restarts the job ----
def test_the_local_launch_script_returns_75_on_a_preemption(tmp_path):
    run_dir = tmp_path / "run"
    script = subprocess.Popen(
        ["bash", str(ROOT / "launch/local.sh"), *TINY, "--train.max_steps=100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={
            **os.environ,
            "RUN_DIR": str(run_dir),
            "NPROC": "2",
            "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        },
    )
    deadline = time.monotonic() + 120
    while not committed(run_dir):
        assert time.monotonic() < deadline and script.poll() is None
        time.sleep(0.1)
    os.kill(script.pid, signal.SIGTERM)  # a node's shutdown notice to the launch script
    output, _ = script.communicate(timeout=120)
    assert script.returncode == 75, output[-3000:]
    assert dtrain_tool("status", str(run_dir)).returncode == 75


# ---- what a hostile user found (second adversarial pass), by class ----
def test_a_metadata_pickle_reaching_os_through_an_allowed_module_is_refused(run_copy, tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps(Payload(marker), protocol=4)
    data = data.replace(
        b"\x8c\x05posix\x94\x8c\x06system",  # the same call, named through DCP's module
        b"\x8c%torch.distributed.checkpoint.metadata\x94\x8c\x09os.system",
    )
    (run_copy / "checkpoints/step_00000008/.metadata").write_bytes(data)
    commit_as_is(run_copy / "checkpoints/step_00000008")
    assert dtrain_tool("inspect", str(run_copy), "--step", "8").returncode != 0
    verdict = dtrain_tool("verify", str(run_copy), "8")
    assert verdict.returncode == 1 and "not allowed" in verdict.stdout
    resumed = launch(["--run-dir", str(run_copy), "--train.max_steps=9"])
    assert resumed.returncode == 0 and "resuming from step_00000006" in resumed.stdout, resumed.stderr[-2000:]
    assert not marker.exists()


def test_retention_touches_only_what_dtrain_wrote(run_copy, tmp_path):
    """A run kept inside checkpoints/, a link to another run's checkpoint, a stray file: never touched."""
    nested = run_copy / "checkpoints/step_00000001"
    nested.mkdir()
    (nested / "config.json").write_text("{}")
    other = tmp_path / "other/step_00000002"
    other.mkdir(parents=True)
    (other / "manifest.json").write_text("precious")
    (run_copy / "checkpoints/step_00000003").symlink_to(other)
    (run_copy / "checkpoints/step_00000005").write_text("a file")
    result = launch(["--run-dir", str(run_copy), "--train.max_steps=14", "--checkpoint.keep_last=1"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (nested / "config.json").read_text() == "{}" and (other / "manifest.json").read_text() == "precious"
    assert (run_copy / "checkpoints/step_00000005").read_text() == "a file"
    assert "not a checkpoint" in dtrain_tool("verify", str(run_copy)).stdout


def test_an_export_never_writes_into_the_run(run_copy, tmp_path):
    before = files_of(run_copy)
    for out in (run_copy / "checkpoints/step_00000008/__0_0.distcp", run_copy / "config.json", tmp_path, ""):
        result = dtrain_tool("export", str(run_copy), "--out", str(out))
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert files_of(run_copy) == before
    assert dtrain_tool("export", str(run_copy), "--out", str(run_copy / "exports/m.pt")).returncode == 0


def test_a_save_killed_while_committing_does_not_block_the_next_start(run_copy):
    """DCP's files complete, no manifest, never recorded as committed: a crashed save, not a lost one."""
    for name in ("step_00000004", "step_00000006", "step_00000008"):
        (run_copy / "checkpoints" / name / "manifest.json").unlink()
    events = [e for e in read_jsonl(run_copy / "events.jsonl") if e["event"] != "checkpoint"]
    (run_copy / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    result = launch(["--run-dir", str(run_copy), "--train.max_steps=4"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert committed(run_copy) == ["step_00000002", "step_00000004"]  # the crashed saves were removed


def test_hostile_values_and_files_are_one_line(run_copy, tmp_path):
    (run_copy / "lease.json").write_text('{"id": "x", "renewed": "abc", "pid": "abc"}')
    taken = launch(["--run-dir", str(run_copy), "--train.max_steps=9"])
    assert taken.returncode == 0 and "unreadable" in taken.stdout, taken.stderr[-2000:]
    for args in (["--resume", "\u00b2"], ["--data.seed=1180591620717411303424"], ["--run-dir", "nosuch://x"]):
        result = launch(["--run-dir", str(tmp_path / "new"), *args])
        assert result.returncode == 2, result.stderr[-2000:]
        one_line(result)
    (tmp_path / "garbage.pt").write_text("not a model")
    evaluated = dtrain_tool("evaluate", str(tmp_path / "garbage.pt"))
    assert evaluated.returncode == 2 and "is not a dtrain export" in evaluated.stderr


# ---- what a third adversarial pass found, by class ----
@pytest.mark.parametrize("tool", ["inspect", "verify", "report", "plot", "status", "export", "evaluate"])
def test_every_tool_exits_2_on_a_run_that_is_not_there(tool, tmp_path):
    extra = {"plot": ["--out", str(tmp_path / "p.png")], "export": ["--out", str(tmp_path / "m.pt")]}
    result = dtrain_tool(tool, str(tmp_path / "nothere"), *extra.get(tool, []))
    assert result.returncode == 2 and "nothere" in one_line(result)
    assert not (tmp_path / "nothere").exists()


@pytest.mark.parametrize(
    "values",
    [
        ["--data.box=1e300"],
        ["--data.min_snr=1e-300"],
        ["--data.weight_concentration=1e308"],
        ["--model.width=100000000", "--model.heads=1"],
    ],
)
def test_data_that_cannot_be_finite_and_a_model_that_cannot_fit_are_one_line_before_anything_is_written(
    values, tmp_path
):
    result = launch([*TINY, "--run-dir", str(tmp_path / "run"), *values])
    assert result.returncode == 2 and values[0].split("=")[0] in one_line(result)
    assert not (tmp_path / "run").exists()


def test_a_shared_lease_let_go_by_a_finished_group_is_held_again_by_one_still_training(tmp_path):
    """Replica groups share the job's lease; the writer of the last step deletes it. A group that
    healed as the job ended trains its last steps alone after that: its commit holds the run again
    (CI saw exit 74, "another job took over", here), and another job is still kept out."""
    from dtrain.errors import ConfigError
    from dtrain.lease import LEASE, RunLease
    from dtrain.rundir import RunDirectory

    (tmp_path / "run").mkdir()
    run = RunDirectory(str(tmp_path / "run"))
    finished, still_training = RunLease(run, job_id="torchft:job-1"), RunLease(run, job_id="torchft:job-1")
    finished.acquire(), still_training.acquire()
    finished.release(job_over=True)
    assert not (tmp_path / "run" / LEASE).exists()
    still_training.check()
    with pytest.raises(ConfigError, match="in use by another job"):
        RunLease(run).acquire()
    still_training.release(job_over=True)
    assert not (tmp_path / "run" / LEASE).exists()
