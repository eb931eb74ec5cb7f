"""Helpers for the multi-process tests (real torchrun / Slurm processes on gloo).

The data is the integration test's synthetic log (tests/integration/test_pipeline.py: every
user walks the catalogue in steps of +1), prepared once per session by the single-process
`data` and `tokenize` stages; each test copies it into its own run directory and trains a
tiny model for a few steps with the launch scripts, as a user would.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv running pytest: its python, torchrun, onerec

_spec = importlib.util.spec_from_file_location("onerec_integration_pipeline", REPO / "tests/integration/test_pipeline.py")
pipeline_test = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pipeline_test)

# A few seconds of training: 8 steps of 2 ranks x 8 examples, checkpoints at 3, 6 and 8,
# one cheap validation at the end (the export needs one). Dropout stays on, so a resumed
# run only matches the uninterrupted one if it restores the ranks' RNG states too.
TRAIN_STEPS = 8
TINY_TRAIN = [
    "train.batch_size=8",
    "train.max_steps=8",
    "train.warmup_steps=2",
    "train.eval_every=1000",
    "train.checkpoint_every=3",
    "train.keep_checkpoints=3",
    "train.log_every=1",
    "model.dropout=0.1",
    "eval.max_valid_users=8",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(**extra: str) -> dict[str, str]:
    """The environment for launched processes: the test's venv (PATH as it is), CPU, quiet, offline."""
    env = dict(os.environ)
    env.update(
        ONEREC_VENV=str(BIN.parent),
        DS_ACCELERATOR="cpu",
        ONEREC_NO_PROGRESS="1",
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    env.update(extra)
    return env


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run `cmd` with its output in `log`; on failure the assertion shows the log's tail."""
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{tail(log)}"
    return proc


def tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def logged_records(out: Path, stage: str = "pretrain") -> dict[int, dict]:
    """The last training record per step in <out>/metrics.jsonl (a resumed run repeats steps)."""
    import json

    records = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("stage") == stage and "loss" in record:
            records[record["step"]] = record
    return records


EXPECTED_CHECKPOINTS = ["step_00000003", "step_00000006", "step_00000008"]


def final_weights(out: Path) -> dict:
    """The weights of the last checkpoint, after checking every checkpoint is there and verifies."""
    from safetensors.torch import load_file

    from onerec.checkpoint import list_checkpoints, verify_checkpoint

    checkpoints = list_checkpoints(out / "pretrain" / "checkpoints")
    assert [p.name for p in checkpoints] == EXPECTED_CHECKPOINTS
    for checkpoint in checkpoints:
        verify_checkpoint(checkpoint)
    return load_file(checkpoints[-1] / "model.safetensors")


def run_ranks(script: Path, out_dir: Path, world: int, env: dict[str, str], timeout: float, what: str) -> list:
    """Start `python script out_dir` once per rank (RANK / LOCAL_RANK set, on top of `env`,
    which carries MASTER_ADDR/PORT and WORLD_SIZE), wait for all, and return what each rank
    saved to out_dir/rank<r>.pt. A timeout kills every rank: a collective mismatch hangs."""
    import pytest
    import torch

    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(out_dir)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"{what} workers timed out (a collective mismatch would hang)")
        logs.append(out)
    for r, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {r} failed:\n{logs[r][-6000:]}"
    # The workers' own result files (tensors and plain containers), written by this test.
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
