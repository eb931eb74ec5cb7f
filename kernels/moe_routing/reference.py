"""MoE routing in plain PyTorch: the golden value and the CPU path.

Shape legend: T tokens, E experts, K experts per token (top-k), D model dim,
Tk = T * K routed token copies.

    logits_TE --softmax--> probs_TE --topk--> weights_TK, indices_TK
    x_TD --permute--> x_perm_TkD   (copies grouped by expert: e0's tokens | e1's tokens | ...)
    y_perm_TkD --unpermute(weights)--> y_TD = sum_k weights[t, k] * y_perm[copy of (t, k)]

A routed copy is named by its flat id c = t * K + k (token t's k-th choice). permute
returns, for every row of x_perm, the copy id it holds (`sorted_token_ids_Tk`; the token is
id // K). The copy id, not just the token, is needed to pick weights_TK[t, k] in unpermute.

    indices_TK = [[2, 0],      copy ids 0 1 / 2 3 / 4 5   experts of copies: 2 0 1 2 0 1
                  [1, 2],      stable sort by expert -> sorted ids [1 4 | 2 5 | 0 3]
                  [0, 1]]      tokens_per_expert_E = [2, 2, 2]

Everything here is differentiable by autograd (gradients reach the tokens and the gate
weights); math runs in fp32 and results come back in the input dtype. No atomics: unpermute
gathers each token's K copies and sums them in k order, so results are bitwise reproducible.
"""

from __future__ import annotations

from typing import Optional

import torch


def _check_routing_inputs(logits_TE: torch.Tensor, k: int) -> None:
    if logits_TE.dim() != 2:
        raise ValueError(f"router logits must be [tokens, experts], got shape {tuple(logits_TE.shape)}")
    if not 1 <= k <= logits_TE.shape[-1]:
        raise ValueError(f"top-k={k} must be in 1..{logits_TE.shape[-1]} (the number of experts)")


def _check_permute_inputs(x_TD: torch.Tensor, indices_TK: torch.Tensor) -> None:
    if x_TD.dim() != 2 or indices_TK.dim() != 2 or x_TD.shape[0] != indices_TK.shape[0]:
        raise ValueError(
            f"permute expects x [T, D] and indices [T, K] with the same T, got {tuple(x_TD.shape)} "
            f"and {tuple(indices_TK.shape)}"
        )


def _check_unpermute_inputs(
    y_perm_TkD: torch.Tensor, sorted_token_ids_Tk: torch.Tensor, weights_TK: torch.Tensor, num_tokens: int
) -> None:
    k = weights_TK.shape[-1]
    if y_perm_TkD.shape[0] != num_tokens * k or sorted_token_ids_Tk.shape[0] != num_tokens * k:
        raise ValueError(
            f"unpermute got {y_perm_TkD.shape[0]} expert rows and {sorted_token_ids_Tk.shape[0]} ids for "
            f"{num_tokens} tokens x top-{k}; expected {num_tokens * k} of each"
        )


def topk_softmax_routing(logits_TE: torch.Tensor, k: int, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, keep the top k (descending); renormalise the k weights to sum to 1 when asked."""
    _check_routing_inputs(logits_TE, k)
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    weights_TK, indices_TK = torch.topk(probs_TE, k, dim=-1)
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK.to(logits_TE.dtype), indices_TK


def permute(
    x_TD: torch.Tensor, indices_TK: torch.Tensor, num_experts: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group token copies by expert, stable in token order within an expert (megatron's order).

    Returns (x_perm_TkD, sorted_token_ids_Tk, tokens_per_expert_E): row i of x_perm is token
    sorted_token_ids[i] // K, routed copy sorted_token_ids[i] = t * K + k. Pass num_experts
    whenever it is known: without it E = max(indices) + 1, which misses idle trailing experts.
    """
    _check_permute_inputs(x_TD, indices_TK)
    k = indices_TK.shape[1]
    flat_experts_Tk = indices_TK.reshape(-1)
    if num_experts is None:
        num_experts = int(flat_experts_Tk.max().item()) + 1 if flat_experts_Tk.numel() else 0
    sorted_token_ids_Tk = torch.argsort(flat_experts_Tk, stable=True)
    tokens_per_expert_E = torch.bincount(flat_experts_Tk, minlength=num_experts)
    x_perm_TkD = x_TD.index_select(0, sorted_token_ids_Tk // k)
    return x_perm_TkD, sorted_token_ids_Tk, tokens_per_expert_E


def unpermute(
    y_perm_TkD: torch.Tensor, sorted_token_ids_Tk: torch.Tensor, weights_TK: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Put expert outputs back in (token, k) order and combine them: y[t] = sum_k w[t, k] * y_copy[t, k]."""
    _check_unpermute_inputs(y_perm_TkD, sorted_token_ids_Tk, weights_TK, num_tokens)
    k = weights_TK.shape[-1]
    # inverse permutation: copy c = t * K + k sits at row inverse[c] of y_perm
    inverse_Tk = torch.empty_like(sorted_token_ids_Tk)
    inverse_Tk[sorted_token_ids_Tk] = torch.arange(sorted_token_ids_Tk.numel(), device=sorted_token_ids_Tk.device)
    y_TKD = y_perm_TkD.float().index_select(0, inverse_Tk).view(num_tokens, k, y_perm_TkD.shape[-1])
    y_TD = (y_TKD * weights_TK.float().unsqueeze(-1)).sum(dim=1)
    return y_TD.to(y_perm_TkD.dtype)
