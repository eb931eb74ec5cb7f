"""MoE routing: top-k softmax gating, permute (group token copies by expert), unpermute (combine).

One entry point per op with `backend="auto" | "reference" | "triton"`. Only the
reference implementation exists so far; "auto" uses it everywhere. Shapes and the copy-id
layout are described in `reference.py`.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import reference

_BACKENDS = ("auto", "reference", "triton")


def _check_backend(backend: str) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {_BACKENDS}")
    if backend == "triton":
        raise NotImplementedError("the Triton moe_routing kernel is not built yet; use backend='reference'")


def topk_softmax_routing(
    logits_TE: torch.Tensor, k: int, normalize: bool = True, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK, indices_TK): softmax over experts, top k, optionally renormalised."""
    _check_backend(backend)
    return reference.topk_softmax_routing(logits_TE, k, normalize)


def permute(
    x_TD: torch.Tensor, indices_TK: torch.Tensor, num_experts: Optional[int] = None, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_perm_TkD, sorted_token_ids_Tk, tokens_per_expert_E): token copies grouped by expert."""
    _check_backend(backend)
    return reference.permute(x_TD, indices_TK, num_experts)


def unpermute(
    y_perm_TkD: torch.Tensor,
    sorted_token_ids_Tk: torch.Tensor,
    weights_TK: torch.Tensor,
    num_tokens: int,
    backend: str = "auto",
) -> torch.Tensor:
    """y_TD: expert outputs scattered back to their tokens, weighted by the gate."""
    _check_backend(backend)
    return reference.unpermute(y_perm_TkD, sorted_token_ids_Tk, weights_TK, num_tokens)
