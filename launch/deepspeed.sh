#!/usr/bin/env bash
# Run one onerec stage with the DeepSpeed launcher: for clusters described by a hostfile
# (the launcher reaches the other hosts over pdsh/ssh), or on this machine alone.
#
# Usage:
#   HOSTFILE=hosts NUM_NODES=2 NUM_GPUS=8 launch/deepspeed.sh --config FILE run.out_dir=/shared/runs/x [key=value ...]
#   NUM_GPUS=2 launch/deepspeed.sh --config FILE [key=value ...]          # this machine only
#
# A hostfile lists one host per line with its number of devices:
#   node0 slots=8
#   node1 slots=8
# With a hostfile the launcher needs passwordless ssh to every host listed (it checks, then
# starts the workers through pdsh), and run.out_dir on a file system they all see. On a
# CPU-only machine every "GPU" is a gloo process.
#
# Everything after the script name goes to `onerec $STAGE` unchanged: --config FILE and
# key=value config overrides.
#
# SIGUSR1 or SIGTERM to this script stops training at the end of the current step with a
# checkpoint (passed on as SIGTERM: on this machine alone to the launcher's per-node process,
# which passes it on to the workers; with a hostfile to the launcher, which stops the remote
# workers its own way), and the script exits with 75 (docs/distributed.md#preemption-and-time-limits).
#
# Env knobs:
#   STAGE        onerec command to run (default pretrain)
#   HOSTFILE     hostfile path (default: the launcher's /job/hostfile if present, else this machine only)
#   NUM_NODES    how many of the hostfile's hosts to use (default: all)
#   NUM_GPUS     devices (processes) per host (default: all; on a CPU machine set it,
#                e.g. NUM_GPUS=2, since DeepSpeed otherwise counts NUMA nodes)
#   MASTER_ADDR  address of the first host as the others see it (default: the launcher's choice)
#   MASTER_PORT  rendezvous port (default 29500)
#   LAUNCHER_BACKEND   pdsh (default), openmpi, mvapich, slurm, ...: the launcher's --launcher
#   RESUME       auto (default) | none | a checkpoint directory: becomes train.resume
#   ONEREC_ROOT, ONEREC_VENV, DEEPSPEED   see launch/common.sh (also the NCCL and fault-handler
#                variables it sets where not set: NCCL_DEBUG=WARN, PYTHONFAULTHANDLER=1, ...)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

STAGE="${STAGE:-pretrain}"
args=(--master_port "${MASTER_PORT:-29500}")
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE" --launcher "${LAUNCHER_BACKEND:-pdsh}")
[[ -n "${NUM_NODES:-}" ]] && args+=(--num_nodes "$NUM_NODES")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus "$NUM_GPUS")
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")

onerec_stage_args "$@"

# On this machine alone the `deepspeed` runner does not pass signals on (SIGTERM ends it and
# leaves the rest running); its child, the per-node launch.py, passes SIGTERM on to the workers
# and waits for them. With a hostfile the runner handles SIGTERM itself.
onerec_forward_targets() {
    if [[ -z "${HOSTFILE:-}" ]] && command -v pgrep > /dev/null && pgrep -P "$ONEREC_CHILD"; then
        return 0
    fi
    echo "$ONEREC_CHILD"
}
onerec_trap_signals TERM
set -x
# --module: run onerec.cli as `python -m`; --no_local_rank: onerec reads LOCAL_RANK from the
# environment instead of a --local_rank argument.
onerec_run "$DEEPSPEED" "${args[@]}" --no_local_rank --module onerec.cli "$STAGE" "${ONEREC_ARGS[@]}"
if [[ "$ONEREC_RC" == "$ONEREC_REQUEUE_EXIT" ]]; then
    echo "deepspeed.sh: $STAGE stopped on a signal (exit $ONEREC_REQUEUE_EXIT); run the same command again to continue" >&2
fi
exit "$ONEREC_RC"
