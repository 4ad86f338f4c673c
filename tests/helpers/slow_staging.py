"""Run under torchrun: dtrain.train, except that every background save's copy of the state
starts late (DTRAIN_TEST_STAGING_DELAY seconds), so training steps run while it is pending.
A save that did not hold the optimizer's update back until the copy is done would capture
a later step's weights. The product has no such hook: the delay wraps DCP's own stager.
"""

import os
import sys
import time

from torch.distributed.checkpoint.staging import DefaultStager

from dtrain import train

delay = float(os.environ["DTRAIN_TEST_STAGING_DELAY"])
original = DefaultStager._stage


def late_stage(self, state_dict, **kwargs):
    time.sleep(delay)
    return original(self, state_dict, **kwargs)


DefaultStager._stage = late_stage
train.exit_now(train.main(sys.argv[1:]))  # no interpreter teardown: see exit_now
