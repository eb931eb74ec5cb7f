# shellcheck shell=bash
# Sourced by the launch scripts (not run on its own): finds the repository and its Python
# tools, picks DeepSpeed's CPU accelerator on a machine without a GPU, sets the usual
# diagnostics for distributed jobs, and passes SIGUSR1/SIGTERM on to the stage it runs
# (see "Signals" below and docs/distributed.md#preemption-and-time-limits).
#
# Env knobs (all optional):
#   ONEREC_ROOT  repository root (default: the directory above launch/, or under Slurm the
#                submission directory, since sbatch runs a copy of the script from its spool)
#   ONEREC_VENV  virtual environment whose python, torchrun, deepspeed and onerec are used
#                (default: $ONEREC_ROOT/.venv when it exists; in the Docker image onerec is
#                installed system-wide and the tools are taken from PATH)
#   ONEREC_PYTHON, TORCHRUN, DEEPSPEED, ONEREC   override one tool each
#   torchrun's logs (launch/torchrun.sh and launch/slurm/pretrain.sbatch):
#   TEE          torchrun --tee (default 3: every rank's stdout and stderr reach the console,
#                each line prefixed with its rank, and the rank's own files under LOG_DIR);
#                0: the workers write to the console directly, without the prefix
#   REDIRECTS    torchrun --redirects (default 0; 3 with TEE=0: every rank's output goes to its
#                files only)
#   LOG_DIR      torchrun --log-dir: the per-rank files are
#                LOG_DIR/<run id>_*/attempt_<restart>/<local rank>/{stdout,stderr}.log
#                (default: torchrun's, a new /tmp/torchelastic_* directory per run)
#   LOCAL_RANKS_FILTER  torchrun --local-ranks-filter: the local ranks shown on the console,
#                e.g. 0 (default: all); the files still get every rank's output
#   LOG_PREFIX   prefix of each worker line on the console, a torchrun template with ${rank}
#                (global), ${local_rank}, ${role_name} (default '[rank${rank}]: '); it is
#                exported as TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE, which wins when set
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT   seconds torchrun gives its workers to stop after it passed
#                a signal on, before SIGKILL (torchrun's default 30): a step plus a checkpoint
#                must fit, and it must stay below the Slurm warning time
#   REQUEUE      Slurm scripts: 1 (default) requeue the job after a stop on a signal; 0 only
#                exit with the requeue code (75)

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

# ------------------------------------------------------------------------- diagnostics
# For every process the launchers start, each only where the user has not set it:
#   PYTHONFAULTHANDLER=1            a hard crash (SIGSEGV, SIGABRT, SIGBUS, ...) prints every
#                                   thread's Python traceback
#   TORCH_SHOW_CPP_STACKTRACES=1    torch errors carry their C++ frames
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1   a failed or timed-out NCCL collective ends the process
#                                   instead of hanging it, so the launcher can restart or stop
#                                   the job (torchrun sets it for its workers; srun and the
#                                   DeepSpeed launcher do not)
#   NCCL_DEBUG=WARN                 NCCL's warnings (INFO adds its set-up: rings, transports)
#   PYTHONUNBUFFERED=1              output reaches the console and torchrun's per-rank files as
#                                   it is written, not when a buffer fills
export PYTHONFAULTHANDLER="${PYTHONFAULTHANDLER:-1}"
export TORCH_SHOW_CPP_STACKTRACES="${TORCH_SHOW_CPP_STACKTRACES:-1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"

# torchrun passes SIGTERM, SIGINT, SIGHUP and SIGQUIT on to its workers; SIGUSR1 (Slurm's
# warning) would end torchrun itself and leave its workers running, so it is added (PET_* is
# torchrun's environment form of --signals-to-handle; a torchrun without that option ignores
# it, and the launch scripts below send torchrun SIGTERM, which every version passes on).
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"

# onerec_torchrun_log_args: TORCHRUN_LOG_ARGS=(torchrun's log options from the knobs above).
onerec_torchrun_log_args() {
    TORCHRUN_LOG_ARGS=(--tee "${TEE:-3}" --redirects "${REDIRECTS:-0}")
    if [[ -n "${LOG_DIR:-}" ]]; then
        TORCHRUN_LOG_ARGS+=(--log-dir "$LOG_DIR")
    fi
    if [[ -n "${LOCAL_RANKS_FILTER:-}" ]]; then
        TORCHRUN_LOG_ARGS+=(--local-ranks-filter "$LOCAL_RANKS_FILTER")
    fi
    # shellcheck disable=SC2016  # ${rank} is torchrun's template, not the shell's
    local default_prefix='[rank${rank}]: '
    export TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE="${TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE:-${LOG_PREFIX:-$default_prefix}}"
}

# ----------------------------------------------------------------------------- signals
# SIGUSR1 (Slurm's warning before the time limit) and SIGTERM (preemption, scancel) stop a
# training stage at the end of its current step, with a checkpoint, and it exits with
# ONEREC_REQUEUE_EXIT, "checkpointed, please requeue" (onerec/train/preemption.py, where the
# code is defined). A script that runs a stage through onerec_run passes those signals on to
# it and then returns that code too: the stage checkpointed, or it was not training and just
# stopped; either way the same command continues where it stopped (train.resume=auto, and
# finished stages are skipped). Any other signal, or one with no stage running, keeps the
# shell's default behaviour for it.
ONEREC_REQUEUE_EXIT=75
ONEREC_NAME="${ONEREC_NAME:-$(basename "$0")}"  # how this script names itself in messages
ONEREC_SIGNALLED=""  # USR1 or TERM once this script received one
ONEREC_CHILD=""      # the stage onerec_run is waiting for
ONEREC_TRAPS=0       # signals received so far
ONEREC_FORWARD_AS="" # the signal passed on (empty: the one received)

# onerec_forward_targets: the pids a received signal goes to (a script may redefine it).
onerec_forward_targets() {
    echo "$ONEREC_CHILD"
}

onerec_on_signal() {
    local sig="$1" as="${ONEREC_FORWARD_AS:-$1}" pid
    ONEREC_SIGNALLED="${ONEREC_SIGNALLED:-$sig}"
    ONEREC_TRAPS=$((ONEREC_TRAPS + 1))
    if [[ -z "$ONEREC_CHILD" ]]; then
        echo "$ONEREC_NAME: SIG$sig received; stopping before the next stage" >&2
        return 0
    fi
    for pid in $(onerec_forward_targets); do
        echo "$ONEREC_NAME: SIG$sig received; passing SIG$as on to pid $pid" >&2
        kill -"$as" "$pid" 2> /dev/null || true
    done
}

# onerec_trap_signals [SIGNAL]: from now on pass SIGUSR1/SIGTERM on to the stage onerec_run
# is waiting for, as SIGNAL (default: as received).
onerec_trap_signals() {
    ONEREC_FORWARD_AS="${1:-}"
    trap 'onerec_on_signal USR1' USR1
    trap 'onerec_on_signal TERM' TERM
}

# onerec_run COMMAND...: run COMMAND in the background and wait for it, through any signals
# (a shell runs its traps only between commands, so a child in the foreground would never hear
# of them). ONEREC_RC is COMMAND's exit status, or ONEREC_REQUEUE_EXIT when it failed after a
# signal was passed on to it. Call it under `set -x` to log the command: it turns the trace
# off for its own lines.
onerec_run() {
    { set +x; } 2> /dev/null
    local traps
    # A background command of a script ignores SIGINT and SIGQUIT; restored, Ctrl-C still
    # reaches the stage (exec keeps the pid, so ONEREC_CHILD is the command itself).
    (
        trap - INT QUIT
        exec "$@"
    ) &
    ONEREC_CHILD=$!
    while :; do
        traps=$ONEREC_TRAPS
        ONEREC_RC=0
        wait "$ONEREC_CHILD" || ONEREC_RC=$?
        ((ONEREC_TRAPS == traps)) && break # else a trap interrupted the wait: wait again
    done
    ONEREC_CHILD=""
    if [[ -n "$ONEREC_SIGNALLED" && "$ONEREC_RC" != "0" ]]; then
        ONEREC_RC=$ONEREC_REQUEUE_EXIT
    fi
}

# ------------------------------------------------------------------------ Slurm requeue
# onerec_slurm_start: log which start of the job this is (SLURM_RESTART_COUNT counts requeues).
onerec_slurm_start() {
    echo "$ONEREC_NAME: job $SLURM_JOB_ID, start $((${SLURM_RESTART_COUNT:-0} + 1)) (requeued ${SLURM_RESTART_COUNT:-0} times so far, SLURM_RESTART_COUNT)"
}

# onerec_slurm_finish: exit with ONEREC_RC; after a stop on a signal (ONEREC_REQUEUE_EXIT)
# first put the job back in the queue (REQUEUE=1, the default): it starts again with the same
# command and continues from the checkpoint. `scontrol requeue` ends this script at once.
onerec_slurm_finish() {
    if [[ "$ONEREC_RC" == "$ONEREC_REQUEUE_EXIT" && "${REQUEUE:-1}" == "1" ]]; then
        echo "$ONEREC_NAME: stopped on SIG${ONEREC_SIGNALLED:-?} (exit $ONEREC_REQUEUE_EXIT); requeueing job $SLURM_JOB_ID (requeue $((${SLURM_RESTART_COUNT:-0} + 1)))"
        scontrol requeue "$SLURM_JOB_ID" ||
            echo "$ONEREC_NAME: could not requeue job $SLURM_JOB_ID (a cancelled job stays cancelled): submit the same command again to continue" >&2
    fi
    exit "$ONEREC_RC"
}
