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
# Usage:
#   launch/pipeline.sh --config configs/demo.yaml run.out_dir=runs/demo [key=value ...]
#   NPROC_PER_NODE=8 launch/pipeline.sh --config configs/beauty/pipeline.yaml run.out_dir=runs/beauty
#   LAUNCHER=deepspeed HOSTFILE=hosts launch/pipeline.sh --config ...
#   sbatch --nodes 4 launch/slurm/pipeline.sbatch --config ...     # LAUNCHER=slurm
#
# The arguments go to every `onerec <stage>` unchanged: --config FILE and key=value overrides.
#
# Env knobs:
#   LAUNCHER   how the distributed stages (tokenize, sharding the items; pretrain) run: torchrun (default;
#              launch/torchrun.sh, see its knobs), deepspeed (launch/deepspeed.sh), slurm
#              (launch/slurm/pretrain.sbatch inside the current allocation), none (one
#              plain process)
#   FORCE      1: rerun every stage, also those whose output is fresh
#   RESUME     auto (default) | none: train.resume for pretraining
#   ONEREC_ROOT, ONEREC_VENV   see launch/common.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

LAUNCHER="${LAUNCHER:-torchrun}"

# `onerec plan` resolves the config, saves it to <out>/config.yaml (as `onerec pipeline`
# does) and prints the stages this config runs, from the same stage table as the CLI, one
# "<stage> <distributed 0|1> <run 0|1> <why>" line each: run=0 for a stage whose output is
# fresh (made from this config and the current outputs before it), as `onerec pipeline` skips.
plan_args=()
if [[ "${FORCE:-0}" == "1" ]]; then
    plan_args+=(--force)
fi
plan="$("$ONEREC" plan "${plan_args[@]}" "$@")" || { echo "pipeline: could not resolve the config" >&2; exit 2; }

# distributed STAGE ARGS...: a stage on every rank of the chosen launcher (`distributed` in the stage table).
distributed() {
    local stage="$1"
    shift
    case "$LAUNCHER" in
        torchrun) STAGE="$stage" "$ONEREC_ROOT/launch/torchrun.sh" "$@" ;;
        deepspeed) STAGE="$stage" "$ONEREC_ROOT/launch/deepspeed.sh" "$@" ;;
        slurm) STAGE="$stage" bash "$ONEREC_ROOT/launch/slurm/pretrain.sbatch" "$@" ;;
        none)
            onerec_stage_args "$@"
            "$ONEREC" "$stage" "${ONEREC_ARGS[@]}"
            ;;
        *) echo "pipeline: LAUNCHER=$LAUNCHER: expected torchrun, deepspeed, slurm or none" >&2; return 2 ;;
    esac
}

while IFS=$'\t' read -r stage is_distributed needs_run why; do
    if [[ "$needs_run" == "0" ]]; then
        echo "pipeline: $stage up to date, skipping"
        continue
    fi
    echo "pipeline: == $stage == ($why)"
    started=$SECONDS
    if [[ "$is_distributed" == "1" ]]; then
        distributed "$stage" "$@"
    else
        "$ONEREC" "$stage" "$@"
    fi
    echo "pipeline: $stage took $((SECONDS - started)) s"
done <<< "$plan"
echo "pipeline: done"
