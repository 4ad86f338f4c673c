"""Run under torchrun as one replica group: dtrain.train with a fault injected from outside
the product, by wrapping DCP's file writer or dtrain's heal server:

- DTRAIN_TEST_KILL_IN=step_N: this group's rank 0 is SIGKILLed in the middle of writing that
  checkpoint (after its shard, before DCP's .metadata or the manifest exist);
- DTRAIN_TEST_DIE_SERVING=N: this group's rank 0 is SIGKILLed when a healing peer asks it for
  the training state of step N or later;
- DTRAIN_TEST_START_TOGETHER=COUNT:DIR: the first quorum waits until COUNT groups are ready to
  join it (a file each in DIR), so that a slow machine does not let one group train alone, or
  heal at its start, before the fault the test is about.
"""

import os
import signal
import sys
import time
from pathlib import Path

from torch.distributed.checkpoint.filesystem import FileSystemWriter

from dtrain import train
from dtrain.replicas import PeerStateTransport, ReplicaGroup

target = os.environ.get("DTRAIN_TEST_KILL_IN")
write_data, serve, start_step = FileSystemWriter.write_data, PeerStateTransport._serve, ReplicaGroup.start_step


def write_then_die(self, plan, planner):
    written = write_data(self, plan, planner)
    if target and os.environ.get("RANK") == "0" and str(self.path).endswith(target):
        written.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    return written


def die_serving(self, request):
    at_least = os.environ.get("DTRAIN_TEST_DIE_SERVING")
    if at_least and int(request.path.rstrip("/").rsplit("/", 1)[-1]) >= int(at_least):
        os.kill(os.getpid(), signal.SIGKILL)
    return serve(self, request)


def start_together(self):
    together = os.environ.pop("DTRAIN_TEST_START_TOGETHER", None)  # the first quorum only
    if together:
        count, folder = together.split(":", 1)
        (Path(folder) / str(os.getpid())).touch()
        while len(list(Path(folder).iterdir())) < int(count):
            time.sleep(0.05)
    return start_step(self)


FileSystemWriter.write_data = write_then_die
PeerStateTransport._serve = die_serving
ReplicaGroup.start_step = start_together
train.exit_now(train.main(sys.argv[1:]))  # no interpreter teardown: see exit_now
