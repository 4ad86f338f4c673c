"""Paced training for tests that wait on the clock: a restart, a heal, a scheduler's notice.

Python imports ``sitecustomize`` at start-up from its path, so a test that puts this folder on
PYTHONPATH (conftest.PACED) reaches every rank however it is launched: torchrun,
launch/*.sh, SLURM. With DTRAIN_TEST_STEP_SECONDS=S set too, each optimizer step starts at
least S seconds after the one before, sleeping the rest. A survivor that waits for a peer's
restart then waits asleep, instead of training thousands of steps on the two cores the other
tests need; each step still runs the product's code as it is, and the timeouts under test
(torchft's, the heartbeat's) are seconds, far above the pace.
"""

import os

if os.environ.get("DTRAIN_TEST_STEP_SECONDS"):
    import time

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    _seconds = float(os.environ["DTRAIN_TEST_STEP_SECONDS"])
    _last = [0.0]

    def _pace(optimizer, args, kwargs):
        wait = _last[0] + _seconds - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        _last[0] = time.monotonic()

    register_optimizer_step_pre_hook(_pace)
