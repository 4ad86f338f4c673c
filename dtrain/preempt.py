"""Stopping on a signal: the handler only sets a flag; ranks agree at step boundaries.

SIGTERM (spot/preemptible instances, Kubernetes, torchrun's agent) and SIGUSR1
(SLURM's ``--signal``) ask the job to stop. A rank that received one says so in
a one-integer all-reduce at the next step boundary, and every rank then saves
and exits together (docs/design.md, "Stopping is agreed"). The same integer
carries a rank's storage failure, so every rank stops on it together.

A signal sent to a whole process group (SLURM's step, a terminal's Ctrl-C, a
container runtime) reaches a worker twice: once directly, once forwarded by
torchrun's agent. Repeats that arrive within ``REPEAT_WINDOW_S`` of the first
are that same request. A signal after that window (a person insisting), or the
grace deadline, ends the process at once: a checkpoint that cannot finish must
not hold the machine past its notice. Arrival is timed by a thread that reads
the interpreter's signal wakeup pipe: Python runs a handler only when the main
thread is back in Python, which a collective waiting on a slow peer can delay
by seconds, and that delay must not turn the forwarded copy into a second request.
A worker whose torchrun agent died stops the same way, with a checkpoint (reason
``AGENT_LOST``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from .config import stop_signals

REPEAT_WINDOW_S = 2.0
AGENT_LOST = "AGENT_LOST"  # the stop reason of a worker whose torchrun agent exited


class StopRequest:
    def __init__(self, signal_names: str, grace_seconds: float = 0.0):
        self.received: str | None = None
        self.received_at = 0.0  # monotonic, for the repeat window
        self.received_time: float | None = None  # wall-clock, for the stop event
        self.agreed_reason: str | None = None  # a reason every rank must record (AGENT_LOST)
        self.grace_seconds = grace_seconds
        self._previous = {}
        # Under torchrun the parent is the agent: a worker whose agent is gone is an orphan that
        # no agent will stop or restart, and that a new agent on its node cannot join.
        self._agent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        self._wakeup: tuple[int, int] | None = None  # the previous wakeup fd and our pipe's write end
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; nothing to install here
        for number in stop_signals(signal_names):
            self._previous[number] = signal.signal(number, self._handle)
        if not self._previous:
            return
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        self._wakeup = (signal.set_wakeup_fd(write_end, warn_on_full_buffer=False), write_end)
        threading.Thread(target=self._time_arrivals, args=(read_end,), name="dtrain-signals", daemon=True).start()

    def _handle(self, number, frame) -> None:
        if self.received is not None:
            return  # a repeat: judged by its arrival time in _time_arrivals
        self.received, self.received_at, self.received_time = signal.Signals(number).name, time.monotonic(), time.time()
        if self.grace_seconds:
            timer = threading.Timer(self.grace_seconds, self._deadline)
            timer.daemon = True
            timer.start()

    def _time_arrivals(self, read_end: int) -> None:
        """One byte per delivered signal, written by the interpreter's C-level handler as it arrives."""
        first = None
        while data := os.read(read_end, 64):
            now = time.monotonic()
            for number in data:
                if number not in self._previous:
                    continue
                if first is None:  # a stop already agreed on a lost agent counts as the first request
                    first = self.received_at if self.received == AGENT_LOST else now
                if now - first >= REPEAT_WINDOW_S:
                    name = signal.Signals(number).name
                    print(f"dtrain: second signal ({name}) while stopping; exiting now", file=sys.stderr, flush=True)
                    os._exit(128 + number)
        os.close(read_end)

    def _deadline(self) -> None:
        print(
            f"dtrain: grace period of {self.grace_seconds:g} s after {self.received} is over; "
            "exiting without finishing the checkpoint",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + signal.SIGTERM)

    def code(self, failed: bool = False) -> int:
        """This rank's request, weightiest first: 3 a failure, 2 a lost agent, 1 a signal, 0 none."""
        if self.received is None and self._agent is not None and os.getppid() != self._agent:
            self.received, self.received_at, self.received_time = AGENT_LOST, time.monotonic(), time.time()
        return 3 if failed else 2 if self.received == AGENT_LOST else 1 if self.received else 0

    def settle(self, agreed: int) -> str | None:
        """What the ranks agreed, from the weightiest ``code`` of any rank: "failure", "signal" or
        None. A lost agent is named as such, since the ranks notice it one step apart."""
        self.agreed_reason = AGENT_LOST if agreed == 2 else None
        return {0: None, 1: "signal", 2: "signal", 3: "failure"}[agreed]

    def agree(self, failed: bool = False) -> str | None:
        """``settle`` of every rank's ``code`` (collective: call on every rank, at the same point)."""
        flag = torch.tensor([self.code(failed)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return self.settle(int(flag.item()))

    def close(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
        if self._wakeup is not None:
            previous, write_end = self._wakeup
            signal.set_wakeup_fd(previous)
            os.close(write_end)  # the arrival thread reads the end of the pipe and leaves
            self._wakeup = None
