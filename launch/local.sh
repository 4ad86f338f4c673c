#!/usr/bin/env bash
# One node, all its GPUs (or N CPU ranks). Run it again after any interruption:
# it continues from the newest committed checkpoint in the same run directory.
#   RUN_DIR=runs/a NPROC=8 launch/local.sh --preset medium
set -euo pipefail
RUN_DIR=${RUN_DIR:-runs/local}
NPROC=${NPROC:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
exec torchrun --standalone --nproc_per_node="$NPROC" -m dtrain.train --run-dir "$RUN_DIR" "$@"
# Exit 0: done. 75: stopped on a signal with a committed checkpoint; run again to continue.
