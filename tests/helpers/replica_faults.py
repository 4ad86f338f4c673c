"""Run under torchrun as one replica group: dtrain.train with a fault injected from outside
the product, by wrapping DCP's file writer or dtrain's heal server:

- DTRAIN_TEST_KILL_IN=step_N: this group's rank 0 is SIGKILLed in the middle of writing that
  checkpoint (after its shard, before DCP's .metadata or the manifest exist);
- DTRAIN_TEST_DIE_SERVING=1: this group's rank 0 is SIGKILLed when a healing peer asks it for
  the training state.
"""
import os
import signal
import sys

from torch.distributed.checkpoint.filesystem import FileSystemWriter

from dtrain import train
from dtrain.replicas import PeerStateTransport

target = os.environ.get("DTRAIN_TEST_KILL_IN")
write_data, serve = FileSystemWriter.write_data, PeerStateTransport._serve


def write_then_die(self, plan, planner):
    written = write_data(self, plan, planner)
    if target and os.environ.get("RANK") == "0" and str(self.path).endswith(target):
        written.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    return written


def die_serving(self, request):
    if os.environ.get("DTRAIN_TEST_DIE_SERVING"):
        os.kill(os.getpid(), signal.SIGKILL)
    return serve(self, request)


FileSystemWriter.write_data = write_then_die
PeerStateTransport._serve = die_serving
sys.exit(train.main(sys.argv[1:]))
