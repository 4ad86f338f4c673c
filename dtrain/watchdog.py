"""A hung peer must not hold the job: a rank ends itself when no step finishes in time.

When one rank hangs (SIGSTOP, a stuck driver, a node that stopped answering), the
others wait in their next collective for the process group's timeout, 600 s,
before anything fails. ``StepWatchdog`` bounds that wait by
``train.step_timeout``: a thread that ends this process (exit 1, so the launcher
restarts the job from the last commit) when the training loop has not passed a
step boundary for that long. Checkpoint saves, commits and loads and evaluation
are not counted: their length depends on storage and data, not on a step. A peer
that stops while the others save is caught by the heartbeat (dtrain/heartbeat.py);
this watchdog is for the rank that is alive, and so beats, but stuck
(docs/elastic.md, "A hung rank").
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

from .errors import EXIT_CRASH


class StepWatchdog:
    def __init__(self, timeout_s: float = 0.0, rank: int = 0):
        self.timeout_s, self.rank = timeout_s, rank
        self._last = time.monotonic()
        self._excluded = 0  # nesting depth of not_counted()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Count from now (a timeout of 0 counts nothing)."""
        self.beat()
        if self.timeout_s > 0 and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._watch, name="dtrain-step-watchdog", daemon=True)
            self._thread.start()

    def beat(self) -> None:
        """A step boundary was passed."""
        self._last = time.monotonic()

    @contextmanager
    def not_counted(self):
        """Time spent in here (saves, evaluation) does not count towards the timeout."""
        self._excluded += 1
        try:
            yield
        finally:
            self.beat()  # first: the thread must not see the region left with the old time
            self._excluded -= 1

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 10)):
            excluded = self._excluded  # before the time, the order not_counted() writes them in
            waited = time.monotonic() - self._last
            if not excluded and waited > self.timeout_s:
                print(
                    f"dtrain: rank {self.rank}: no training step finished in {waited:.0f} s "
                    f"(--train.step_timeout={self.timeout_s:g}): a rank of the job is hung or gone; "
                    "exiting so that the launcher restarts the job from the last committed checkpoint",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(EXIT_CRASH)
