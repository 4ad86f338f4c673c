#!/usr/bin/env bash
# Elastic torchrun: c10d rendezvous, between MIN and MAX nodes, up to RESTARTS
# group restarts. When a worker dies, the agent restarts the whole group, which
# resumes from the last committed checkpoint (possibly on a different number of
# nodes: DCP reshards, and the sampler continues the same global order).
# Start the same command on every node, with the same RDZV_ENDPOINT and JOB_ID.
#   RDZV_ENDPOINT=node0:29400 launch/elastic.sh --preset medium
#
# Exits with dtrain's code (0 done, 75 stopped with a checkpoint: start again,
# 2/65/74 see the README's exit codes). torchrun exits 1 for any failed worker,
# so the code is read from the run's events (`dtrain status`), which every node
# sees: RUN_DIR is shared storage.
set -uo pipefail
RUN_DIR=${RUN_DIR:-runs/elastic}          # shared by all nodes: a shared filesystem or s3://...
NNODES=${NNODES:-1:4}
NPROC=${NPROC:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
RESTARTS=${RESTARTS:-3}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:29400}
JOB_ID=${JOB_ID:-dtrain}
started=$(date +%s)
torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" --max-restarts="$RESTARTS" \
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$JOB_ID" \
    -m dtrain.train --run-dir "$RUN_DIR" "$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
wait "$pid"; status=$?
while kill -0 "$pid" 2>/dev/null; do wait "$pid"; status=$?; done
if [ "$status" -ne 0 ]; then
    python3 -m dtrain.cli status "$RUN_DIR" --since "$started"; status=$?
fi
exit "$status"
