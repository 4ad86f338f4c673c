"""A stopped or unreachable rank must not hold the job, whatever the others are doing.

A rank that hangs without dying (SIGSTOP, a frozen node, a network cut off from
the job's store) closes no socket, so its peers wait in their next collective
for the process group's timeout, 600 s. ``StepWatchdog`` (dtrain/watchdog.py)
bounds that wait between step boundaries only; a peer that stops while the
others save, commit or evaluate is caught here, in any phase. Every rank bumps a
counter on the job's TCPStore and watches the counter of the next rank (a ring:
one watcher per rank, two store requests per rank per beat, however large the
job). When fresh reads show the watched counter still for
``train.heartbeat_timeout`` seconds, or one store request has been unanswered
that long, this process exits 1 and the launcher restarts the job from the last
committed checkpoint (docs/elastic.md, "A hung rank").

The counter lives in a thread of its own, so a slow save or a long step does not
delay it; a request to a stopped store blocks without end (its timeout covers
waiting for keys, not a silent server), so a second thread does the judging. Only
evidence gathered while this process ran counts: when the judge wakes later than
it asked (the whole job was suspended, or this process held the GIL), the clocks
move on by that much. A store that errors (its host process died: torchrun's agent,
or rank 0) is not a hang; the heartbeat stops and the group's own failure, or the
lost agent (dtrain/preempt.py), decides what happens.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time

import torch.distributed as dist

from .errors import EXIT_CRASH


class PeerHeartbeat:
    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout_s: float, job: str = ""):
        self.store, self.rank, self.timeout_s = store, rank, timeout_s
        self.peer = (rank + 1) % world_size
        # Keyed by job, not by restart: torchrun agents on different nodes count restarts apart.
        self.prefix = f"dtrain/heartbeat/{job}/"
        self.interval_s = min(max(timeout_s / 10, 0.1), 5.0)
        self._seen = time.monotonic()  # when a read last saw the peer's counter move
        self._read = self._seen  # when the last read came back
        self._asking: float | None = None  # when the request in flight was sent
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @classmethod
    def for_job(cls, rank: int, world_size: int, timeout_s: float) -> PeerHeartbeat | None:
        """Started on the job's store (MASTER_ADDR:MASTER_PORT, as torchrun and ``env://`` set
        them), through a connection of its own; None with one rank, a timeout of 0, or no store."""
        if world_size < 2 or timeout_s <= 0 or "MASTER_ADDR" not in os.environ:
            return None
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=max(timeout_s, 30)),
        )
        heartbeat = cls(store, rank, world_size, timeout_s, os.environ.get("TORCHELASTIC_RUN_ID", ""))
        heartbeat.start()
        return heartbeat

    def start(self) -> None:
        self._stop.clear()
        self._seen = self._read = time.monotonic()
        self._threads = [
            threading.Thread(target=self._beat, name="dtrain-heartbeat", daemon=True),
            threading.Thread(target=self._watch, name="dtrain-heartbeat-judge", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop beating and judging. The beat thread is given a moment to leave its store request:
        a thread still inside one when the interpreter exits can abort the process."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)
        self._threads = []

    def _ask(self, key: str, amount: int) -> int:
        self._asking = time.monotonic()
        count = self.store.add(key, amount)
        self._asking = None
        return count

    def _beat(self) -> None:
        last = None
        while not self._stop.is_set():
            try:
                self._ask(f"{self.prefix}{self.rank}", 1)
                count = self._ask(f"{self.prefix}{self.peer}", 0)  # reads without waiting for the key
            except Exception as error:  # noqa: BLE001 - the store's host is gone: not a hang
                self._asking = None
                if not self._stop.is_set():  # at the end, rank 0's store may go first
                    print(
                        f"dtrain: rank {self.rank}: the job's store failed ({str(error).splitlines()[0]}); "
                        "heartbeat off",
                        file=sys.stderr,
                        flush=True,
                    )
                self._stop.set()
                return
            self._read = time.monotonic()
            if count != last:
                last, self._seen = count, self._read
            self._stop.wait(self.interval_s)

    def _watch(self) -> None:
        due = time.monotonic() + self.interval_s
        while not self._stop.wait(max(due - time.monotonic(), 0)):
            now = time.monotonic()
            late = now - due
            if late > self.interval_s:
                # This process stood still (the job suspended, the GIL held): the silence that
                # piled up meanwhile proves nothing about the peer.
                self._seen += late
                asking = self._asking
                if asking is not None:
                    self._asking = asking + late
            due = now + self.interval_s
            asking, silent = self._asking, self._read - self._seen
            if asking is not None and now - asking > self.timeout_s:
                why = (
                    f"a request to the job's store has not been answered for {now - asking:.1f} s: its "
                    "host is stopped or unreachable"
                )
            elif silent > self.timeout_s:
                why = f"no heartbeat from rank {self.peer} for {silent:.1f} s: it is stopped, hung or unreachable"
            else:
                continue
            if time.monotonic() - now > self.interval_s:
                continue  # stood still since this tick began: judge again on the next one
            self._exit(why)

    def _exit(self, why: str) -> None:
        if self._stop.is_set():
            return  # closed meanwhile: the job ended normally
        print(
            f"dtrain: rank {self.rank}: {why} (--train.heartbeat_timeout={self.timeout_s:g}); exiting so "
            "that the launcher restarts the job from the last committed checkpoint",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_CRASH)
