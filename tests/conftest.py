"""Test-wide environment: set before any kernel, DeepSpeed or HF module is imported."""

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on a CPU machine; DeepSpeed picks its CPU accelerator.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ONEREC_NO_PROGRESS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

# Test tensors are tiny: one thread avoids OpenMP stalls when the 2-core machine is shared,
# and keeps float reductions in a fixed order.
torch.set_num_threads(1)
