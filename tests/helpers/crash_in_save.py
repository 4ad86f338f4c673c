"""Run under torchrun: dtrain.train, except that rank 1 is SIGKILLed in the middle of
the save into the directory named by DTRAIN_TEST_KILL_IN (after writing its shard,
before DCP's .metadata or the manifest exist). The product has no such hook: the
fault is injected here, by wrapping DCP's own file writer.
"""

import os
import signal
import sys

from torch.distributed.checkpoint.filesystem import FileSystemWriter

from dtrain import train

target = os.environ["DTRAIN_TEST_KILL_IN"]
original = FileSystemWriter.write_data


def write_then_die(self, plan, planner):
    written = original(self, plan, planner)
    if os.environ.get("RANK") == "1" and str(self.path).endswith(target):
        written.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    return written


FileSystemWriter.write_data = write_then_die
train.exit_now(train.main(sys.argv[1:]))  # no interpreter teardown: see exit_now
