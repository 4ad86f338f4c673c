"""One job per run directory: a lease held by rank 0 in ``RUN/lease.json``.

Two jobs writing one run directory would delete each other's saves (each one's
retention sees the other's save in flight as a torn leftover). So a job takes
the lease before it writes anything and holds it while it runs:

- the lease records the holder (a random id, host, pid and the pid's start
  time, the launcher's job id) and when it was last renewed; a thread renews it
  every ``ttl/3`` seconds, and every commit checks it is still ours;
- a lease is *stale*, and taken over, when it has not been renewed for its ttl,
  when its holder ran on this host and that process is gone, or when it
  belongs to the same launcher job (torchrun restarting its worker group,
  SLURM requeueing the job): those stop the old processes before starting new ones;
- otherwise the new job stops with one line naming the holder.

Object stores have no exclusive create, so after writing, the taker waits a
moment and reads the lease back: of two jobs racing, the one whose write
landed last keeps it. A holder that finds another id in the lease stops
without committing.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid

from .errors import ConfigError, LeaseLost
from .rundir import RunDirectory

LEASE = "lease.json"


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not started or _process_start(pid) in ("", started)


def launcher_job() -> str:
    """The id of the launcher's job, the same across its restarts ("" when there is none)."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ['SLURM_JOB_ID']}"
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun:{os.environ['TORCHELASTIC_RUN_ID']}"
    return ""


class RunLease:
    def __init__(self, run: RunDirectory, ttl_s: float = 60.0, job_id: str | None = None):
        """``job_id``: a lease shared by every process of that job (the replica groups of one torchft
        job): each renews it; the job's last writer deletes it (``release(job_over=True)``)."""
        self.run, self.ttl_s, self.shared = run, ttl_s, job_id is not None
        self.me = {
            "id": job_id or uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_started": _process_start(os.getpid()),
            "job": job_id or launcher_job(),
            "acquired": time.time(),
            "ttl_s": ttl_s,
            "shared": self.shared,
        }
        self.lost: str = ""  # why the lease was lost, once it was
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        if not self.run.exists(LEASE):
            return None
        try:
            holder = json.loads(self.run.read_text(LEASE))
            return holder if isinstance(holder, dict) else {}
        except ValueError:
            return {}  # unreadable: a torn write of a lease, nobody's

    def _write(self) -> None:
        self.run.write_text(LEASE, json.dumps({**self.me, "renewed": time.time()}, sort_keys=True))

    def stale_reason(self, holder: dict) -> str:
        """Why ``holder`` no longer holds the run ("" if it still does)."""
        try:
            renewed, ttl, pid = float(holder["renewed"]), float(holder.get("ttl_s", self.ttl_s)), int(holder["pid"])
            if not (holder.get("id") and math.isfinite(renewed) and 0 < ttl < 1e6 and 0 < pid < 2**31):
                raise ValueError
        except (KeyError, TypeError, ValueError, OverflowError):
            return "it is unreadable"
        age = time.time() - renewed
        if age > ttl:
            return f"not renewed for {age:.0f} s"
        if age < -ttl:
            return "it claims a renewal in the future"
        # A shared lease names whichever process renewed it last: that one's end is not the job's.
        if (
            holder.get("host") == self.me["host"]
            and not holder.get("shared")
            and not _alive(pid, str(holder.get("pid_started", "")))
        ):
            return f"its process {pid} on this host is gone"
        if holder.get("job") and holder.get("job") == self.me["job"]:
            return f"it belongs to this job's earlier start ({holder['job']})"
        return ""

    def acquire(self) -> str:
        """Take the lease or raise ``ConfigError`` naming the holder; returns a note on a takeover."""
        holder = self._read()
        note = ""
        if holder is not None and not (self.shared and holder.get("id") == self.me["id"]):  # shared: join it
            reason = self.stale_reason(holder)
            if not reason:
                raise ConfigError(self._busy(holder))
            note = f"took over the lease of {self.run.url} from {self._who(holder)}: {reason}"
        self._write()
        time.sleep(1.0 if self.run.url.startswith(("s3://", "s3a://", "gs://")) else 0.05)
        current = self._read() or {}
        if current.get("id") != self.me["id"]:
            raise ConfigError(self._busy(current))
        self._thread = threading.Thread(target=self._renew_loop, name="dtrain-lease", daemon=True)
        self._thread.start()
        return note

    def _who(self, holder: dict) -> str:
        job = f", {holder['job']}" if holder.get("job") else ""
        return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}{job}"

    def _busy(self, holder: dict) -> str:
        try:
            renewed = time.time() - float(holder.get("renewed", 0))
            expires = f"in {max(float(holder.get('ttl_s', self.ttl_s)) - renewed, 0):.0f} s"
        except (TypeError, ValueError):
            renewed, expires = math.nan, "soon"
        return (
            f"run directory {self.run.url} is in use by another job ({self._who(holder)}, lease renewed "
            f"{renewed:.0f} s ago); stop that job first, or start this one after its lease expires "
            f"{expires} (if that job is surely gone, delete {self.run.url}/{LEASE})"
        )

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.check()
                self._write()
            except LeaseLost:
                return
            except Exception:  # storage hiccup: try again at the next period; check() guards commits
                continue

    def check(self) -> None:
        """Raise ``LeaseLost`` if another job holds the lease now (one small read)."""
        if self.lost:
            raise LeaseLost(self.lost)
        holder = self._read()
        if holder is None and self.shared:
            # A group of this job that finished first let the run go while this one, which healed
            # as the job ended, still trains its last steps alone: it holds the run again.
            self._write()
            return
        holder = holder or {}
        if holder.get("id") != self.me["id"]:
            self.lost = (
                f"another job ({self._who(holder)}) took over {self.run.url}; this job stops "
                "without committing anything more"
            )
            raise LeaseLost(self.lost)

    def release(self, job_over: bool = False) -> None:
        """Stop renewing; delete the lease if it is ours alone, or if ``job_over`` (a shared lease:
        the last writer of a job that finished or stopped whole)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost or (self.shared and not job_over):
            return
        try:
            holder = self._read() or {}
            if holder.get("id") == self.me["id"]:
                self.run.delete(LEASE)
        except Exception:
            pass  # leaving a lease behind is safe: it goes stale
