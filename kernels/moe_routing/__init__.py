"""MoE routing: top-k softmax gating, permute (group token copies by expert), unpermute (combine).

One entry point per op with `backend="auto" | "reference" | "triton"`. Only the
reference implementation exists so far; "auto" uses it everywhere.
"""

from __future__ import annotations

import torch

from . import reference

_BACKENDS = ("auto", "reference", "triton")


def _check_backend(backend: str) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {_BACKENDS}")
    if backend == "triton":
        raise NotImplementedError("the Triton moe_routing kernel is not built yet; use backend='reference'")


def topk_softmax_routing(logits_TE: torch.Tensor, k: int, normalize: bool = True, backend: str = "auto"):
    _check_backend(backend)
    return reference.topk_softmax_routing(logits_TE, k, normalize)


def permute(x_TD: torch.Tensor, indices_TK: torch.Tensor, num_experts: int, backend: str = "auto"):
    _check_backend(backend)
    return reference.permute(x_TD, indices_TK, num_experts)


def unpermute(y_perm_TkD, sorted_copy_ids_Tk, weights_TK, num_tokens: int, backend: str = "auto"):
    _check_backend(backend)
    return reference.unpermute(y_perm_TkD, sorted_copy_ids_Tk, weights_TK, num_tokens)
