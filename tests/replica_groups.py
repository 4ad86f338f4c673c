"""Replica groups of a torchft job on one machine, for tests/test_replicas.py and
benchmarks/goodput.py: a real lighthouse, and one real torchrun per group."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

from loopback_nodes import BIN, ROOT, free_port, kill_node, wait_for  # noqa: F401  (re-exported)


@contextlib.contextmanager
def lighthouse(min_replicas: int = 1, join_timeout_ms: int = 500, heartbeat_timeout_ms: int = 2000):
    """A torchft lighthouse on loopback; yields its URL."""
    port = free_port()
    process = subprocess.Popen(
        [
            str(BIN / "torchft_lighthouse"),
            "--min_replicas",
            str(min_replicas),
            "--quorum_tick_ms",
            "50",
            "--join_timeout_ms",
            str(join_timeout_ms),
            "--heartbeat_timeout_ms",
            str(heartbeat_timeout_ms),
            "--bind",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


def group(
    url: str,
    replica_id: int,
    args: list[str],
    log: Path,
    nproc: int = 1,
    env: dict | None = None,
    script: Path | None = None,
) -> subprocess.Popen:
    """One replica group: ``torchrun --standalone`` of ``nproc`` ranks of dtrain.train (or of a
    helper ``script`` that wraps it). Output goes to ``log``."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHFT_LIGHTHOUSE": url, "RUST_LOG": "warn", **(env or {})}
    if script is None:  # the launch script users run
        full_env.update(
            LIGHTHOUSE=url.removeprefix("http://"),
            REPLICA_ID=str(replica_id),
            NPROC=str(nproc),
            PATH=f"{BIN}:{os.environ['PATH']}",
        )
        command = ["bash", str(ROOT / "launch/replicas.sh"), *args]
    else:
        command = [
            str(BIN / "torchrun"),
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(script),
            *args,
            "--fault_tolerance.enable=true",
            f"--fault_tolerance.replica_id={replica_id}",
        ]
    return subprocess.Popen(
        command, stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True, env=full_env, cwd=ROOT
    )


def committed_step(run_dir: Path) -> int:
    """The newest step the writer logged (log_interval=1), -1 before the first."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines if line.endswith("}")]  # the last may be half-written
    return max((r["step"] for r in records if r["kind"] == "train"), default=-1)
