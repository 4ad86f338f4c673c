"""A real one-node SLURM cluster on loopback for the launch tests (docs/slurm-local.md).

``munged``, ``slurmctld`` and ``slurmd`` run from a generated ``slurm.conf``
with every file they write (key, socket, state, spool, logs, pid files) in one
temporary directory, and are stopped afterwards. Needs root and Debian's
``slurmd slurmctld slurm-client munge`` packages; ``missing()`` says in one
line why a cluster cannot be started here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")


def missing() -> str:
    """Why no cluster can run here ("" when one can)."""
    absent = [p for p in PROGRAMS if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]
    if absent:
        return (
            f"SLURM is not installed ({', '.join(absent)} missing): as root, "
            "apt-get install slurmd slurmctld slurm-client munge"
        )
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd starts jobs as their users)"
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _program(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class Cluster:
    """``with Cluster(tmp) as cluster: cluster.run("sbatch", ...)``; ``cluster.env`` for children."""

    def __init__(self, directory: Path, cpus: int | None = None):
        self.dir = Path(directory)
        self.cpus = cpus or os.cpu_count() or 1
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def __enter__(self) -> Cluster:
        self.dir.mkdir(parents=True, exist_ok=True)
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir(exist_ok=True)
        key = self.dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text(self._conf())
        try:
            subprocess.run(
                [
                    _program("munged"),
                    "--force",
                    f"--key-file={key}",
                    f"--socket={self.dir / 'munge.socket'}",
                    f"--pid-file={self.dir / 'munged.pid'}",
                    f"--log-file={self.dir / 'munged.log'}",
                    f"--seed-file={self.dir / 'munge.seed'}",
                ],
                check=True,
                capture_output=True,
                timeout=30,
            )
            for daemon in ("slurmctld", "slurmd"):
                subprocess.run(
                    [_program(daemon), "-f", str(self.conf)], check=True, capture_output=True, env=self.env, timeout=30
                )
            self._wait_idle()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _conf(self) -> str:
        d = self.dir
        return "\n".join(
            [
                # Addresses given, so no host name has to resolve.
                "ClusterName=dtraintest",
                f"SlurmctldHost={self.host}(127.0.0.1)",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"AuthInfo=socket={d / 'munge.socket'},cred_expire=10",
                f"StateSaveLocation={d / 'state'}",
                f"SlurmdSpoolDir={d / 'spool'}",
                f"SlurmctldLogFile={d / 'slurmctld.log'}",
                f"SlurmdLogFile={d / 'slurmd.log'}",
                f"SlurmctldPidFile={d / 'slurmctld.pid'}",
                f"SlurmdPidFile={d / 'slurmd.pid'}",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "MpiDefault=none",
                "ReturnToService=2",
                "JobRequeue=1",
                "KillWait=30",
                "SchedulerParameters=sched_interval=2",
                "MinJobAge=600",
                f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=4000 State=UNKNOWN",
                "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
            if out == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node did not become idle (sinfo: {out!r}); see {self.dir}/*.log")

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, env=self.env, check=check, timeout=60)

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, RestartCnt, ExitCode, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def __exit__(self, *exc) -> None:
        subprocess.run(
            [_program("scancel"), "--full", "--signal=KILL", "--user=root"],
            env=self.env,
            capture_output=True,
            timeout=30,
        )
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.dir / f"{name}.pid"
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        time.sleep(1)
