"""MoE routing: top-k softmax gating, permute (group token copies by expert), unpermute (combine).

One entry point per op with `backend="auto" | "reference" | "triton"`:
"auto" runs the Triton kernels when the input lives on a CUDA device and Triton imports,
else the PyTorch reference. "triton" forces the kernels on any device (on a CPU tensor they
only run under TRITON_INTERPRET=1, which is how the parity tests exercise them).
Shapes and the copy-id layout are described in `reference.py`; the kernels in `triton.py`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from . import reference

__all__ = ["topk_softmax_routing", "topk_softmax_routing_with_counts", "permute", "unpermute"]

def _pick(backend: str, tensor: torch.Tensor):
    return _backend.pick(backend, tensor, __name__, reference)


def topk_softmax_routing(
    logits_TE: torch.Tensor, k: int, normalize: bool = True, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK, indices_TK): softmax over experts, top k, optionally renormalised."""
    return _pick(backend, logits_TE).topk_softmax_routing(logits_TE, k, normalize)


def topk_softmax_routing_with_counts(
    logits_TE: torch.Tensor, k: int, normalize: bool = True, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights_TK, indices_TK, tokens_per_expert_E): the gating with its per-expert histogram.

    The Triton kernel counts the routed copies per expert as it selects them (no second pass
    over indices_TK); the reference runs a bincount.
    """
    impl = _pick(backend, logits_TE)
    if impl is reference:
        weights_TK, indices_TK = reference.topk_softmax_routing(logits_TE, k, normalize)
        return weights_TK, indices_TK, torch.bincount(indices_TK.reshape(-1), minlength=logits_TE.shape[-1])
    return impl.topk_softmax_routing_with_counts(logits_TE, k, normalize)


def permute(
    x_TD: torch.Tensor, indices_TK: torch.Tensor, num_experts: Optional[int] = None, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_perm_TkD, sorted_token_ids_Tk, tokens_per_expert_E): token copies grouped by expert."""
    return _pick(backend, x_TD).permute(x_TD, indices_TK, num_experts)


def unpermute(
    y_perm_TkD: torch.Tensor,
    sorted_token_ids_Tk: torch.Tensor,
    weights_TK: torch.Tensor,
    num_tokens: int,
    backend: str = "auto",
) -> torch.Tensor:
    """y_TD: expert outputs scattered back to their tokens, weighted by the gate."""
    return _pick(backend, y_perm_TkD).unpermute(y_perm_TkD, sorted_token_ids_Tk, weights_TK, num_tokens)
