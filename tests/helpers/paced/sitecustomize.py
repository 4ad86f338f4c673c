"""Paced training for tests that wait on the clock: a restart, a heal, a scheduler's notice.

Python imports ``sitecustomize`` at start-up from its path, so a test that puts this folder on
PYTHONPATH (``conftest.paced``) reaches every rank however it is launched: torchrun,
launch/*.sh, SLURM. With DTRAIN_TEST_STEP_SECONDS=S set too, each training step starts at
least S seconds after the one before, sleeping the rest. A survivor that waits for a peer's
restart then waits asleep, instead of training thousands of steps on the two cores the other
tests need; each step still runs the product's code as it is, and the timeouts under test
(torchft's, the heartbeat's) are seconds, far above the pace.

The sleep comes before the step's first forward: after a replica step's quorum, before its
cross-group sum. A kill that lands in it leaves the peers committed to a quorum that holds the
dead group, as a kill in the middle of an unpaced step does.
"""

import os

if os.environ.get("DTRAIN_TEST_STEP_SECONDS"):
    import time

    from torch.nn.modules.module import register_module_forward_pre_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook

    _seconds = float(os.environ["DTRAIN_TEST_STEP_SECONDS"])
    _pace = {"steps": 0, "paced": -1, "last": 0.0}

    def _count_step(optimizer, args, kwargs):
        _pace["steps"] += 1

    def _sleep_before_the_first_forward(module, args):
        if _pace["paced"] == _pace["steps"]:  # a later module of this step, or an evaluation
            return
        _pace["paced"] = _pace["steps"]
        wait = _pace["last"] + _seconds - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        _pace["last"] = time.monotonic()

    register_optimizer_step_post_hook(_count_step)
    register_module_forward_pre_hook(_sleep_before_the_first_forward)
