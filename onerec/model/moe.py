"""Sparse mixture-of-experts FFN: router, experts, and the dispatcher seam between them.

Shape legend: T tokens (batch x positions, flattened), D model dim, F expert FFN dim,
E experts, K experts per token, Tk = T * K routed copies.

    x_TD -> Router -> (weights_TK, indices_TK, aux losses)
         -> dispatcher.dispatch -> x_perm_TkD, tokens_per_expert_E   (grouped by expert)
         -> Experts (each expert runs on its contiguous slice)
         -> dispatcher.combine  -> y_TD

Experts only ever see permuted tokens and tokens_per_expert, so expert parallelism is a
different dispatcher (all-to-all across ranks, onerec.distributed.expert_parallel), applied
from outside the model: it hands the Experts module only the rows of its E_local = E / ep
experts, with tokens_per_local_expert of length E_local, and the Experts weights are sliced
to those E_local experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from onerec.kernels.moe_routing import permute, topk_softmax_routing_with_counts, unpermute


@dataclass
class RouterOutput:
    """Top-k choice per token plus the two router regularisers (unweighted)."""

    weights_TK: torch.Tensor
    indices_TK: torch.Tensor
    aux_loss: torch.Tensor  # Switch/GShard load balancing: E * sum_e f_e * P_e (1.0 when balanced)
    z_loss: torch.Tensor  # ST-MoE router z-loss: mean(logsumexp(logits)^2)
    load_E: torch.Tensor  # fraction of routed copies per expert (detached, for logging)


class Router(nn.Module):
    """Linear D -> E, softmax, top-k with the k weights renormalised (OneRec uses top-2 of 24)."""

    def __init__(self, d_model: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        logits_TE = self.gate(x_TD).float()
        # On CUDA one fused kernel selects the top k and counts the copies per expert as it goes.
        weights_TK, indices_TK, counts_E = topk_softmax_routing_with_counts(logits_TE, self.top_k, normalize=True)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        # f_e: share of routed copies that went to e (not differentiable); P_e: mean router prob.
        counts_E = counts_E.float()
        fraction_E = counts_E / counts_E.sum().clamp(min=1)
        aux_loss = self.num_experts * (fraction_E * probs_TE.mean(dim=0)).sum()
        z_loss = torch.logsumexp(logits_TE, dim=-1).pow(2).mean()
        return RouterOutput(weights_TK, indices_TK, aux_loss, z_loss, fraction_E.detach())


@dataclass
class DispatchHandle:
    """What combine() needs to undo dispatch(): the copy order and the token count."""

    sorted_token_ids_Tk: torch.Tensor  # copy id t * K + k of each permuted row
    num_tokens: int


class LocalDispatcher:
    """All experts live in this process: dispatch is a permutation, combine its inverse."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(
        self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        """(x_perm_TkD grouped by expert, tokens_per_expert_E, handle for combine)."""
        x_perm_TkD, sorted_token_ids_Tk, tokens_per_expert_E = permute(x_TD, topk_idx_TK, self.num_experts)
        return x_perm_TkD, tokens_per_expert_E, DispatchHandle(sorted_token_ids_Tk, x_TD.shape[0])

    def combine(self, y_perm_TkD: torch.Tensor, topk_weight_TK: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """y_TD = sum_k topk_weight[t, k] * expert output of token t's k-th copy."""
        return unpermute(y_perm_TkD, handle.sorted_token_ids_Tk, topk_weight_TK, handle.num_tokens)


class Experts(nn.Module):
    """E GELU FFNs as stacked weights; expert e runs on rows [offset_e, offset_e + count_e).

    Weights are stored as nn.Linear stores them, [out, in] per expert (w1_EFD: D -> F,
    w2_EDF: F -> D), and used transposed: a grouped GEMM with that column-major right
    operand is what torch._grouped_mm's CUTLASS kernel wants, and on CPU it measured ~20%
    faster forward + backward than row-major [E, D, F] (T*K = 2048, D = 512, F = 2048, fp32).
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.w1_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.w2_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.dropout = nn.Dropout(dropout)
        for e in range(num_experts):  # same init as an nn.Linear per expert
            nn.init.kaiming_uniform_(self.w1_EFD.data[e], a=5**0.5)
            nn.init.kaiming_uniform_(self.w2_EDF.data[e], a=5**0.5)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Exports and checkpoints written before the nn.Linear layout hold w1_EDF / w2_EFD
        # ([E, in, out]): load them transposed. (Their optimizer moments are not converted.)
        for legacy, current in (("w1_EDF", "w1_EFD"), ("w2_EFD", "w2_EDF")):
            if prefix + legacy in state_dict and prefix + current not in state_dict:
                state_dict[prefix + current] = state_dict.pop(prefix + legacy).transpose(1, 2).contiguous()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x_perm_TkD: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        w1_EDF, w2_EFD = self.w1_EFD.transpose(1, 2), self.w2_EDF.transpose(1, 2)  # views, no copy
        dtype = _matmul_dtype(x_perm_TkD, w1_EDF)
        if grouped_mm_supported(x_perm_TkD.device, dtype, w1_EDF.shape):
            # One grouped GEMM per projection over the contiguous expert slices: no host read
            # of the counts, and an expert with no rows still gets its (zero) gradient. Under
            # autocast the operands are cast as autocast would cast a matmul's (the grouped
            # GEMM is not on its list); otherwise .to() is a no-op.
            offsets_E = tokens_per_expert_E.cumsum(0).to(torch.int32)
            x_in, w1_in, w2_in = (t.to(dtype) for t in (x_perm_TkD, w1_EDF, w2_EFD))
            hidden = self.dropout(F.gelu(_grouped_mm(x_in, w1_in, offsets_E)))
            return _grouped_mm(hidden, w2_in, offsets_E)
        # Fallback: a loop over experts with one host read of the counts per layer.
        # An expert with no rows still runs (a free 0-row matmul) so that every expert weight
        # is in the autograd graph: under expert parallelism a rank whose experts got no tokens
        # must still produce (zero) gradients, or DeepSpeed's gradient reduction would wait on it.
        # unbind once: indexing w[e] per expert would make backward write a full [E, F, D]
        # zero-padded gradient for every expert (7x slower on CPU at E = 24).
        w1_per_expert, w2_per_expert = w1_EDF.unbind(0), w2_EFD.unbind(0)
        outputs = []
        for e, chunk in enumerate(torch.split(x_perm_TkD, tokens_per_expert_E.tolist())):
            hidden = self.dropout(F.gelu(chunk @ w1_per_expert[e]))
            outputs.append(hidden @ w2_per_expert[e])
        return torch.cat(outputs, dim=0)


def _matmul_dtype(x_TkD: torch.Tensor, w_EDF: torch.Tensor) -> torch.dtype | None:
    """The dtype a matmul of these operands runs in: the autocast dtype under autocast, their
    common dtype otherwise, None when they differ (a plain matmul would refuse them too)."""
    device_type = x_TkD.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x_TkD.dtype if x_TkD.dtype == w_EDF.dtype else None


def grouped_mm_supported(device: torch.device, dtype: torch.dtype | None, w_shape_EDF) -> bool:
    """Whether torch._grouped_mm runs an expert matmul in `dtype` on `device`: fp32 or bf16 on
    CPU, bf16 on CUDA (its CUTLASS kernel, Hopper and later); both want rows of whole 16-byte
    units (D and F multiples of 16 bytes)."""
    if not hasattr(torch, "_grouped_mm") or dtype not in (torch.float32, torch.bfloat16):
        return False
    row_units = 16 // dtype.itemsize
    if w_shape_EDF[1] % row_units or w_shape_EDF[2] % row_units:
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9


def _grouped_mm(x_TkD: torch.Tensor, w_EDF: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """y[rows of expert e] = x[rows of expert e] @ w[e]; offsets_E are the slices' end rows."""
    y_TkF = torch._grouped_mm(x_TkD.contiguous(), w_EDF, offs=offsets_E)
    if y_TkF.requires_grad:
        # Its CPU backward rejects a broadcast (stride-0) gradient, such as y.sum() produces.
        y_TkF.register_hook(lambda grad: grad.contiguous())
    return y_TkF


class MoEFeedForward(nn.Module):
    """Drop-in sparse FFN: forward(x[..., D]) -> (y[..., D], {"aux_loss", "z_loss", "load_E"}).

    aux_loss and z_loss are unweighted scalars; load_E is the detached share of routed copies
    per expert. `dispatcher` (default LocalDispatcher) is swapped from outside for expert
    parallelism; it must offer dispatch(x_TD, topk_idx_TK) and combine(y_perm_TkD, topk_weight_TK, handle).
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int, dropout: float, dispatcher=None) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoE top_k={top_k}: expected 1..num_experts ({num_experts})")
        self.router = Router(d_model, num_experts, top_k)
        self.experts = Experts(num_experts, d_model, d_ff, dropout)
        # Not a submodule: the distributed code swaps it for an all-to-all dispatcher.
        self.dispatcher = dispatcher or LocalDispatcher(num_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        routed = self.router(x_TD)
        x_perm_TkD, tokens_per_expert_E, handle = self.dispatcher.dispatch(x_TD, routed.indices_TK)
        y_perm_TkD = self.experts(x_perm_TkD, tokens_per_expert_E)
        y_TD = self.dispatcher.combine(y_perm_TkD, routed.weights_TK.to(y_perm_TkD.dtype), handle)
        aux = {"aux_loss": routed.aux_loss, "z_loss": routed.z_loss, "load_E": routed.load_E}
        return y_TD.reshape(shape), aux
