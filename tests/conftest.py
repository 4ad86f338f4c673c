import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def launch(args, nproc: int | None = None, timeout: float = 300, env: dict | None = None):
    """Run ``python -m dtrain.train`` (nproc None) or real ``torchrun --nproc_per_node=nproc``."""
    if nproc is None:
        command = [sys.executable, "-m", "dtrain.train", *args]
    else:
        command = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "dtrain.train", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env)


def dtrain_tool(*args) -> subprocess.CompletedProcess:
    """``dtrain ARGS`` (inspect, verify, report, export, ...) in this process: the tools need no
    process group, and starting a process (torch's imports, 2-3 CPU-s) costs more than their work.
    Returns the exit code, stdout and stderr as a finished process would."""
    import contextlib
    import io

    from dtrain.cli import main

    assert args[:1] != ("train",), "dtrain train ends its process (os._exit): use launch()"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


# The longest files first (measured, in seconds on 2 cores), so that the workers do not end with
# one of them alone on a long file; pyproject.toml's --no-loadscope-reorder keeps this order
# (xdist would otherwise put the files with the most tests first).
LONGEST_FIRST = [
    "test_replicas.py",  # 255, half of it asleep (paced steps)
    "test_slurm.py",  # 155, asleep: the jobs run under slurmd
    "test_elastic.py",  # 145, a third asleep (rendezvous, torch's 30 s wait)
    "test_checkpoint_faults.py",  # 135
    "test_resume.py",  # 125
    "test_reliability.py",  # 85
    "test_preemption.py",  # 75
    "test_storage_faults.py",  # 50
    "test_launch.py",  # 35
    "test_runlog_s3.py",  # 35
    "test_checkpoint_roundtrip.py",  # 35
    "test_checkpoint_io_s3.py",  # 30
    "test_heartbeat.py",  # 25
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order stays


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that ran processes shows what they said (``*.log`` in its tmp_path, without
    the per-step lines, which would push the rest out of CI's excerpt) and the runs' events:
    on CI those files are gone with the machine."""
    report = (yield).get_result()
    tmp_path = item.funcargs.get("tmp_path") if hasattr(item, "funcargs") else None
    if report.failed and tmp_path is not None:
        for log in sorted(Path(tmp_path).rglob("*.log")):
            lines = [line for line in log.read_text(errors="replace").splitlines() if not STEP_LINE.match(line)]
            report.sections.append((f"{log.relative_to(tmp_path)} without step lines", "\n".join(lines[-25:])))
        for events in sorted(Path(tmp_path).rglob("events.jsonl")):
            try:
                rows = read_jsonl(events)
            except ValueError:  # a line being written when the test failed
                continue
            brief = [
                " ".join(f"{k}={e[k]}" for k in ("event", "replica_id", "step", "from_step", "reason") if k in e)
                for e in rows
                if e.get("event") != "checkpoint"
            ]
            report.sections.append((str(events.relative_to(tmp_path)), "\n".join(brief[-30:])))


STEP_LINE = re.compile(r"step \d+/\d+ epoch ")


@pytest.fixture
def tiny_args():
    """A few seconds of training on the tiny preset."""
    return ["--preset", "tiny", "--train.max_steps=6", "--train.log_interval=1", "--train.eval_interval=0"]


from s3server import s3_env  # noqa: E402,F401  (the fixture, for every test module)

HELPERS = Path(__file__).parent / "helpers"


def paced(seconds: float) -> dict:
    """Environment for launched processes whose training steps take at least ``seconds`` each
    (helpers/paced/sitecustomize.py): for tests that wait on the clock, not on the steps."""
    path = [str(HELPERS / "paced"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(path), "DTRAIN_TEST_STEP_SECONDS": str(seconds)}


def torchrun_script(script: str, args, nproc: int, timeout: float = 300, env: dict | None = None):
    """Run a helper script of tests/helpers under the real torchrun."""
    command = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", str(HELPERS / script), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HELPERS.parent.parent), **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env)
