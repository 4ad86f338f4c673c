"""The step watchdog (dtrain/watchdog.py): it ends a process whose steps stopped, and only then."""

import subprocess
import sys

SCRIPT = """
import time
from dtrain.watchdog import StepWatchdog
watchdog = StepWatchdog(0.5)
watchdog.start()
for _ in range(8):  # steps of 0.2 s, each beating
    time.sleep(0.2)
    watchdog.beat()
with watchdog.not_counted():  # a save three times the timeout
    time.sleep(1.5)
print("survived the save", flush=True)
time.sleep(0.3)
watchdog.beat()
time.sleep(3)  # a step that never ends
print("not reached", flush=True)
"""


def test_the_watchdog_ends_a_stalled_process_but_not_one_that_saves():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done
    assert "survived the save" in done.stdout and "not reached" not in done.stdout
    assert "no training step finished in 1 s (--train.step_timeout=0.5)" in done.stderr, done.stderr


def test_a_timeout_of_zero_watches_nothing():
    script = SCRIPT.replace("StepWatchdog(0.5)", "StepWatchdog(0)").replace("time.sleep(3)", "time.sleep(1)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "not reached" in done.stdout, done
