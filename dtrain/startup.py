"""Where a start's seconds go: wall-clock marks from process start to the first step.

A preempted or elastic job pays its start-up on every leg, so each leg's
``start``/``resume`` event records these marks (``startup``) and
``benchmarks/goodput.py`` and ``benchmarks/elastic.py`` break the restart down
from them (docs/elastic.md, "Where a restart's seconds go").
"""

from __future__ import annotations

import os
import time


def process_started() -> float | None:
    """This process's start, wall-clock (Linux ``/proc``; None elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time since boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])  # to 10 ms; /proc/stat's boot time is whole seconds
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class StartupClock:
    """Named wall-clock marks, in the order they happen (``mark`` the same name again to move it)."""

    def __init__(self, from_process_start: bool = False):
        self.marks: dict[str, float] = {}
        started = process_started() if from_process_start else None
        if started is not None:
            self.marks["process"] = round(started, 3)

    def mark(self, name: str) -> None:
        self.marks[name] = round(time.time(), 3)


CLOCK = StartupClock(from_process_start=True)  # the command line's: `python -m dtrain.train`
