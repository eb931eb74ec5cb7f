#!/usr/bin/env bash
# Everything that needs a GPU, in one call of about 8 minutes at most on one H100/H200:
#
#   setup             carried wheels -> /tmp/site, editable install of onerec, import check
#   kernel_tests      tests/kernels on CUDA (`-k cuda`: the Triton kernels against their
#                     references, the routing against megatron-core)
#   kernels_bench     bench/kernels.py --device cuda           -> kernels_<device>.{json,md,png}
#   train_throughput  bench/train_throughput.py, bf16, MFU     -> train_throughput_<device>.{json,md,png}
#                     (every visible GPU; on one GPU ep=2 is skipped and the json says so)
#   pretrain          `onerec pretrain` on Beauty, 1 GPU, GPU_CHECK_PRETRAIN_STEPS (600) steps
#                     -> gpu_pretrain_<device>.json: validation NDCG@10 / Recall@10, tokens/s
#   inference         bench/inference.py --device cuda on the pretrain part's export
#                     -> inference_<device>.{json,md,png}
#
# then a summary table (also gpu_check_<device>.md). <device> is the slug the bench scripts use
# (h100, h200, ...). Each part runs under its own timeout, shortened so that the parts together
# stay within GPU_CHECK_BUDGET_S (480 s): a hung part costs its share, not the call. With $OUT
# set (the lent machine), the result files are copied there after every part, so a call that
# is cut off still returns what it measured: gpu_check_<device>.tar.gz (every result file and
# log), gpu_check_<device>.md, gpu_check_<device>.log and the result json files.
#
# The Beauty semantic IDs are built from co-occurrence vectors only
# (tokenizer.collaborative_source=cooccurrence; the committed config also blends SASRec's item
# vectors, whose training is too long for this budget): the pretrain part measures GPU speed and
# gives a sanity metric, not the committed quality result. For comparison, the same command with
# run.device=cpu (fp32, 1 thread; 2-core AMD EPYC, shared, 2026-11-30) measured validation
# NDCG@10 0.0243 / Recall@10 0.0497 at step 300 and 0.0372 / 0.0710 at step 600 (3,000 users;
# one standard error of that Recall@10 is about 0.005), at a median 12,075 tokens/s.
#
# Before the call, here (CPU, network): bash bench/gpu_prepare.sh  (builds .whl/ and .gpu_data/)
# The call (device tool `run`):
#   command:   bash bench/gpu_check.sh
#   carry:     [".whl", ".gpu_data"]
#   timeout_s: 560
# Afterwards: unpack files_at/gpu_check_<device>.tar.gz into bench/results/ (results/ holds
# the result files, logs/ the per-part logs).
#
# Environment: GPU_CHECK_DRY_RUN=1 runs every part here on the CPU at tiny sizes (wiring check;
# results go to a temporary folder, never bench/results); GPU_CHECK_PARTS="pretrain inference"
# runs some parts only (setup always runs); GPU_CHECK_BUDGET_S; GPU_CHECK_PRETRAIN_STEPS;
# GPU_CHECK_RESULTS (results folder); PYTHON (default python3; .venv/bin/python in a dry run).
set -uo pipefail  # no -e: a failed part is reported and the next one still runs
SELF=$(realpath "${BASH_SOURCE[0]}")
cd "$(dirname "$SELF")/.." || exit

DRY=${GPU_CHECK_DRY_RUN:-0}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
PARTS=${GPU_CHECK_PARTS:-kernel_tests kernels_bench train_throughput pretrain inference}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
if [[ $DRY == 1 ]]; then
    PY=${PYTHON:-.venv/bin/python}
    RESULTS=${GPU_CHECK_RESULTS:-$WORK/results}
    STEPS=${GPU_CHECK_PRETRAIN_STEPS:-4}
else
    PY=${PYTHON:-python3}
    RESULTS=${GPU_CHECK_RESULTS:-bench/results}
    STEPS=${GPU_CHECK_PRETRAIN_STEPS:-600}
fi
LOGS=$WORK/logs
CONFIG=configs/beauty/pipeline.yaml
# Same as gpu_prepare.sh: the pretrain stage reads the semantic IDs those overrides produced.
PREPARED_OVERRIDES=(tokenizer.collaborative_source=cooccurrence)
export PYTHONUNBUFFERED=1 ONEREC_NO_PROGRESS=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
[[ $DRY == 1 ]] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# Per-part caps in seconds (typical H200 times are well under them).
declare -A CAP=([setup]=60 [kernel_tests]=90 [kernels_bench]=90 [train_throughput]=75 [pretrain]=150 [inference]=60)

# ---------------------------------------------------------------------------------- the parts
# Each part is a function; the script runs it as `gpu_check.sh --part NAME` under `timeout`, so
# that a hung part (and every process it started) is stopped at its cap.

part_kernel_tests() {
    local xml=$LOGS/kernel_tests.xml
    if [[ $DRY == 1 ]]; then  # no CUDA here: check that the kernel tests import and collect
        "$PY" -m pytest -q -p no:cacheprovider --collect-only tests/kernels
        return
    fi
    "$PY" -m pytest -q -p no:cacheprovider -rs -k cuda --junitxml="$xml" tests/kernels
}

part_kernels_bench() {
    if [[ $DRY == 1 ]]; then
        "$PY" bench/kernels.py --device cpu --catalogues 2000 --requests 4 --beam 8 --moe-tokens 64 \
            --warmup 0 --repeats 1 --baseline-repeats 1 --out-dir "$RESULTS"
    else
        "$PY" bench/kernels.py --device cuda --out-dir "$RESULTS"
    fi
}

part_train_throughput() {
    if [[ $DRY == 1 ]]; then  # CPU: 2 gloo ranks
        "$PY" bench/train_throughput.py --presets small --steps 1 --warmup 0 --batch-size 4 --results-dir "$RESULTS"
    else  # the pretrain batch (256) per GPU: the bench's default 32 would time launch overhead
        "$PY" bench/train_throughput.py --steps 20 --warmup 3 --batch-size 256 --results-dir "$RESULTS"
    fi
}

pretrain_overrides() {
    local args=("run.out_dir=$WORK/beauty" "${PREPARED_OVERRIDES[@]}" "train.max_steps=$STEPS"
                "train.eval_every=$(((STEPS + 1) / 2))" train.checkpoint_every=1000000)
    if [[ $DRY == 1 ]]; then
        args+=(run.device=cpu train.batch_size=32 eval.max_valid_users=64 train.log_every=1)
    else
        args+=(run.device=cuda)
    fi
    printf '%s\n' "${args[@]}"
}

part_pretrain() {
    if [[ ! -f .gpu_data/beauty/semantic_ids/semantic_ids.json ]]; then
        echo "no .gpu_data/beauty: run bash bench/gpu_prepare.sh here and carry .gpu_data"
        return 1
    fi
    rm -rf "$WORK/beauty"
    mkdir -p "$WORK/beauty"
    cp -r .gpu_data/beauty/data .gpu_data/beauty/semantic_ids "$WORK/beauty/"
    local overrides
    mapfile -t overrides < <(pretrain_overrides)
    echo "onerec pretrain --config $CONFIG ${overrides[*]}"
    "$PY" -m onerec pretrain --config "$CONFIG" "${overrides[@]}"
}

part_inference() {
    if [[ ! -f bench/inference.py ]]; then
        echo "skipped: no bench/inference.py"
        return 0
    fi
    if [[ $DRY == 1 ]]; then
        "$PY" bench/inference.py --help >/dev/null
        return
    fi
    # The pretrain part's export (the Beauty model, GPU_CHECK_PRETRAIN_STEPS steps): Beauty cells
    # and its test split only, short cells, to fit the cap. transformers' T5 runs when the
    # machine has transformers (it is not among the carried wheels); the json says which ran.
    local export=$WORK/beauty/pretrain/export
    if [[ ! -f $export/model.safetensors ]]; then
        echo "skipped: no export at $export (the pretrain part did not finish)"
        return 1
    fi
    "$PY" bench/inference.py --device cuda --export "$export" --data-dir "$WORK/beauty/data" \
        --catalogues beauty --seconds-per-cell 3 --repetitions 100 --out "$RESULTS"
}

part_setup() {
    if [[ $DRY == 1 ]]; then  # the virtualenv has every dependency; check the carried wheels exist
        ls .whl/*.whl >/dev/null || { echo "no .whl/: run bash bench/gpu_prepare.sh"; return 1; }
    else
        # Runtime packages into /tmp/site (on PYTHONPATH); setuptools only into the build path.
        local wheels=() wheel
        for wheel in .whl/*.whl; do
            [[ $wheel == .whl/setuptools-* ]] || wheels+=("$wheel")
        done
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "${wheels[@]}" || return 1
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/build-site .whl/setuptools-*.whl || return 1
        # Editable, as `make venv` does: onerec.kernels lives in kernels/ (pyproject's package-dir).
        PYTHONPATH=/tmp/build-site:/tmp/site python3 -m pip install -q --no-index --no-deps \
            --no-build-isolation --no-cache-dir -e . || return 1
    fi
    "$PY" - <<'EOF'
import importlib, sys
import torch
for name in ("onerec", "onerec.kernels", "datasets", "pyarrow", "omegaconf", "deepspeed", "triton", "megatron.core"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '')}")
    except Exception as exc:  # report every missing module at once
        print(f"{name}: NOT IMPORTABLE ({type(exc).__name__}: {exc})")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"GPUs {torch.cuda.device_count()}: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
EOF
}

if [[ ${1:-} == --part ]]; then
    "part_$2"
    exit
fi

# ---------------------------------------------------------------------------------- the runner
START=$SECONDS
rm -rf "$WORK"
mkdir -p "$LOGS" "$RESULTS"
touch "$WORK/started"  # result files newer than this one are this run's
[[ $DRY == 1 ]] || export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export WORK RESULTS LOGS PY DRY STEPS
: > "$WORK/status.tsv"

run_part() {  # NAME: run part_NAME under its timeout, log it, record status and seconds
    local name=$1 left limit t0 rc status
    left=$((BUDGET_S - (SECONDS - START)))
    limit=$((CAP[$name] < left ? CAP[$name] : left))
    if ((limit < 15)); then
        printf '%s\tskipped: out of time\t0\n' "$name" >> "$WORK/status.tsv"
        return
    fi
    echo "== [$name] up to ${limit}s ($((SECONDS - START))s used of $BUDGET_S)"
    t0=$SECONDS
    timeout --kill-after=10 "$limit" bash "$SELF" --part "$name" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out at ${limit}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    [[ $name == inference ]] && grep -q '^skipped: no bench/inference.py' "$LOGS/$name.log" && status="skipped: no bench/inference.py"
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >> "$WORK/status.tsv"
    echo "== [$name] $status, $((SECONDS - t0))s"
}

SLUG=cpu
summarize() {  # gpu_pretrain_<slug>.json from the run's metrics.jsonl, then the summary table
    "$PY" - "$SLUG" "$CONFIG" "$(pretrain_overrides | tr '\n' ' ')" <<'EOF'
"""Summary of a gpu_check.sh run: gpu_pretrain_<slug>.json and gpu_check_<slug>.md."""
import datetime, json, os, statistics, sys
import xml.etree.ElementTree as ET
from pathlib import Path

slug, config, overrides = sys.argv[1], sys.argv[2], sys.argv[3].split()
work, results, logs = Path(os.environ["WORK"]), Path(os.environ["RESULTS"]), Path(os.environ["LOGS"])
status = {}
for line in (work / "status.tsv").read_text().splitlines():
    name, state, seconds = line.split("\t")
    status[name] = (state, int(seconds))
sys.path.insert(0, "bench")
try:
    import torch
    from devices import accelerator_name
    device = accelerator_name(torch.cuda.is_available() and os.environ["DRY"] != "1")
except Exception as exc:
    device = f"unknown ({exc})"
today = datetime.date.today().isoformat()

def load(name):
    path = results / name
    return json.loads(path.read_text()) if path.is_file() and path.stat().st_mtime >= (work / "started").stat().st_mtime else None

# --- pretrain: validation metrics and throughput from metrics.jsonl (also after a timeout)
pretrain = None
jsonl = work / "beauty" / "metrics.jsonl"
if "pretrain" in status and jsonl.is_file():
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("stage") == "pretrain"]
    evals = [r for r in rows if "valid/ndcg@10" in r]
    train = [r for r in rows if "tokens_per_s" in r]
    best = max(evals, key=lambda r: r["valid/ndcg@10"]) if evals else None
    prepared = json.loads(Path(".gpu_data/beauty/PREPARED.json").read_text())
    try:  # how many validation users each evaluation scored (the config's seeded subset)
        from onerec.config import load_config
        valid_users = load_config(config, overrides).eval.max_valid_users or "all"
    except Exception as exc:
        valid_users = f"unknown ({exc})"
    rates = [r["tokens_per_s"] for r in train[1:]] or [r["tokens_per_s"] for r in train]  # first window: warm-up
    pretrain = {
        "name": "beauty", "date": today, "device": device,
        "command": f"onerec pretrain --config {config} " + " ".join(overrides),
        "inputs": prepared,
        "note": "Semantic IDs from co-occurrence item vectors only (tokenizer.collaborative_source=cooccurrence), "
                "not the committed config's cooccurrence+sasrec: a GPU speed check with a sanity metric on the "
                f"seeded validation subset (eval.max_valid_users), not the committed quality result.",
        "status": status["pretrain"][0], "seconds": status["pretrain"][1],
        "max_steps": int(next(o for o in overrides if o.startswith("train.max_steps=")).split("=")[1]),
        "steps_run": max((r["step"] for r in rows), default=0),
        "tokens_per_s_median": statistics.median(rates) if rates else None,
        "samples_per_s_median": statistics.median(r["samples_per_s"] for r in train[1:] or train) if train else None,
        "valid_users": valid_users,
        # Measured on a CPU with the same inputs and command (run.device=cpu, fp32): see gpu_check.sh.
        "reference_cpu_fp32": {"date": "2026-11-30", "device": "CPU: AMD EPYC, 2 cores (shared), 1 thread",
                               "step_300": {"ndcg@10": 0.0243, "recall@10": 0.0497},
                               "step_600": {"ndcg@10": 0.0372, "recall@10": 0.0710}, "tokens_per_s_median": 12075},
        "valid_evals": [{k.removeprefix("valid/"): v for k, v in r.items() if k.startswith("valid/") or k == "step"} for r in evals],
        "valid_best": {k.removeprefix("valid/"): v for k, v in best.items() if k.startswith("valid/") or k == "step"} if best else None,
    }
    (results / f"gpu_pretrain_{slug}.json").write_text(json.dumps(pretrain, indent=2) + "\n")

# --- the table
def detail(name):
    if name == "kernel_tests":
        xml = logs / "kernel_tests.xml"
        if xml.is_file():
            suite = ET.parse(xml).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
            return f"{n - f - e - s} passed, {f} failed, {e} errors, {s} skipped (CUDA tests only)"
        return "collected only (dry run)" if os.environ["DRY"] == "1" else "no junit xml"
    if name == "kernels_bench" and (k := load(f"kernels_{slug}.json")):
        parts = []
        if k.get("decode"):
            d = k["decode"][-1]
            parts.append(f"decode {d['items']:,} items: ours {d['ours_ms_per_step']:.3f} ms/step, {d['speedup']:.0f}x hf-style")
        for m in k.get("moe", []):
            if "layer_ms" in m:
                parts.append(f"MoE {m['name']} {m['layer_ms']:.2f} ms ({m['tflops']:.3g} TFLOP/s)")
        return "; ".join(parts)
    if name == "train_throughput" and (t := load(f"train_throughput_{slug}.json")):
        rows = [f"{r['preset']} ep={r['ep']}: {r['tokens_per_s']:,.0f} tok/s, MFU {r['mfu']:.1%}" for r in t["rows"]]
        return "; ".join(rows + [f"skipped {s.split(':')[0]}" for s in t.get("skipped", [])])
    if name == "pretrain" and pretrain:
        b = pretrain["valid_best"]
        metric = f"valid NDCG@10 {b['ndcg@10']:.4f}, Recall@10 {b['recall@10']:.4f} (step {b['step']})" if b else "no evaluation"
        rate = f", {pretrain['tokens_per_s_median']:,.0f} tok/s" if pretrain["tokens_per_s_median"] else ""
        reference = " (CPU fp32 at step 600: 0.0372, 0.0710)" if pretrain["max_steps"] == 600 else ""
        return f"{pretrain['steps_run']}/{pretrain['max_steps']} steps; {metric}{reference}{rate}"
    return ""

lines = [f"## GPU check on {device} ({today})", "", "| part | status | seconds | result |", "|---|---|---:|---|"]
lines += [f"| {name} | {state} | {seconds} | {detail(name)} |" for name, (state, seconds) in status.items()]
lines += ["", f"Results in {results}/ (*_{slug}.*); logs in {logs}/. Pretrain: co-occurrence semantic IDs, "
          "a sanity metric, not the committed result."]
table = "\n".join(lines) + "\n"
(results / f"gpu_check_{slug}.md").write_text(table)
print(table)
EOF
}

collect_out() {  # copy this run's files to $OUT (at most 8 files come back)
    [[ -n ${OUT:-} && -d ${OUT:-} ]] || return 0
    local stage=$WORK/out_stage
    rm -rf "$stage"
    mkdir -p "$stage/results" "$stage/logs"
    find "$RESULTS" -maxdepth 1 -type f -newer "$WORK/started" -exec cp {} "$stage/results/" \;
    cp "$LOGS"/* "$stage/logs/" 2>/dev/null
    tar -czf "$OUT/gpu_check_$SLUG.tar.gz" -C "$stage" results logs
    cat "$LOGS"/*.log > "$OUT/gpu_check_$SLUG.log" 2>/dev/null
    [[ -f $RESULTS/gpu_check_$SLUG.md ]] && cp "$RESULTS/gpu_check_$SLUG.md" "$OUT/"
    find "$stage/results" -name '*.json' | head -5 | xargs -r cp -t "$OUT/"
}

run_part setup
SLUG=$("$PY" - "$DRY" <<'EOF'
import sys
import torch
sys.path.insert(0, "bench")
from devices import accelerator_name, device_slug
cuda = torch.cuda.is_available() and sys.argv[1] != "1"
print(device_slug(torch.device("cuda" if cuda else "cpu"), accelerator_name(cuda)))
EOF
) || SLUG=unknown
if [[ $DRY != 1 && $SLUG == cpu ]]; then
    echo "no CUDA device visible to torch: nothing to measure (GPU_CHECK_DRY_RUN=1 checks the wiring on a CPU)"
    collect_out
    exit 1
fi
collect_out
for name in $PARTS; do
    [[ -v "CAP[$name]" ]] || { echo "unknown part $name (known: ${!CAP[*]})"; continue; }
    run_part "$name"
    collect_out
done
summarize 2>&1 | tee "$LOGS/summary.log"
collect_out
echo "gpu_check: $((SECONDS - START))s in all"
# Exit status: 1 when a part failed or timed out (the table above says which).
awk -F'\t' '$2 ~ /^(failed|timed out)/ { bad = 1 } END { exit bad }' "$WORK/status.tsv"
