#!/usr/bin/env bash
# One node, all its GPUs (or N CPU ranks). Run it again after any interruption:
# it continues from the newest committed checkpoint in the same run directory.
#   RUN_DIR=runs/a NPROC=8 launch/local.sh --preset medium
#
# Exit codes are dtrain's own (dtrain/errors.py): 0 done, 2 bad configuration,
# 65 diverged, 74 storage failed, 75 stopped on a signal with a committed
# checkpoint (run again to continue), 1 crashed. torchrun alone would exit 1 for
# any of them, so rank 0 writes its code to DTRAIN_EXIT_CODE_FILE and this script
# exits with it. SIGTERM/SIGINT to this script go to torchrun, which passes them
# to the workers: they save at the next step boundary.
set -uo pipefail
RUN_DIR=${RUN_DIR:-runs/local}
NPROC=${NPROC:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
export DTRAIN_EXIT_CODE_FILE=${DTRAIN_EXIT_CODE_FILE:-$(mktemp)}
rm -f "$DTRAIN_EXIT_CODE_FILE"
started=$(date +%s)
torchrun --standalone --nproc_per_node="$NPROC" -m dtrain.train --run-dir "$RUN_DIR" "$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
wait "$pid"; status=$?
# `wait` returns early when a trapped signal arrives; wait again for the save and the exit.
while kill -0 "$pid" 2>/dev/null; do wait "$pid"; status=$?; done
if [ -s "$DTRAIN_EXIT_CODE_FILE" ]; then
    status=$(cat "$DTRAIN_EXIT_CODE_FILE")
elif [ "$status" -ne 0 ]; then   # rank 0 was killed before it could say: ask the run's events
    python3 -m dtrain.cli status "$RUN_DIR" --since "$started"; status=$?
fi
rm -f "$DTRAIN_EXIT_CODE_FILE"
echo "dtrain: exit $status (0 done, 75 stopped with a checkpoint: run again to continue)" >&2
exit "$status"
