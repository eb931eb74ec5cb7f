"""MoE routing in plain PyTorch: the golden value and the CPU path.

Shape legend: T tokens, E experts, K experts per token (top-k), D model dim,
Tk = T * K routed token copies.

    logits_TE --softmax--> probs_TE --topk--> weights_TK, indices_TK
    x_TD --permute--> x_perm_TkD   (copies grouped by expert: e0's tokens | e1's tokens | ...)
    y_perm_TkD --unpermute(weights)--> y_TD = sum_k weights[t, k] * y_perm[copy of (t, k)]

Everything here is differentiable by autograd (gradients reach the tokens and the gate
weights); math runs in fp32 and results come back in the input dtype.
"""

from __future__ import annotations

import torch


def topk_softmax_routing(logits_TE: torch.Tensor, k: int, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, keep the top k; renormalise the k weights to sum to 1 when asked."""
    if not 1 <= k <= logits_TE.shape[-1]:
        raise ValueError(f"top-k={k} must be in 1..{logits_TE.shape[-1]} (the number of experts)")
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    weights_TK, indices_TK = torch.topk(probs_TE, k, dim=-1)
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK.to(logits_TE.dtype), indices_TK


def permute(
    x_TD: torch.Tensor, indices_TK: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group token copies by expert, stable in token order within an expert.

    Returns (x_perm_TkD, sorted_copy_ids_Tk, tokens_per_expert_E): copy id c = t * K + k
    names token t's k-th choice; row i of x_perm is token sorted_copy_ids[i] // K.
    """
    k = indices_TK.shape[1]
    flat_experts_Tk = indices_TK.reshape(-1)
    # stable sort keeps token order inside each expert's segment (matches megatron's permute)
    sorted_copy_ids_Tk = torch.argsort(flat_experts_Tk, stable=True)
    tokens_per_expert_E = torch.bincount(flat_experts_Tk, minlength=num_experts)
    x_perm_TkD = x_TD.index_select(0, sorted_copy_ids_Tk // k)
    return x_perm_TkD, sorted_copy_ids_Tk, tokens_per_expert_E


def unpermute(
    y_perm_TkD: torch.Tensor, sorted_copy_ids_Tk: torch.Tensor, weights_TK: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Scatter expert outputs back to their tokens and combine them with the gate weights."""
    k = weights_TK.shape[-1]
    weights_Tk = weights_TK.reshape(-1).index_select(0, sorted_copy_ids_Tk)
    weighted_TkD = y_perm_TkD.float() * weights_Tk.float().unsqueeze(-1)
    y_TD = torch.zeros(num_tokens, y_perm_TkD.shape[-1], dtype=torch.float32, device=y_perm_TkD.device)
    y_TD = y_TD.index_add(0, sorted_copy_ids_Tk // k, weighted_TkD)
    return y_TD.to(y_perm_TkD.dtype)
