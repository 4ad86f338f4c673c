"""A stopped or unreachable rank must not hold the job, whatever the others are doing.

A rank that hangs without dying (SIGSTOP, a frozen node, a cut network) closes no
socket, so its peers wait in their next collective for the process group's
timeout, 600 s. ``StepWatchdog`` (dtrain/watchdog.py) bounds that wait between
step boundaries only; a peer that stops while the others save, commit or
evaluate is caught here, in any phase. Every rank bumps a counter on the job's
TCPStore and watches the counter of the next rank (a ring: one watcher per
rank, two store requests per rank per beat, however large the job). When the
watched counter has not moved for ``train.heartbeat_timeout`` seconds, or the
store stopped answering, this process exits 1 and the launcher restarts the job
from the last committed checkpoint (docs/elastic.md, "A hung rank").

The counter lives in a thread of its own, so a slow save or a long step does not
delay it; a store request to a stopped store blocks without end (its timeout
applies to waiting for keys, not to a silent server), so a second thread does the
judging.
"""
from __future__ import annotations

import datetime
import os
import sys
import threading
import time

import torch.distributed as dist

from .errors import EXIT_CRASH

PREFIX = "dtrain/heartbeat/"


class PeerHeartbeat:
    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout_s: float):
        self.store, self.rank, self.timeout_s = store, rank, timeout_s
        self.peer = (rank + 1) % world_size
        self.interval_s = min(max(timeout_s / 10, 0.1), 5.0)
        self._seen = time.monotonic()  # when the peer's counter last moved
        self._stop = threading.Event()
        self._judge: threading.Thread | None = None

    @classmethod
    def for_job(cls, rank: int, world_size: int, timeout_s: float) -> PeerHeartbeat | None:
        """Started on the job's store (MASTER_ADDR:MASTER_PORT, as torchrun and ``env://`` set
        them), through a connection of its own; None with one rank, a timeout of 0, or no store."""
        if world_size < 2 or timeout_s <= 0 or "MASTER_ADDR" not in os.environ:
            return None
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=max(timeout_s, 30)))
        heartbeat = cls(store, rank, world_size, timeout_s)
        heartbeat.start()
        return heartbeat

    def start(self) -> None:
        self._seen = time.monotonic()
        threading.Thread(target=self._beat, name="dtrain-heartbeat", daemon=True).start()
        self._judge = threading.Thread(target=self._watch, name="dtrain-heartbeat-judge", daemon=True)
        self._judge.start()

    def close(self) -> None:
        """Stop judging (the beating thread may be inside a store request; it ends with the process)."""
        self._stop.set()
        if self._judge is not None:
            self._judge.join()
            self._judge = None

    def _beat(self) -> None:
        last = None
        while not self._stop.is_set():
            try:
                self.store.add(f"{PREFIX}{self.rank}", 1)
                count = self.store.add(f"{PREFIX}{self.peer}", 0)  # reads without waiting for the key
            except Exception:  # noqa: BLE001 - a store that errors is a store that does not answer
                count = last
            if count != last:
                last, self._seen = count, time.monotonic()
            self._stop.wait(self.interval_s)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            silent = time.monotonic() - self._seen
            if silent > self.timeout_s:
                print(f"dtrain: rank {self.rank}: no heartbeat from rank {self.peer} for {silent:.0f} s "
                      f"(--train.heartbeat_timeout={self.timeout_s:g}): it is stopped, hung or unreachable, "
                      "or the job's store is; exiting so that the launcher restarts the job from the last "
                      "committed checkpoint", file=sys.stderr, flush=True)
                os._exit(EXIT_CRASH)
