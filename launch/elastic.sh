#!/usr/bin/env bash
# Elastic torchrun: c10d rendezvous, between MIN and MAX nodes, up to RESTARTS
# group restarts. When a worker dies, the agent restarts the whole group, which
# resumes from the last committed checkpoint (possibly on a different number of
# nodes: DCP reshards, and the sampler continues the same global order).
# Start the same command on every node, with the same RDZV_ENDPOINT and JOB_ID.
#   RDZV_ENDPOINT=node0:29400 launch/elastic.sh --preset medium
#
# Two settings make nodes leaving and coming back work (docs/elastic.md, measured):
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, without which torch 2.13 hangs the round
# in which a node joins a running job, and a 1 s rendezvous heartbeat, so a lost
# node is dropped after 3 s (torch's default: 15 s). The node that hosts
# RDZV_ENDPOINT's store cannot be lost without ending the job: use a stable host,
# or a store of its own (docs/elastic.md, "Where the store lives").
# A node that freezes instead of dying is noticed by the others' heartbeat
# (--train.heartbeat_timeout, default 60 s, in any phase): on loopback with 5 s,
# the survivor trained alone 9.3 s after the freeze; a killed node took 6.7 s.
#
# Exits with dtrain's code (0 done, 75 stopped with a checkpoint: start again,
# 2/65/74 see docs/training.md, exit codes). torchrun exits 1 for any failed worker,
# so the code is read from the run's events (`dtrain status`), which every node
# sees: RUN_DIR is shared storage.
set -uo pipefail
RUN_DIR=${RUN_DIR:-runs/elastic}          # shared by all nodes: a shared filesystem or s3://...
NNODES=${NNODES:-1:4}
NPROC=${NPROC:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
RESTARTS=${RESTARTS:-3}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:29400}
JOB_ID=${JOB_ID:-dtrain}
RDZV_CONF=${RDZV_CONF:-join_timeout=600,last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=3}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
started=$(date +%s)
torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" --max-restarts="$RESTARTS" \
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$JOB_ID" --rdzv-conf="$RDZV_CONF" \
    -m dtrain.train --run-dir "$RUN_DIR" "$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
wait "$pid"; status=$?
while kill -0 "$pid" 2>/dev/null; do wait "$pid"; status=$?; done
if [ "$status" -ne 0 ]; then
    python3 -m dtrain.cli status "$RUN_DIR" --since "$started"; status=$?
fi
exit "$status"
