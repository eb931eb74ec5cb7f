#!/usr/bin/env bash
# Run one onerec stage under torchrun: one node or several, GPU (nccl) or CPU (gloo).
#
# Usage:
#   launch/torchrun.sh --config FILE [key=value ...]            # pretrain on this node
#   STAGE=pretrain NPROC_PER_NODE=8 launch/torchrun.sh --config configs/beauty/pipeline.yaml run.out_dir=runs/b
#
#   # two nodes, static rendezvous (run on each node, NODE_RANK 0 on the master):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun.sh --config ...
#   # two nodes, c10d rendezvous (same command on every node, ranks assigned on joining):
#   NNODES=2 RDZV_ENDPOINT=node0:29400 launch/torchrun.sh --config ...
#
# Everything after the script name goes to `onerec $STAGE` unchanged: --config FILE and
# key=value config overrides (see `onerec pretrain --help`).
#
# SIGUSR1 or SIGTERM to this script stops training at the end of the current step with a
# checkpoint: it is passed on to torchrun as SIGTERM (which torchrun passes on to its workers),
# and the script exits with 75 once they stopped; running the same command again continues
# (docs/distributed.md#preemption-and-time-limits). Each worker's output lines start with its
# rank, e.g. "[rank1]: ...".
#
# Env knobs:
#   STAGE           onerec command to run (default pretrain; tokenize shards the items over
#                   the workers; the stage table's `distributed` stages, see `onerec plan`)
#   ENTRY           a Python script the workers run instead of the onerec CLI, given
#                   "$STAGE" and the arguments (e.g. your own driver around onerec.stages)
#   NPROC_PER_NODE  processes per node (default: the node's GPU count, 1 without a GPU)
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's rank for a static rendezvous (default 0)
#   MASTER_ADDR, MASTER_PORT   static rendezvous on rank 0's node (default 127.0.0.1:29500);
#                   with MAX_RESTARTS > 0, a c10d rendezvous at that address instead
#   RDZV_ENDPOINT   host:port of a c10d rendezvous; when set, used instead of MASTER_*
#   RDZV_ID         rendezvous id shared by the nodes of one job (default onerec)
#   MAX_RESTARTS    times torchrun restarts all workers after one fails (default 0); with
#                   train.resume=auto (the default, see RESUME) they continue from the
#                   newest valid checkpoint
#   RESUME          auto (default) | none | a checkpoint directory: becomes train.resume
#   TEE, REDIRECTS, LOG_DIR, LOCAL_RANKS_FILTER, LOG_PREFIX   torchrun's console and per-rank
#                   log files (default: every rank on the console with a "[rank<r>]: " prefix,
#                   and in files under a new /tmp/torchelastic_* directory), see launch/common.sh
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT   seconds the workers get to checkpoint after a signal (30)
#   ONEREC_ROOT, ONEREC_VENV, TORCHRUN   see launch/common.sh (also the NCCL and fault-handler
#                   variables it sets where not set: NCCL_DEBUG=WARN, PYTHONFAULTHANDLER=1, ...)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

STAGE="${STAGE:-pretrain}"
NNODES="${NNODES:-1}"
gpus="$(onerec_local_gpus)"
NPROC_PER_NODE="${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"

args=(--nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" --max_restarts "$MAX_RESTARTS")
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    args+=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-onerec}")
elif [[ "$NNODES" == "1" && -z "${MASTER_ADDR:-}" ]]; then
    # One node: a private c10d rendezvous on a free local port, so two jobs never collide.
    args+=(--standalone)
elif [[ "$MAX_RESTARTS" != "0" ]]; then
    # The static rendezvous always shares one store across restarts (see common.sh), so a
    # job that may restart meets on a c10d rendezvous at the same address instead.
    args+=(--rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-onerec}")
else
    args+=(--node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
fi

onerec_torchrun_log_args
args+=("${TORCHRUN_LOG_ARGS[@]}")

onerec_stage_args "$@"
if [[ -n "${ENTRY:-}" ]]; then
    worker=("$ENTRY" "$STAGE" "${ONEREC_ARGS[@]}")
else
    worker=(-m onerec.cli "$STAGE" "${ONEREC_ARGS[@]}")
fi
# Not exec'd: this script stays to pass SIGUSR1/SIGTERM on (as SIGTERM, which every torchrun
# passes on to its workers) and to return the requeue code after them.
onerec_trap_signals TERM
set -x
onerec_run "$TORCHRUN" "${args[@]}" "${worker[@]}"
if [[ "$ONEREC_RC" == "$ONEREC_REQUEUE_EXIT" ]]; then
    echo "torchrun.sh: $STAGE stopped on a signal (exit $ONEREC_REQUEUE_EXIT); run the same command again to continue" >&2
fi
exit "$ONEREC_RC"
