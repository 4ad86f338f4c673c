"""Nodes of an elastic job on one machine, for tests/test_elastic.py and benchmarks/elastic.py.

Each node is `launch/elastic.sh` with one worker; the rendezvous store runs in a
process of its own (docs/elastic.md, "Where the store lives"), so any node may be lost.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent  # torchrun and python of this environment
RDZV_CONF = "join_timeout=60,last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3"


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous_store(port: int) -> subprocess.Popen:
    script = (
        "import sys, time; from torch.distributed import TCPStore; "
        "store = TCPStore('127.0.0.1', int(sys.argv[1]), is_master=True, wait_for_workers=False); "
        "print('ready', flush=True); time.sleep(3600)"
    )
    store = subprocess.Popen([sys.executable, "-c", script, str(port)], stdout=subprocess.PIPE, text=True)
    assert store.stdout.readline().strip() == "ready"
    return store


def node(
    run_dir,
    port: int,
    args: list[str],
    log,
    nnodes: str = "1:2",
    job_id: str = "elastic-test",
    rdzv_conf: str = RDZV_CONF,
    env: dict | None = None,
) -> subprocess.Popen:
    """One node, one worker. Output goes to a file: a pipe nobody reads while the job runs would
    fill and block it."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "NNODES": nnodes,
        "NPROC": "1",
        "RESTARTS": "5",
        "RDZV_ENDPOINT": f"127.0.0.1:{port}",
        "JOB_ID": job_id,
        "RUN_DIR": str(run_dir),
        "RDZV_CONF": rdzv_conf,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        **(env or {}),
    }
    return subprocess.Popen(
        ["bash", str(ROOT / "launch/elastic.sh"), *args],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )


def children(pid: int) -> list[int]:
    out = subprocess.run([shutil.which("pgrep") or "pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return sorted(int(child) for child in out.split())


def kill_node(script: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """``sig`` to a whole node: the script, its agent and the workers (torchrun starts each worker
    in a session of its own, so the node's process group does not hold them)."""
    tree, frontier = [], [script.pid]
    while frontier:
        tree += frontier
        frontier = [child for pid in frontier for child in children(pid)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    if sig == signal.SIGKILL:
        script.wait()


def kill_nodes(scripts) -> None:
    """SIGKILL of every node still running (a test's or benchmark's clean-up)."""
    for script in scripts:
        if script.poll() is None:
            kill_node(script)
