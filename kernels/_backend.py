"""Backend choice shared by every op: "auto" | "reference" | "triton".

"auto" runs the Triton kernel when the input lives on a CUDA device and Triton imports, else
the PyTorch reference; "triton" forces the kernel on any device (on a CPU tensor it only runs
under TRITON_INTERPRET=1, which is how the parity tests exercise it).

The ONEREC_KERNELS environment variable switches every op at once, without touching code or
configs (e.g. to rule the kernels out when chasing a numerical difference on a cluster):

    unset, "" or "auto"   today's behaviour: "auto" as described above
    "reference"           the PyTorch reference twins, also for CUDA tensors
    "triton"              the Triton kernels, also for CPU tensors (needs TRITON_INTERPRET=1 there)

Precedence: the variable replaces "auto" only. An op called with an explicit
backend="reference" or backend="triton" keeps it whatever the variable says: such a call
is a deliberate choice in code (a parity test, a benchmark), and an environment setting meant
for a whole run should not silently turn a reference-vs-kernel comparison into
kernel-vs-kernel. The variable is read on every call (no caching, so a test or a long-lived
process can change it), compared case-insensitively after stripping blanks, and an invalid
value is a ValueError on every call, explicit backend or not, so that a typo never passes
unnoticed.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "ONEREC_KERNELS"

_triton_modules: dict[str, ModuleType | None] = {}


def _triton_module(package: str) -> ModuleType | None:
    """`<package>.triton`, or None when Triton is not importable (imported on first use)."""
    if package not in _triton_modules:
        try:
            _triton_modules[package] = importlib.import_module(f"{package}.triton")
        except ImportError:
            _triton_modules[package] = None
    return _triton_modules[package]


def env_backend() -> str:
    """The backend ONEREC_KERNELS asks for ("auto" when it is unset or empty)."""
    raw = os.environ.get(ENV_VAR, "")
    value = raw.strip().lower()
    if not value:
        return "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={raw!r}: expected one of {', '.join(BACKENDS)} (or unset, which means auto)")
    return value


def pick(backend: str, tensor: torch.Tensor, package: str, reference: ModuleType) -> ModuleType:
    """The module (reference or triton) of op package `package` that runs `tensor`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    from_env = env_backend()  # validated on every call, see the module docstring
    chosen_by = f"backend={backend!r}"
    if backend == "auto" and from_env != "auto":
        backend, chosen_by = from_env, f"{ENV_VAR}={from_env}"
    if backend == "reference":
        return reference
    if backend == "auto":
        return (_triton_module(package) if tensor.is_cuda else None) or reference
    impl = _triton_module(package)
    if impl is None:
        raise RuntimeError(
            f"{chosen_by} needs the triton package (pip install 'onerec[triton]'); "
            f"use backend='reference' or 'auto', or set {ENV_VAR}=reference"
        )
    return impl
