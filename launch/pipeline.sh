#!/usr/bin/env bash
# Every stage in order, tokenize and training under a distributed launcher, each stage resumable:
#
#   data [-> baseline] -> tokenize -> pretrain [-> reward] [-> dpo] -> evaluate   (under run.out_dir)
#
# The stage list comes from `onerec plan` (the stage table in onerec/stages/__init__.py), so
# it is always the list `onerec pipeline` runs for the same config.
#
# A stage whose output is fresh is skipped (onerec/provenance.py: made from this config and
# from the current outputs of the stages before it; a stage that did not finish has no
# record and reruns); pretraining runs with train.resume=auto, so after a crash or a
# preemption the same command continues from the newest valid checkpoint. FORCE=1 reruns
# every stage.
#
# SIGUSR1 or SIGTERM to this script is passed on to the running stage (a training stage
# checkpoints at the end of its step and exits with 75), no later stage starts, and the script
# exits with 75: run the same command again to continue (launch/slurm/pipeline.sbatch requeues
# the job). See docs/distributed.md#preemption-and-time-limits.
#
# Usage:
#   launch/pipeline.sh --config configs/demo.yaml run.out_dir=runs/demo [key=value ...]
#   NPROC_PER_NODE=8 launch/pipeline.sh --config configs/beauty/pipeline.yaml run.out_dir=runs/beauty
#   LAUNCHER=deepspeed HOSTFILE=hosts launch/pipeline.sh --config ...
#   sbatch --nodes 4 launch/slurm/pipeline.sbatch --config ...     # LAUNCHER=slurm
#
# The arguments go to every `onerec <stage>` unchanged: --config FILE and key=value overrides.
#
# Env knobs:
#   LAUNCHER   how the distributed stages (tokenize, pretrain, reward, dpo: `onerec plan`) run: torchrun (default;
#              launch/torchrun.sh, see its knobs), deepspeed (launch/deepspeed.sh), slurm
#              (launch/slurm/pretrain.sbatch inside the current allocation), none (one
#              plain process)
#   FORCE      1: rerun every stage, also those whose output is fresh
#   RESUME     auto (default) | none: train.resume for pretraining
#   TEE, REDIRECTS, LOG_DIR, LOCAL_RANKS_FILTER, LOG_PREFIX   torchrun's console output and
#              per-rank log files for the distributed stages (LAUNCHER=torchrun or slurm;
#              default: every rank on the console, each line prefixed "[rank<r>]: "), see
#              launch/common.sh
#   ONEREC_ROOT, ONEREC_VENV   see launch/common.sh (also the NCCL and fault-handler variables
#              it sets where not set: NCCL_DEBUG=WARN, PYTHONFAULTHANDLER=1, ...)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

LAUNCHER="${LAUNCHER:-torchrun}"
# SIGUSR1/SIGTERM: passed on to the running stage (launch/common.sh), and no later stage starts.
onerec_trap_signals

# `onerec plan` resolves the config, saves it to <out>/config.yaml (as `onerec pipeline`
# does) and prints the stages this config runs, from the same stage table as the CLI, one
# "<stage> <distributed 0|1> <run 0|1> <why>" line each: run=0 for a stage whose output is
# fresh (made from this config and the current outputs before it), as `onerec pipeline` skips.
plan_args=()
if [[ "${FORCE:-0}" == "1" ]]; then
    plan_args+=(--force)
fi
plan="$("$ONEREC" plan "${plan_args[@]}" "$@")" || { echo "pipeline: could not resolve the config" >&2; exit 2; }

# stage_command STAGE DISTRIBUTED ARGS...: STAGE_CMD=(the command that runs STAGE): on every
# rank of the chosen launcher for a `distributed` stage of the stage table, else one process.
stage_command() {
    local stage="$1" is_distributed="$2"
    shift 2
    if [[ "$is_distributed" != "1" ]]; then
        STAGE_CMD=("$ONEREC" "$stage" "$@")
        return 0
    fi
    case "$LAUNCHER" in
        torchrun) STAGE_CMD=(env STAGE="$stage" "$ONEREC_ROOT/launch/torchrun.sh" "$@") ;;
        deepspeed) STAGE_CMD=(env STAGE="$stage" "$ONEREC_ROOT/launch/deepspeed.sh" "$@") ;;
        # REQUEUE=0: pipeline.sbatch requeues the job once this script has stopped.
        slurm) STAGE_CMD=(env STAGE="$stage" REQUEUE=0 bash "$ONEREC_ROOT/launch/slurm/pretrain.sbatch" "$@") ;;
        none)
            onerec_stage_args "$@"
            STAGE_CMD=("$ONEREC" "$stage" "${ONEREC_ARGS[@]}")
            ;;
        *) echo "pipeline: LAUNCHER=$LAUNCHER: expected torchrun, deepspeed, slurm or none" >&2; exit 2 ;;
    esac
}

while IFS=$'\t' read -r stage is_distributed needs_run why; do
    if [[ -n "$ONEREC_SIGNALLED" ]]; then
        echo "pipeline: stopped on SIG$ONEREC_SIGNALLED before $stage; run the same command again to continue"
        exit "$ONEREC_REQUEUE_EXIT"
    fi
    if [[ "$needs_run" == "0" ]]; then
        echo "pipeline: $stage up to date, skipping"
        continue
    fi
    echo "pipeline: == $stage == ($why)"
    started=$SECONDS
    stage_command "$stage" "$is_distributed" "$@"
    onerec_run "${STAGE_CMD[@]}"
    if [[ "$ONEREC_RC" == "$ONEREC_REQUEUE_EXIT" ]]; then
        echo "pipeline: $stage stopped on a signal after $((SECONDS - started)) s (exit $ONEREC_REQUEUE_EXIT); run the same command again to continue"
        exit "$ONEREC_REQUEUE_EXIT"
    elif [[ "$ONEREC_RC" != "0" ]]; then
        echo "pipeline: $stage failed (exit $ONEREC_RC)" >&2
        exit "$ONEREC_RC"
    fi
    echo "pipeline: $stage took $((SECONDS - started)) s"
done <<< "$plan"
echo "pipeline: done"
