# Sourced by the launch scripts (not run on its own): finds the repository and its Python
# tools, and picks DeepSpeed's CPU accelerator on a machine without a GPU.
#
# Env knobs (all optional):
#   ONEREC_ROOT  repository root (default: the directory above launch/, or under Slurm the
#                submission directory, since sbatch runs a copy of the script from its spool)
#   ONEREC_VENV  virtual environment whose python, torchrun, deepspeed and onerec are used
#                (default: $ONEREC_ROOT/.venv when it exists; in the Docker image onerec is
#                installed system-wide and the tools are taken from PATH)
#   ONEREC_PYTHON, TORCHRUN, DEEPSPEED, ONEREC   override one tool each

if [[ -z "${ONEREC_ROOT:-}" ]]; then
    if [[ -n "${SLURM_SUBMIT_DIR:-}" && -f "${SLURM_SUBMIT_DIR}/launch/common.sh" ]]; then
        ONEREC_ROOT="$SLURM_SUBMIT_DIR"
    else
        ONEREC_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    fi
fi
export ONEREC_ROOT

# The tools are named by path; PATH itself is left alone. Putting the venv's bin/ first
# would also switch the `ninja` that torch uses to JIT-build DeepSpeed's CPU comm op (pip's
# ninja instead of the system's): two ninja versions log the build under different command
# hashes, so processes started from here and from elsewhere would keep rebuilding it.
ONEREC_VENV="${ONEREC_VENV:-$ONEREC_ROOT/.venv}"
onerec_bin=""
if [[ -x "$ONEREC_VENV/bin/python" ]]; then
    onerec_bin="$ONEREC_VENV/bin/"
fi
ONEREC_PYTHON="${ONEREC_PYTHON:-${onerec_bin}python}"
TORCHRUN="${TORCHRUN:-${onerec_bin}torchrun}"
DEEPSPEED="${DEEPSPEED:-${onerec_bin}deepspeed}"
ONEREC="${ONEREC:-${onerec_bin}onerec}"

# How many GPUs this node has (0 on a CPU node): the default processes per node.
onerec_local_gpus() {
    if command -v nvidia-smi > /dev/null 2>&1; then
        nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

if [[ "$(onerec_local_gpus)" == "0" ]]; then
    # DeepSpeed picks its accelerator when first imported, launchers included; on a CPU
    # node it must be told (training then runs on gloo, see onerec/distributed/deepspeed.py).
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi

# torchrun normally lends its rendezvous TCPStore to the workers, and keeps the same store
# across restarts without a per-attempt key prefix: after `--max_restarts` brings workers
# back, a fast worker can read a peer's address left by the killed attempt and fail gloo's
# connectFullMesh ("Connection refused"). Opting out gives every attempt a fresh store on a
# new port (hosted by global rank 0).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"

# ONEREC_ARGS=("$@" train.resume=$RESUME): training resumes from its newest valid checkpoint
# unless told otherwise, so a requeued or restarted job continues instead of starting over.
# RESUME=none starts afresh; a train.resume=... or --resume among the arguments wins.
onerec_stage_args() {
    ONEREC_ARGS=("$@")
    local arg
    for arg in "$@"; do
        case "$arg" in
            train.resume=* | --resume | --resume=*) return 0 ;;
        esac
    done
    ONEREC_ARGS+=("train.resume=${RESUME:-auto}")
}
