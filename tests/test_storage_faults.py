"""Storage that fails: full, read-only, not a directory, stalled, refused, unreachable, wrong
bucket, wrong credentials. Each ends the job with one line naming the URL and the cause, a
non-zero exit, in bounded time, and every committed checkpoint as it was."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import dtrain_tool, launch
from faultproxy import FaultProxy
from s3server import S3_REQUESTS

TINY = ["--preset", "tiny", "--train.log_interval=1", "--train.eval_interval=0", "--checkpoint.interval_steps=2"]
EXIT_STORAGE = 74


def one_line(result) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout[-1000:] + result.stderr[-3000:]
    return lines[0]


@pytest.fixture
def small_disk(tmp_path):
    """A 1.4 MB file system of its own (tmpfs): room for two tiny checkpoints, not three."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def test_a_full_disk_stops_with_one_line_and_keeps_the_committed_checkpoints(small_disk):
    run_dir = small_disk / "run"
    result = launch([*TINY, "--run-dir", str(run_dir), "--train.max_steps=12"])
    assert result.returncode == EXIT_STORAGE
    line = one_line(result)
    assert str(run_dir) in line and "no space left on device" in line
    verify = dtrain_tool("verify", str(run_dir))
    assert verify.returncode == 0 and verify.stdout.count(": ok") >= 2, verify.stdout


def test_a_read_only_run_directory_stops_with_one_line_and_changes_nothing(small_disk):
    run_dir = small_disk / "run"
    assert launch([*TINY, "--run-dir", str(run_dir), "--train.max_steps=2"]).returncode == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = launch(["--run-dir", str(run_dir), "--train.max_steps=4"])
    assert result.returncode == EXIT_STORAGE
    assert "read-only file system" in one_line(result)
    assert before == {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


@pytest.mark.parametrize("form", ["file", "below a file", "empty", "root"])
def test_run_directories_that_cannot_be_one_are_refused(tmp_path, form):
    (tmp_path / "f").write_text("x")
    run_dir = {"file": str(tmp_path / "f"), "below a file": str(tmp_path / "f/run"), "empty": "", "root": "/"}[form]
    result = launch([*TINY, "--run-dir", run_dir])
    assert result.returncode in (2, EXIT_STORAGE)
    assert "--run-dir" in one_line(result) or "not a directory" in one_line(result)
    assert (tmp_path / "f").read_text() == "x" and not Path("/checkpoints").exists()


def test_every_spelling_of_a_local_run_directory_names_the_same_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = launch([*TINY, "--run-dir", "runs/a/", "--train.max_steps=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    again = launch(["--run-dir", f"file://{tmp_path}/runs/a", "--train.max_steps=4"])
    assert again.returncode == 0 and "resuming from step_00000002" in again.stdout, again.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs/a").iterdir()) == [
        "checkpoints",
        "config.json",
        "events.jsonl",
        "metrics.jsonl",
    ]


# ---- object storage ---------------------------------------------------------------------------
@pytest.fixture
def proxy(s3_env):
    port = int(s3_env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    proxy = FaultProxy(("127.0.0.1", port)).start()
    yield proxy
    proxy.close()


def s3_launch(args, proxy, env_extra=None):
    """The job with the endpoint given only by --checkpoint.endpoint_url (the proxy)."""
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL")}
    env.update({"OMP_NUM_THREADS": "1", "AWS_EC2_METADATA_DISABLED": "true", **(env_extra or {})})
    command = [
        sys.executable,
        "-m",
        "dtrain.train",
        *args,
        f"--checkpoint.endpoint_url={proxy.url}",
        "--checkpoint.storage_timeout=1",
        "--checkpoint.storage_retries=2",
    ]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    return result, time.monotonic() - started


def test_the_explicit_endpoint_serves_every_file_and_a_stall_ends_in_bounded_time(proxy, s3_env):
    import s3fs

    url = "s3://dtrain-test/stall"
    first, _ = s3_launch([*TINY, "--run-dir", url, "--train.max_steps=4"], proxy)
    assert first.returncode == 0, first.stderr[-3000:]  # config, events, metrics, checkpoints: all via the flag
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    assert {"config.json", "events", "metrics"} <= {p.rsplit("/", 1)[-1] for p in fs.ls(url)}  # logs in parts
    before = {p: fs.cat(p) for p in fs.find(f"{url}/checkpoints")}
    proxy.mode = "stall"
    stalled, seconds = s3_launch(["--run-dir", url, "--train.max_steps=8"], proxy)
    assert stalled.returncode == EXIT_STORAGE
    line = one_line(stalled)
    assert url in line and "did not answer in time" in line
    assert seconds < 60  # 1 s per request, 2 attempts: not the 420 s of the default settings
    proxy.mode = "pass"
    fs.invalidate_cache()
    assert {p: fs.cat(p) for p in fs.find(f"{url}/checkpoints")} == before


@pytest.mark.parametrize(
    "fault, words",
    [
        ("refuse", "connect"),
        ("closed port", "cannot connect to the storage endpoint"),
        ("no bucket", "bucket does not exist"),
    ],
)
def test_unreachable_or_wrong_storage_is_one_line(proxy, fault, words):
    url = "s3://no-such-bucket-here/run" if fault == "no bucket" else "s3://dtrain-test/unreachable"
    proxy.mode = "refuse" if fault == "refuse" else "pass"
    if fault == "closed port":
        proxy.close()
    result, _ = s3_launch([*TINY, "--run-dir", url], proxy)
    assert result.returncode == EXIT_STORAGE
    line = one_line(result)
    assert url.split("/")[2] in line and words in line, line


def test_malformed_endpoint_is_refused_before_anything_is_written(tmp_path):
    result = launch([*TINY, "--run-dir", "s3://dtrain-test/bad", "--checkpoint.endpoint_url=localhost:9000"])
    assert result.returncode == 2 and "is not an http(s) URL" in one_line(result)


def test_credentials_the_server_refuses_are_one_line(tmp_path):
    """A second S3 server that checks credentials (moto with authentication on)."""
    server = subprocess.Popen(
        [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
    )
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            if "Running on http://127.0.0.1:" in line:
                port = int(line.rsplit(":", 1)[1].split()[0].strip("/"))
        assert port, "moto did not start"
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": "nobody",
            "AWS_SECRET_ACCESS_KEY": "wrong",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "dtrain.train",
                *TINY,
                "--run-dir",
                "s3://any/run",
                f"--checkpoint.endpoint_url=http://127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert result.returncode == EXIT_STORAGE
        line = one_line(result)
        assert "s3://any/run" in line and ("refused access" in line or "refused the credentials" in line)
    finally:
        server.kill()
        server.communicate()


def test_a_read_cut_mid_range_is_retried_and_one_that_keeps_failing_is_one_line(proxy, s3_env):
    import torch
    import torch.distributed.checkpoint as dcp

    from dtrain.checkpoint.storage import Storage, guard
    from dtrain.errors import StorageError

    url = "s3://dtrain-test/cut"
    state = {"w": torch.randn(1024, 256), "v": torch.randn(64)}  # a 1 MB file: one coalesced range
    writer = Storage().writer(url)
    dcp.save(state, storage_writer=writer, no_dist=True)
    through_proxy = Storage(endpoint_url=proxy.url, timeout_s=2, retries=3)

    def load() -> dict:
        loaded = {"w": torch.zeros(1024, 256), "v": torch.zeros(64)}
        with guard("loading checkpoint", url):
            dcp.load(loaded, storage_reader=through_proxy.reader(url, writer.written), no_dist=True)
        return loaded

    proxy.mode, proxy.cut_after, proxy.cuts = "cut", 300_000, 1  # one answer ends 300 KB in
    S3_REQUESTS.clear()
    loaded = load()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    shard_gets = [r for r in S3_REQUESTS if r.method == "GET" and r.path.endswith(".distcp")]
    assert len(shard_gets) == 2 and shard_gets[0].received == shard_gets[1].received > 1 << 20  # asked again
    proxy.cuts = 1000  # every answer cut: retried, then the load stops in one line
    started = time.monotonic()
    with pytest.raises(StorageError) as failed:
        load()
    assert url in str(failed.value) and "\n" not in str(failed.value), str(failed.value)
    assert time.monotonic() - started < 60
