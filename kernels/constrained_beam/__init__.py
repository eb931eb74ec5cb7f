"""Trie-constrained beam-search step; one entry point with backend="auto" | "reference" | "triton".

"auto" runs the Triton kernel when the logits live on a CUDA device and Triton imports,
else the PyTorch reference. "triton" forces the kernel on any device (on a CPU tensor it
only runs under TRITON_INTERPRET=1, which is how the parity tests exercise it).
Shapes, tie order and dead-beam semantics are described in `reference.py`.
"""

from __future__ import annotations

import torch

from .. import _backend
from . import reference

__all__ = ["constrained_beam_step"]


def _pick(backend: str, logits_NC: torch.Tensor):
    return _backend.pick(backend, logits_NC, __name__, reference)


def constrained_beam_step(
    logits_NC: torch.Tensor,
    beam_scores_N: torch.Tensor,
    states_N: torch.Tensor,
    child_tokens: torch.Tensor,
    child_nodes: torch.Tensor,
    beam_width: int,
    backend: str = "auto",
    rows_per_request: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, parents, scores, states) of the next W beams per request, each [B * W];
    rows_per_request (default W) input rows belong to each request. See reference.py."""
    impl = _pick(backend, logits_NC)
    return impl.constrained_beam_step(
        logits_NC, beam_scores_N, states_N, child_tokens, child_nodes, beam_width, rows_per_request
    )
