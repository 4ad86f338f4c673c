"""Checkpoint bytes on object storage, counted by the S3 server: a save reads nothing back, a
same-size load reads each shard byte at most once, a resharded load just the rows it needs, all
checked."""

import subprocess
import sys

from conftest import launch
from s3server import S3_REQUESTS

URL = "s3://dtrain-test/run-io"
ARGS = [
    "--preset",
    "tiny",
    "--model.width=128",
    "--model.layers=4",
    "--model.heads=4",  # ~10 MB of shards
    "--train.log_interval=1",
    "--train.eval_interval=0",
    "--checkpoint.interval_steps=4",
    "--run-dir",
    URL,
]


def shard_gets(step: int) -> dict[str, list[int]]:
    """Bytes of each GET of a shard of ``step``'s checkpoint, by file."""
    gets: dict[str, list[int]] = {}
    for r in S3_REQUESTS:
        if r.method == "GET" and f"/run-io/checkpoints/step_{step:08d}/" in r.path and r.path.endswith(".distcp"):
            gets.setdefault(r.path.rsplit("/", 1)[-1], []).append(r.received)
    return gets


def test_saves_read_nothing_back_and_loads_read_each_byte_once(s3_env):
    from dtrain.rundir import RunDirectory

    S3_REQUESTS.clear()
    first = launch([*ARGS, "--train.max_steps=4"], nproc=2, env=s3_env)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = "/run-io/checkpoints/step_00000004/"
    written = {r.path.rsplit("/", 1)[-1] for r in S3_REQUESTS if r.method == "PUT" and checkpoint in r.path}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "manifest.json"} <= written
    read_back = [
        r for r in S3_REQUESTS if r.method == "GET" and checkpoint in r.path and not r.path.endswith("manifest.json")
    ]
    assert not read_back, f"the save read back {[(r.path, r.received) for r in read_back]}"

    sizes = {name: entry["size"] for name, entry in RunDirectory(URL).catalog().scan().committed[-1].files.items()}
    assert sizes["__0_0.distcp"] > 3 << 20  # shards large enough for several checksum blocks

    S3_REQUESTS.clear()
    same = launch([*ARGS, "--train.max_steps=6"], nproc=2, env=s3_env)
    assert same.returncode == 0, same.stderr[-3000:]
    gets = shard_gets(4)
    shards = {n: s for n, s in sizes.items() if n.endswith(".distcp")}
    # Each rank reads its own file in one request (all but the last item's archive trailer),
    # and the other's objects and unsharded tensors (written first in each file, so one
    # request); nothing else.
    assert all(0.99 * shards[name] <= max(b) <= shards[name] for name, b in gets.items()), gets
    assert all(len(b) <= 2 for b in gets.values()), gets
    total = sum(shards.values())
    assert total * 0.99 <= sum(map(sum, gets.values())) <= 1.02 * total, gets

    S3_REQUESTS.clear()
    resharded = launch([*ARGS, "--train.max_steps=8", "--train.global_batch_size=12"], nproc=3, env=s3_env)
    assert resharded.returncode == 0, resharded.stderr[-3000:]
    assert "resuming from step_00000006 (step 6, saved on 2 ranks) on 3 ranks" in resharded.stdout
    resharded_gets = shard_gets(6)
    read = sum(map(sum, resharded_gets.values()))
    # A rank needs a range of rows of every item; the rows between are 32-128 KB here, far under
    # what a GET's latency costs in bandwidth (30 ms x 90 MB/s: the cost model in dcp_io.py), so
    # they are read through: few requests, at most the whole of both files for the middle rank.
    assert sum(map(len, resharded_gets.values())) <= 2 * sum(map(len, gets.values())), resharded_gets
    assert 0.99 * total <= read <= 2.1 * total, read / total  # and the objects every rank reads

    events = RunDirectory(URL).events()
    assert [e["event"] for e in events if e["event"] in ("start", "resume", "end")] == [
        "start",
        "end",
        "resume",
        "end",
        "resume",
        "end",
    ]
    verdict = subprocess.run(
        [sys.executable, "-m", "dtrain.cli", "verify", URL],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, **s3_env},
    )
    assert verdict.returncode == 0 and verdict.stdout.count(": ok") == 3, verdict.stdout + verdict.stderr
