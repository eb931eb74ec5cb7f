"""MoE routing in Triton: the same contract as `reference.py`, forward and backward.

Shape legend: T tokens, E experts, K experts per token (top-k), D model dim,
Tk = T * K routed token copies (copy id c = t * K + k), nb blocks of BLOCK_R copies.

Kernels (every launch is independent of the data: no host synchronisation):

    gating     _topk_softmax_kernel      grid (cdiv(T, BLOCK_T),)
               logits_TE -> weights_TK, indices_TK and tokens_per_expert_E (the histogram is
               fused in: each program adds its block's per-expert counts with an integer
               atomic, which is exact and order independent)

    permute    _block_histogram_kernel   grid (nb,)   counts_nbE: copies of expert e in block b
               torch cumsum (tiny)       start_nbE = copies of experts < e
                                                     + copies of expert e in blocks < b
               _permute_scatter_kernel   grid (nb,)   dest(c) = start[b, e] + rank of c among
                                                     block b's copies of e; writes
                                                     x_perm[dest] = x[c // K], sorted_ids[dest] = c,
                                                     inverse[c] = dest

        flat copies  c:    0  1  2  3  4  5        experts 2 0 1 2 0 1   (one block here)
        counts E:          [2, 2, 2]   -> expert starts 0, 2, 4
        rank in block:     0  0  0  1  1  1
        dest:              4  0  2  5  1  3   -> sorted_ids = [1 4 | 2 5 | 0 3]   (= reference)

    unpermute  _combine_kernel           grid (cdiv(T, BLOCK_T), cdiv(D, BLOCK_D))
               y[t] = sum_k w[t, k] * y_perm[inverse[t*K + k]], in fp32, k in order: a gather,
               not an atomic scatter-add, so results are bitwise reproducible

Backward:
    permute    grad_x[t] = sum_k grad_x_perm[inverse[t*K + k]]         (_combine_kernel, no weights)
    unpermute  grad_y_perm[inverse[c]] = w[c] * grad_y[t],
               grad_w[c] = <grad_y[t], y_perm[inverse[c]]>            (_combine_backward_kernel)
    gating     recomputed in torch from the saved logits (a [T, E] softmax: cheap, and exact
               autograd of the reference formula)

Top-k tie order: experts are picked by their fp32 logit (softmax is monotone, and the logit
has no rounding from the normaliser), the lower expert index first among equal logits.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import _check_permute_inputs, _check_routing_inputs, _check_unpermute_inputs


# --------------------------------------------------------------------------------------------
# gating: softmax + top-k (+ renormalise) + per-expert histogram
# --------------------------------------------------------------------------------------------


@triton.jit
def _topk_softmax_kernel(
    logits_ptr,  # [T, E] any float dtype, contiguous
    weights_ptr,  # [T, K] out, the logits' dtype
    indices_ptr,  # [T, K] int64 out
    counts_ptr,  # [E] int32 out, zeroed before the launch (atomic adds)
    T,
    E,
    K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    tile_ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(logits_ptr + rows[:, None] * E + cols[None, :], mask=tile_ok, other=float("-inf")).to(tl.float32)

    # softmax numerators and denominator in fp32, like torch.softmax(logits.float())
    # Rows past T are all -inf: give them a harmless max and denominator so that no NaN is
    # ever formed (their results are never stored).
    row_max = tl.where(row_ok, tl.max(x, axis=1), 0.0)
    p = tl.where(tile_ok, tl.exp(x - row_max[:, None]), 0.0)
    denom = tl.where(row_ok, tl.sum(p, axis=1), 1.0)

    # K rounds of "best remaining expert". `available` rather than overwriting x with -inf,
    # so a real -inf logit can still be picked (after every finite one) when K needs it.
    available = tile_ok
    ks = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    top_i = tl.zeros([BLOCK_T, BLOCK_K], tl.int64)
    hist = tl.zeros([BLOCK_E], tl.int32)
    for k in tl.static_range(K):
        best = tl.max(tl.where(available, x, float("-inf")), axis=1)
        is_best = available & (x == best[:, None])
        pick = tl.min(tl.where(is_best, cols[None, :], BLOCK_E), axis=1)  # lowest index wins ties
        picked = cols[None, :] == pick[:, None]
        w = tl.sum(tl.where(picked, p, 0.0), axis=1) / denom
        top_w = tl.where(ks[None, :] == k, w[:, None], top_w)
        top_i = tl.where(ks[None, :] == k, pick.to(tl.int64)[:, None], top_i)
        hit = picked & row_ok[:, None]
        hist += tl.sum(hit.to(tl.int32), axis=0)
        available = available & (cols[None, :] != pick[:, None])
    if NORMALIZE:
        top_w = top_w / tl.where(row_ok, tl.sum(top_w, axis=1), 1.0)[:, None]

    out_ok = row_ok[:, None] & (ks[None, :] < K)
    out_offs = rows[:, None] * K + ks[None, :]
    tl.store(weights_ptr + out_offs, top_w.to(weights_ptr.dtype.element_ty), mask=out_ok)
    tl.store(indices_ptr + out_offs, top_i, mask=out_ok)
    tl.atomic_add(counts_ptr + cols, hist, mask=col_ok)


# --------------------------------------------------------------------------------------------
# permute: block histogram, then a stable scatter of copies into expert-grouped rows
# --------------------------------------------------------------------------------------------


@triton.jit
def _block_histogram_kernel(
    experts_ptr,  # [Tk] int64, indices_TK flattened (copy order)
    counts_ptr,  # [nb, E] int32 out
    Tk,
    E,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    copies = b * BLOCK_R + tl.arange(0, BLOCK_R)
    expert = tl.load(experts_ptr + copies, mask=copies < Tk, other=-1)  # -1 matches no expert
    cols = tl.arange(0, BLOCK_E)
    one_hot = (expert[:, None] == cols[None, :]).to(tl.int32)
    tl.store(counts_ptr + b * E + cols, tl.sum(one_hot, axis=0), mask=cols < E)


@triton.jit
def _permute_scatter_kernel(
    x_ptr,  # [T, D] contiguous
    experts_ptr,  # [Tk] int64
    start_ptr,  # [nb, E] int64: first output row of block b's copies of expert e
    x_perm_ptr,  # [Tk, D] out
    sorted_ids_ptr,  # [Tk] int64 out
    inverse_ptr,  # [Tk] int64 out, inverse[c] = output row of copy c
    Tk,
    E,
    D,
    K,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    copies = b * BLOCK_R + tl.arange(0, BLOCK_R)
    copy_ok = copies < Tk
    expert = tl.load(experts_ptr + copies, mask=copy_ok, other=-1)
    cols = tl.arange(0, BLOCK_E)
    one_hot = (expert[:, None] == cols[None, :]).to(tl.int32)
    # rank of each copy among the earlier copies of the same expert in this block: an
    # inclusive prefix sum down the one-hot columns keeps token order (the sort is stable)
    rank = tl.sum(tl.cumsum(one_hot, axis=0) * one_hot, axis=1) - 1
    start = tl.load(start_ptr + b * E + expert, mask=copy_ok, other=0)
    dest = start + rank
    tl.store(sorted_ids_ptr + dest, copies, mask=copy_ok)
    tl.store(inverse_ptr + copies, dest, mask=copy_ok)

    token = copies // K
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        ok = copy_ok[:, None] & (d[None, :] < D)
        rows = tl.load(x_ptr + token[:, None] * D + d[None, :], mask=ok)
        tl.store(x_perm_ptr + dest[:, None] * D + d[None, :], rows, mask=ok)


# --------------------------------------------------------------------------------------------
# unpermute (and permute's backward): gather each token's K rows and sum them in k order
# --------------------------------------------------------------------------------------------


@triton.jit
def _combine_kernel(
    rows_ptr,  # [Tk, D] expert-grouped rows, contiguous
    inverse_ptr,  # [Tk] int64: row of copy c
    weights_ptr,  # [T, K] gate weights (unused when HAS_WEIGHTS is False)
    out_ptr,  # [T, D] out
    T,
    D,
    K,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_ok = tokens < T
    ok = token_ok[:, None] & (d[None, :] < D)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for k in range(K):
        src = tl.load(inverse_ptr + tokens * K + k, mask=token_ok, other=0)
        row = tl.load(rows_ptr + src[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + tokens * K + k, mask=token_ok, other=0.0).to(tl.float32)
            row = row * w[:, None]
        acc += row
    tl.store(out_ptr + tokens[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _combine_backward_kernel(
    grad_y_ptr,  # [T, D] contiguous
    y_perm_ptr,  # [Tk, D] the forward's expert rows
    inverse_ptr,  # [Tk] int64
    weights_ptr,  # [T, K]
    grad_y_perm_ptr,  # [Tk, D] out (every row written exactly once: inverse is a permutation)
    grad_w_ptr,  # [T, K] out
    T,
    D,
    K,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < T
    for k in range(K):
        src = tl.load(inverse_ptr + tokens * K + k, mask=token_ok, other=0)
        w = tl.load(weights_ptr + tokens * K + k, mask=token_ok, other=0.0).to(tl.float32)
        dot = tl.zeros([BLOCK_T], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            ok = token_ok[:, None] & (d[None, :] < D)
            g = tl.load(grad_y_ptr + tokens[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
            y = tl.load(y_perm_ptr + src[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
            grad_row = (g * w[:, None]).to(grad_y_perm_ptr.dtype.element_ty)
            tl.store(grad_y_perm_ptr + src[:, None] * D + d[None, :], grad_row, mask=ok)
            dot += tl.sum(g * y, axis=1)
        tl.store(grad_w_ptr + tokens * K + k, dot.to(grad_w_ptr.dtype.element_ty), mask=token_ok)


# --------------------------------------------------------------------------------------------
# launch helpers (shapes already checked, tensors contiguous)
# --------------------------------------------------------------------------------------------

_BLOCK_D = 64  # feature columns per program step: a [rows x 64] tile per load


def _rows_per_block(block_e: int) -> int:
    # keep the [rows x experts] one-hot tile near 4096 elements (registers), 16..128 rows
    return max(16, min(128, 4096 // block_e))


def _combine(rows_TkD: torch.Tensor, inverse_Tk: torch.Tensor, weights_TK, T: int, K: int, out_dtype) -> torch.Tensor:
    D = rows_TkD.shape[1]
    out_TD = torch.empty(T, D, dtype=out_dtype, device=rows_TkD.device)
    if T == 0 or D == 0:
        return out_TD
    block_t = 16
    grid = (triton.cdiv(T, block_t), triton.cdiv(D, _BLOCK_D))
    _combine_kernel[grid](
        rows_TkD,
        inverse_Tk,
        weights_TK if weights_TK is not None else rows_TkD,  # any pointer: never read
        out_TD,
        T,
        D,
        K,
        HAS_WEIGHTS=weights_TK is not None,
        BLOCK_T=block_t,
        BLOCK_D=_BLOCK_D,
    )
    return out_TD


def _routing_forward(logits_TE: torch.Tensor, k: int, normalize: bool):
    T, E = logits_TE.shape
    device = logits_TE.device
    weights_TK = torch.empty(T, k, dtype=logits_TE.dtype, device=device)
    indices_TK = torch.empty(T, k, dtype=torch.long, device=device)
    counts_E = torch.zeros(E, dtype=torch.int32, device=device)
    if T:
        block_e = triton.next_power_of_2(E)
        block_t = max(1, min(64, 4096 // block_e))
        _topk_softmax_kernel[(triton.cdiv(T, block_t),)](
            logits_TE,
            weights_TK,
            indices_TK,
            counts_E,
            T,
            E,
            K=k,
            NORMALIZE=normalize,
            BLOCK_T=block_t,
            BLOCK_E=block_e,
            BLOCK_K=triton.next_power_of_2(k),
        )
    return weights_TK, indices_TK, counts_E.long()


def _permute_forward(x_TD: torch.Tensor, indices_TK: torch.Tensor, num_experts: int):
    T, D = x_TD.shape
    K = indices_TK.shape[1]
    Tk = T * K
    E = num_experts
    device = x_TD.device
    x_perm_TkD = torch.empty(Tk, D, dtype=x_TD.dtype, device=device)
    sorted_ids_Tk = torch.empty(Tk, dtype=torch.long, device=device)
    inverse_Tk = torch.empty(Tk, dtype=torch.long, device=device)
    if Tk == 0 or E == 0:
        return x_perm_TkD, sorted_ids_Tk, torch.zeros(E, dtype=torch.long, device=device), inverse_Tk
    experts_Tk = indices_TK.reshape(-1)
    block_e = triton.next_power_of_2(E)
    block_r = _rows_per_block(block_e)
    nb = triton.cdiv(Tk, block_r)
    counts_nbE = torch.empty(nb, E, dtype=torch.int32, device=device)
    _block_histogram_kernel[(nb,)](experts_Tk, counts_nbE, Tk, E, BLOCK_R=block_r, BLOCK_E=block_e)
    # Expert-major exclusive prefix sum: (e, b) starts after every copy of experts < e and
    # after expert e's copies in blocks < b. nb * E numbers: negligible next to the row copy.
    counts_Enb = counts_nbE.t().long()
    start_Enb = (counts_Enb.reshape(-1).cumsum(0) - counts_Enb.reshape(-1)).view(E, nb)
    start_nbE = start_Enb.t().contiguous()
    _permute_scatter_kernel[(nb,)](
        x_TD,
        experts_Tk,
        start_nbE,
        x_perm_TkD,
        sorted_ids_Tk,
        inverse_Tk,
        Tk,
        E,
        D,
        K,
        BLOCK_R=block_r,
        BLOCK_E=block_e,
        BLOCK_D=_BLOCK_D,
    )
    return x_perm_TkD, sorted_ids_Tk, counts_Enb.sum(dim=1), inverse_Tk


# --------------------------------------------------------------------------------------------
# autograd wrappers
# --------------------------------------------------------------------------------------------


class _TopkSoftmaxRouting(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, k, normalize):
        weights_TK, indices_TK, counts_E = _routing_forward(logits_TE, k, normalize)
        ctx.save_for_backward(logits_TE, indices_TK)
        ctx.normalize = normalize
        ctx.mark_non_differentiable(indices_TK, counts_E)
        return weights_TK, indices_TK, counts_E

    @staticmethod
    def backward(ctx, grad_weights_TK, _grad_indices, _grad_counts):
        logits_TE, indices_TK = ctx.saved_tensors
        # Recompute the reference formula with autograd: the selection is fixed (indices), so
        # this is exactly d(weights)/d(logits) of the forward.
        with torch.enable_grad():
            logits32_TE = logits_TE.detach().float().requires_grad_(True)
            weights_TK = torch.softmax(logits32_TE, dim=-1).gather(1, indices_TK)
            if ctx.normalize:
                weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
            (grad_TE,) = torch.autograd.grad(weights_TK, logits32_TE, grad_weights_TK.float())
        return grad_TE.to(logits_TE.dtype), None, None


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, indices_TK, num_experts):
        x_perm_TkD, sorted_ids_Tk, counts_E, inverse_Tk = _permute_forward(x_TD, indices_TK, num_experts)
        ctx.save_for_backward(inverse_Tk)
        ctx.shape = (x_TD.shape[0], indices_TK.shape[1], x_TD.dtype)
        ctx.mark_non_differentiable(sorted_ids_Tk, counts_E)
        return x_perm_TkD, sorted_ids_Tk, counts_E

    @staticmethod
    def backward(ctx, grad_x_perm_TkD, _grad_ids, _grad_counts):
        (inverse_Tk,) = ctx.saved_tensors
        T, K, dtype = ctx.shape
        grad_x_TD = _combine(grad_x_perm_TkD.contiguous(), inverse_Tk, None, T, K, dtype)
        return grad_x_TD, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_perm_TkD, sorted_ids_Tk, weights_TK, num_tokens):
        K = weights_TK.shape[1]
        inverse_Tk = torch.empty_like(sorted_ids_Tk)
        inverse_Tk.scatter_(0, sorted_ids_Tk, torch.arange(sorted_ids_Tk.numel(), device=sorted_ids_Tk.device))
        y_TD = _combine(y_perm_TkD, inverse_Tk, weights_TK, num_tokens, K, y_perm_TkD.dtype)
        ctx.save_for_backward(y_perm_TkD, inverse_Tk, weights_TK)
        ctx.num_tokens = num_tokens
        return y_TD

    @staticmethod
    def backward(ctx, grad_y_TD):
        y_perm_TkD, inverse_Tk, weights_TK = ctx.saved_tensors
        T, K = ctx.num_tokens, weights_TK.shape[1]
        D = y_perm_TkD.shape[1]
        grad_y_perm_TkD = torch.empty_like(y_perm_TkD)
        grad_w_TK = torch.zeros_like(weights_TK)  # D == 0: the dot products are empty sums
        if T and D:
            block_t = 16
            _combine_backward_kernel[(triton.cdiv(T, block_t),)](
                grad_y_TD.contiguous(),
                y_perm_TkD,
                inverse_Tk,
                weights_TK,
                grad_y_perm_TkD,
                grad_w_TK,
                T,
                D,
                K,
                BLOCK_T=block_t,
                BLOCK_D=_BLOCK_D,
            )
        return grad_y_perm_TkD, None, grad_w_TK, None


# --------------------------------------------------------------------------------------------
# public functions: the reference's signatures
# --------------------------------------------------------------------------------------------


def _same_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")


def topk_softmax_routing_with_counts(
    logits_TE: torch.Tensor, k: int, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights_TK, indices_TK, tokens_per_expert_E) from one fused kernel; weights carry gradients."""
    _check_routing_inputs(logits_TE, k)
    return _TopkSoftmaxRouting.apply(logits_TE.contiguous(), k, normalize)


def topk_softmax_routing(logits_TE: torch.Tensor, k: int, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK, indices_TK): softmax over experts, top k, optionally renormalised."""
    weights_TK, indices_TK, _ = topk_softmax_routing_with_counts(logits_TE, k, normalize)
    return weights_TK, indices_TK


def permute(
    x_TD: torch.Tensor, indices_TK: torch.Tensor, num_experts: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_perm_TkD, sorted_token_ids_Tk, tokens_per_expert_E); gradients reach x."""
    _check_permute_inputs(x_TD, indices_TK)
    _same_device(x_TD, indices_TK)
    if num_experts is None:  # one host read, as in the reference; pass num_experts to avoid it
        num_experts = int(indices_TK.max().item()) + 1 if indices_TK.numel() else 0
    return _Permute.apply(x_TD.contiguous(), indices_TK.long().contiguous(), num_experts)


def unpermute(
    y_perm_TkD: torch.Tensor, sorted_token_ids_Tk: torch.Tensor, weights_TK: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """y_TD = sum_k weights[t, k] * y_perm[row of copy (t, k)]; gradients reach y_perm and weights."""
    _check_unpermute_inputs(y_perm_TkD, sorted_token_ids_Tk, weights_TK, num_tokens)
    _same_device(y_perm_TkD, sorted_token_ids_Tk, weights_TK)
    return _Unpermute.apply(
        y_perm_TkD.contiguous(), sorted_token_ids_Tk.long().contiguous(), weights_TK.contiguous(), num_tokens
    )
