#!/usr/bin/env bash
# Elastic torchrun: c10d rendezvous, between MIN and MAX nodes, up to RESTARTS
# group restarts. When a worker dies, the agent restarts the whole group, which
# resumes from the last committed checkpoint (possibly on a different number of
# nodes: DCP reshards, and the sampler continues the same global order).
# Start the same command on every node, with the same RDZV_ENDPOINT and JOB_ID.
#   RDZV_ENDPOINT=node0:29400 launch/elastic.sh --preset medium
set -euo pipefail
RUN_DIR=${RUN_DIR:-runs/elastic}          # shared by all nodes: a shared filesystem or s3://...
NNODES=${NNODES:-1:4}
NPROC=${NPROC:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
RESTARTS=${RESTARTS:-3}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:29400}
JOB_ID=${JOB_ID:-dtrain}
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" --max-restarts="$RESTARTS" \
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$JOB_ID" \
    -m dtrain.train --run-dir "$RUN_DIR" "$@"
