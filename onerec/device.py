"""Which device a process computes on, and in which precision: torch only, no process groups,
so every stage (distributed or not) can ask without importing DeepSpeed."""

from __future__ import annotations

import os

import torch

from onerec.errors import ConfigError, ResourceError


def resolve_device(requested: str, setting: str = "run.device") -> torch.device:
    """The device for `requested` ("auto" | "cpu" | "cuda"): auto is this process's GPU
    (LOCAL_RANK) when CUDA is usable, else the CPU.

    Every stage calls this (directly or through init_distributed) before any work, so a GPU
    that is asked for and missing is a ResourceError at once, naming `setting` (the config key
    or CLI option the value came from) and why CUDA is not usable.
    """
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if requested not in ("auto", "cuda"):
        raise ConfigError(f"{setting}={requested!r}: expected auto, cpu or cuda")
    if not torch.cuda.is_available():
        raise ResourceError(
            f"{setting}=cuda but CUDA cannot be used here: {_why_no_cuda()}; "
            f"use {setting}=auto (the GPU when there is one) or {setting}=cpu"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ResourceError(
            f"this process is LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible: start at "
            f"most {count} process(es) per node (e.g. torchrun --nproc-per-node={count}) or check CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", local_rank)


def _why_no_cuda() -> str:
    """The likeliest reason torch.cuda.is_available() is False, for the message."""
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support (a CPU-only wheel)"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    return "no GPU (or no working NVIDIA driver) was found"



def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU by default; fp32 (no autocast) on CPU unless asked for."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
