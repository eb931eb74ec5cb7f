"""Backend choice shared by every op: "auto" | "reference" | "triton".

"auto" runs the Triton kernel when the input lives on a CUDA device and Triton imports, else
the PyTorch reference; "triton" forces the kernel on any device (on a CPU tensor it only runs
under TRITON_INTERPRET=1, which is how the parity tests exercise it).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

BACKENDS = ("auto", "reference", "triton")

_triton_modules: dict[str, ModuleType | None] = {}


def _triton_module(package: str) -> ModuleType | None:
    """`<package>.triton`, or None when Triton is not importable (imported on first use)."""
    if package not in _triton_modules:
        try:
            _triton_modules[package] = importlib.import_module(f"{package}.triton")
        except ImportError:
            _triton_modules[package] = None
    return _triton_modules[package]


def pick(backend: str, tensor: torch.Tensor, package: str, reference: ModuleType) -> ModuleType:
    """The module (reference or triton) of op package `package` that runs `tensor`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend == "reference":
        return reference
    if backend == "auto":
        return (_triton_module(package) if tensor.is_cuda else None) or reference
    impl = _triton_module(package)
    if impl is None:
        raise RuntimeError(
            "backend='triton' needs the triton package (pip install 'onerec[triton]'); use backend='reference' or 'auto'"
        )
    return impl
