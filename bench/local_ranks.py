"""The environment of one local torch.distributed job that a benchmark starts itself: one
process per rank on this machine, as torchrun would set it up (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_env(world: int) -> dict[str, str]:
    """Variables shared by every rank of a `world`-rank job (add RANK and LOCAL_RANK per process)."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    return env
