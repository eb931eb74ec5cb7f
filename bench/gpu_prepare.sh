#!/usr/bin/env bash
# Build here, on a machine with the project's virtualenv and a package registry, what
# bench/gpu_check.sh needs on a lent GPU machine and cannot fetch there:
#
#   .whl/         Python 3.12 manylinux x86_64 wheels of the packages the GPU checks import
#                 and that machine lacks (it has torch, Triton, the nvidia-* libraries, numpy,
#                 pyarrow, pandas, huggingface-hub, pytest, hypothesis, matplotlib, ...: see
#                 the package list of its kind), at the versions of this virtualenv
#   .gpu_data/    the Beauty run directory's data/ and semantic_ids/ (no embedding cache),
#                 so the GPU side only pretrains: it needs neither the raw data nor the text
#                 encoder (sentence-transformers) nor the SASRec baseline
#
#     bash bench/gpu_prepare.sh            # then: the `run` call in bench/gpu_check.sh's header
#
# Both folders are ignored by git (.gitignore: /.whl/ and /.gpu_data/) and travel with the
# `run` call's carry list; together with the working tree they must stay under 64 MiB, which
# this script measures at the end (and fails above).
#
# Semantic IDs: the committed Beauty config blends co-occurrence and SASRec item vectors
# (tokenizer.collaborative_source=cooccurrence+sasrec); SASRec takes ~11 min on this CPU, so
# the GPU check tokenizes with co-occurrence vectors only (tokenizer.collaborative_source=
# cooccurrence). The pretrain there measures GPU speed and gives a sanity metric; it does not
# reproduce the committed result. The text embedding of 12k items takes about 10 min on a
# 2-core CPU; a second run reuses the run directory (GPU_PREPARE_RUN) and skips finished stages
# (delete that directory to rebuild the inputs, e.g. after a change to the data or tokenize stage).
#
# Environment: PYTHON (default .venv/bin/python), BEAUTY_ROOT (default ../shared/data/
# amazon2014_beauty), GPU_PREPARE_RUN (default runs/gpu_prepare_beauty), GPU_PREPARE_EXTRA
# (more NAME==VERSION wheels for packages the GPU machine lacks or has too old; mind the size:
# a pyarrow wheel alone is ~52 MiB and would not fit beside the rest).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-.venv/bin/python}
BEAUTY_ROOT=${BEAUTY_ROOT:-../shared/data/amazon2014_beauty}
RUN=${GPU_PREPARE_RUN:-runs/gpu_prepare_beauty}
WHEELS=.whl
DATA=.gpu_data
LIMIT_MIB=64
# The overrides gpu_check.sh must repeat: the pretrain stage reads what these stages wrote.
# data.root here only, since the GPU side never reads raw data.
OVERRIDES=(tokenizer.collaborative_source=cooccurrence)

[[ -x $PY ]] || { echo "no Python at $PY (make venv, or set PYTHON)" >&2; exit 1; }
[[ -d $BEAUTY_ROOT ]] || { echo "no Beauty data at $BEAUTY_ROOT (set BEAUTY_ROOT)" >&2; exit 1; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ONEREC_NO_PROGRESS=1 HF_HUB_OFFLINE=1

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

# ---------------------------------------------------------------------------- wheels
# What `onerec pretrain`, bench/kernels.py, bench/train_throughput.py and tests/kernels import
# beyond the GPU machine's own packages (found with `python -X importtime` and the packages'
# Requires-Dist): datasets (Arrow tables; with dill and multiprocess), omegaconf (configs),
# deepspeed (the training engine; with hjson and pydantic), megatron-core (the kernels'
# routing oracle and MoE baseline), typing-extensions at the version pydantic needs.
# setuptools>=77 builds the editable install of onerec there (its build-system requirement);
# gpu_check.sh keeps it out of the runtime path.
PACKAGES=(datasets dill multiprocess omegaconf pydantic pydantic-core annotated-types typing-inspection
          typing-extensions hjson megatron-core setuptools)
pins=()
for name in "${PACKAGES[@]}"; do pins+=("$name==$(version "$name")"); done
# shellcheck disable=SC2206  # GPU_PREPARE_EXTRA is a space-separated list on purpose
pins+=(${GPU_PREPARE_EXTRA:-})

rm -rf "$WHEELS"
mkdir -p "$WHEELS"
echo "== wheels for Python 3.12, manylinux x86_64: ${pins[*]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$WHEELS" "${pins[@]}"
# DeepSpeed ships only as an sdist whose setup imports torch: build it here against our torch,
# with no ops compiled ahead (DS_BUILD_OPS=0, its default), which gives a pure-Python wheel.
echo "== deepspeed wheel (pure Python)"
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WHEELS" "deepspeed==$(version deepspeed)"
for wheel in "$WHEELS"/deepspeed-*.whl; do
    if [[ $wheel != *-py3-none-any.whl ]]; then
        echo "deepspeed built a platform wheel ($wheel); expected py3-none-any" >&2
        exit 1
    fi
done

# ---------------------------------------------------------------------------- Beauty inputs
# The CLI, not the stage modules: the command line stays stable when modules move.
onerec() { "$PY" -m onerec "$@"; }
CONFIG=configs/beauty/pipeline.yaml
if [[ ! -f $RUN/data/meta.json ]]; then
    echo "== onerec data ($RUN)"
    onerec data --config "$CONFIG" "data.root=$BEAUTY_ROOT" "run.out_dir=$RUN" "${OVERRIDES[@]}"
fi
if [[ ! -f $RUN/semantic_ids/semantic_ids.json ]]; then
    echo "== onerec tokenize ($RUN; about 10 min on 2 CPU cores, most of it the text encoder)"
    onerec tokenize --config "$CONFIG" "data.root=$BEAUTY_ROOT" "run.out_dir=$RUN" "${OVERRIDES[@]}"
fi

rm -rf "$DATA"
mkdir -p "$DATA/beauty"
cp -r "$RUN/data" "$DATA/beauty/data"
# semantic_ids/cache holds the text embeddings (18 MB): only tokenize reads them.
mkdir -p "$DATA/beauty/semantic_ids"
find "$RUN/semantic_ids" -maxdepth 1 -type f -exec cp {} "$DATA/beauty/semantic_ids/" \;
"$PY" - "$DATA/beauty/PREPARED.json" "$CONFIG" "$BEAUTY_ROOT" "${OVERRIDES[@]}" <<'EOF'
"""Provenance of the carried Beauty inputs, read back by gpu_check.sh."""
import datetime, json, subprocess, sys
path, config, root, *overrides = sys.argv[1:]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
json.dump({"config": config, "data_root": root, "overrides": overrides, "prepared": datetime.date.today().isoformat(),
           "commit": commit, "stages": ["data", "tokenize"]}, open(path, "w"), indent=2)
EOF

# ---------------------------------------------------------------------------- size
# What a `run` call sends: tracked and untracked-not-ignored files, plus the carried paths.
# (The carried folders are left out of the tree's count in case .gitignore does not list them yet.)
tree_bytes=$(git ls-files -z --cached --others --exclude-standard -- . ":!$WHEELS" ":!$DATA" |
    du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
wheel_bytes=$(du -sb "$WHEELS" | cut -f1)
data_bytes=$(du -sb "$DATA" | cut -f1)
total=$((tree_bytes + wheel_bytes + data_bytes))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo
echo "| what travels | size |"
echo "|---|---|"
echo "| working tree (tracked + untracked, not ignored) | $(mib "$tree_bytes") |"
echo "| $WHEELS ($(find "$WHEELS" -type f -name '*.whl' | wc -l) wheels) | $(mib "$wheel_bytes") |"
echo "| $DATA (Beauty data/ + semantic_ids/) | $(mib "$data_bytes") |"
echo "| total (limit $LIMIT_MIB MiB) | $(mib "$total") |"
if ((total > LIMIT_MIB * 1048576)); then
    echo "over the $LIMIT_MIB MiB a run call may carry" >&2
    exit 1
fi
git check-ignore -q "$WHEELS" && git check-ignore -q "$DATA" ||
    echo "warning: $WHEELS or $DATA is not ignored by git; add /$WHEELS/ and /$DATA/ to .gitignore" >&2
