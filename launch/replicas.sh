#!/usr/bin/env bash
# Replica groups on torchft (docs/fault-tolerance.md). A job is one lighthouse and several replica
# groups; each group is a torchrun of NPROC ranks with FSDP2 inside, and torchft sums the gradients
# across the groups in each step's quorum. A group that dies leaves the others training; started
# again (the same command), it heals from a live group and trains from the next step.
#
#   launch/replicas.sh lighthouse                      # once per job, on a host that stays up
#   LIGHTHOUSE=host:29510 REPLICA_ID=0 REPLICAS=2 RUN_DIR=s3://b/run launch/replicas.sh --preset medium
#   LIGHTHOUSE=host:29510 REPLICA_ID=1 REPLICAS=2 RUN_DIR=s3://b/run launch/replicas.sh --preset medium
#
# Groups of one job must have the same size (their shards are exchanged rank by rank). A group
# of several nodes: set NNODES and RDZV_ENDPOINT (c10d rendezvous, one per group).
# The lighthouse's timeouts decide how fast a lost group is dropped: a killed group's peers see
# their collective fail at once and wait for the next quorum, which leaves a group out once its
# heartbeat is HEARTBEAT_MS old (torchft's default is 5 s; 1 s here).
#
# Exits with dtrain's code (0 done, 75 stopped on a signal; 1 also when the lighthouse is lost:
# start it, then the groups, which resume from the newest committed checkpoint).
set -uo pipefail
if [ "${1:-}" = lighthouse ]; then
    exec torchft_lighthouse --min_replicas "${MIN_REPLICAS:-1}" --quorum_tick_ms 100 \
        --join_timeout_ms "${JOIN_MS:-1000}" --heartbeat_timeout_ms "${HEARTBEAT_MS:-1000}" \
        --bind "${LIGHTHOUSE_BIND:-[::]:29510}"
fi
RUN_DIR=${RUN_DIR:-runs/replicas}         # shared by every group: a shared filesystem or s3://...
LIGHTHOUSE=${LIGHTHOUSE:-127.0.0.1:29510}
REPLICA_ID=${REPLICA_ID:?set REPLICA_ID, 0 .. REPLICAS-1}
REPLICAS=${REPLICAS:-2}
NPROC=${NPROC:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
NNODES=${NNODES:-1}
export TORCHFT_LIGHTHOUSE=http://$LIGHTHOUSE RUST_LOG=${RUST_LOG:-warn}
export DTRAIN_EXIT_CODE_FILE=${DTRAIN_EXIT_CODE_FILE:-$(mktemp)}
rm -f "$DTRAIN_EXIT_CODE_FILE"
if [ "$NNODES" = 1 ]; then
    where=(--standalone)
else
    where=(--nnodes="$NNODES" --rdzv-backend=c10d --rdzv-endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT}"
           --rdzv-id="dtrain-replica-$REPLICA_ID")
fi
torchrun "${where[@]}" --nproc_per_node="$NPROC" -m dtrain.train --run-dir "$RUN_DIR" \
    --fault_tolerance.enable=true --fault_tolerance.replica_id="$REPLICA_ID" \
    --fault_tolerance.group_size="$REPLICAS" "$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
wait "$pid"; status=$?
while kill -0 "$pid" 2>/dev/null; do wait "$pid"; status=$?; done
[ -s "$DTRAIN_EXIT_CODE_FILE" ] && status=$(cat "$DTRAIN_EXIT_CODE_FILE")
rm -f "$DTRAIN_EXIT_CODE_FILE"
exit "$status"
