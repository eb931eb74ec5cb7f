#!/usr/bin/env bash
# Every stage in order, training under a distributed launcher, each stage resumable:
#
#   data -> tokenize -> pretrain [-> reward] [-> dpo] -> evaluate      (all under run.out_dir)
#
# A stage whose output is already complete is skipped (stages write into a temporary
# directory and rename it into place, so an output that exists is whole); pretraining runs
# with train.resume=auto, so after a crash or a preemption the same command continues from
# the newest valid checkpoint. FORCE=1 reruns every stage.
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
#   LAUNCHER   how pretraining runs: torchrun (default; launch/torchrun.sh, see its knobs),
#              deepspeed (launch/deepspeed.sh), slurm (launch/slurm/pretrain.sbatch inside
#              the current allocation), none (one plain process)
#   FORCE      1: rerun stages whose output exists
#   RESUME     auto (default) | none: train.resume for pretraining
#   ONEREC_ROOT, ONEREC_VENV   see launch/common.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

LAUNCHER="${LAUNCHER:-torchrun}"

# The resolved config decides where outputs go and which optional stages run; saving it
# to <out>/config.yaml here is what `onerec pipeline` does too.
read -r OUT_DIR REWARD ALIGN < <("$ONEREC_PYTHON" - "$@" << 'EOF'
import sys
from onerec.cli import build_parser
from onerec.config import load_config
from onerec.pipeline import save_resolved_config

args = build_parser().parse_args(["pipeline", *sys.argv[1:]])
cfg = load_config(args.config, list(args.overrides))
save_resolved_config(cfg)
print(cfg.run.out_dir, int(cfg.reward.enabled), int(cfg.align.enabled))
EOF
)
[[ -n "$OUT_DIR" ]] || { echo "pipeline: could not resolve the config" >&2; exit 2; }

# run_stage NAME OUTPUT COMMAND...: run COMMAND unless OUTPUT exists (or FORCE=1).
run_stage() {
    local name="$1" output="$2"
    shift 2
    if [[ "${FORCE:-0}" != "1" && -e "$output" ]]; then
        echo "pipeline: $name already done ($output), skipping"
        return
    fi
    echo "pipeline: == $name =="
    local started=$SECONDS
    "$@"
    echo "pipeline: $name took $((SECONDS - started)) s"
}

pretrain() {
    case "$LAUNCHER" in
        torchrun) STAGE=pretrain "$ONEREC_ROOT/launch/torchrun.sh" "$@" ;;
        deepspeed) STAGE=pretrain "$ONEREC_ROOT/launch/deepspeed.sh" "$@" ;;
        slurm) bash "$ONEREC_ROOT/launch/slurm/pretrain.sbatch" "$@" ;;
        none)
            onerec_stage_args "$@"
            "$ONEREC" pretrain "${ONEREC_ARGS[@]}"
            ;;
        *) echo "pipeline: LAUNCHER=$LAUNCHER: expected torchrun, deepspeed, slurm or none" >&2; return 2 ;;
    esac
}

run_stage data "$OUT_DIR/data/meta.json" "$ONEREC" data "$@"
run_stage tokenize "$OUT_DIR/semantic_ids/semantic_ids.json" "$ONEREC" tokenize "$@"
run_stage pretrain "$OUT_DIR/pretrain/export/model.safetensors" pretrain "$@"
if [[ "$REWARD" == "1" ]]; then
    run_stage reward "$OUT_DIR/reward/reward.json" "$ONEREC" reward "$@"
fi
if [[ "$ALIGN" == "1" ]]; then
    run_stage dpo "$OUT_DIR/dpo/alignment.json" "$ONEREC" dpo "$@"
fi
run_stage evaluate "$OUT_DIR/metrics.json" "$ONEREC" evaluate "$@"
echo "pipeline: done, metrics in $OUT_DIR/metrics.json"
