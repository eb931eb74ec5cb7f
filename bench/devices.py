"""The device a benchmark ran on, named the same way in every results file."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch


def processor_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def accelerator_name(cuda: bool) -> str:
    """The GPU's name when the run used CUDA, else the CPU model."""
    return torch.cuda.get_device_name(0) if cuda else processor_name()


def device_slug(device: torch.device, name: str) -> str:
    """cpu, h100, h200, a100, ...: the short name in the result file names."""
    if device.type == "cpu":
        return "cpu"
    match = re.search(r"\b([A-Z]\d{2,4}|L40S?|RTX ?\d{4})\b", name.upper())
    return (match.group(1) if match else name).lower().replace(" ", "")
