"""One trie-constrained beam-search step in Triton: the same contract as `reference.py`.

Shape legend: B requests, W beams per request out, R input rows per request (W, or 1 at the
first step), N = B * R input rows (rows b*R .. b*R+R-1 belong to request b), C codebook
size (C_max), Bm max children of a trie node, Nn trie nodes, X = R * Bm candidates per request.

Three launches per step, no host synchronisation, no Python loop over beams:

    1. _candidate_keys_kernel   grid (N,)   row n: logsumexp of logits[n] (fp32), then for each
       child slot j of the beam's node:  cand = (logit[tok] - max - log(sum)) + beam_score
       (-inf for no child / dead beam), written as one int64 sort key per candidate:

           key = [ order-preserving int32 image of the fp32 score | 2^31 - 1 - flat ]
                   high 32 bits                                      low 32 bits
           flat = parent_local * Bm + j   (the reference's flat candidate index)

       Keys are unique within a request and compare exactly like the reference's stable
       descending sort (higher score first, then the lower flat index), -inf candidates
       included, so "ties go to the lower flat index" holds for live and dead outputs alike.
    2. torch.topk(keys_BX, W)  (largest, sorted): with unique keys the result is the first
       W entries of the stable sort; topk does not need a full sort of the X candidates.
       When X < W the keys are padded with dead ones (flat >= X, after every real key).
    3. _decode_top_kernel       grid (B,)   key -> score (bit-exact), parent row, child slot;
       token and child state from the child table, -1 where the score is -inf.

The score goes through the key losslessly (its bits are stored), so scores equal what
kernel 1 computed; they differ from the reference only by the logsumexp's summation order.
-0.0 is written as +0.0 first: the two are equal as floats but not as keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import _check_inputs

# Low 32 bits of a key hold _FLAT_MAX - flat, so flat must stay below 2^31.
_FLAT_MAX = 2**31 - 1


@triton.jit
def _candidate_keys_kernel(
    logits_ptr,  # [N, C] any float dtype, contiguous
    scores_ptr,  # [N] any float dtype
    states_ptr,  # [N] int64, -1 = dead
    child_tokens_ptr,  # [Nn, Bm] int64, -1 = no child
    keys_ptr,  # [N, Bm] int64 out
    C,
    R,
    Bm,
    BLOCK_C: tl.constexpr,
    BLOCK_BM: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + n * C
    offs_c = tl.arange(0, BLOCK_C)

    # log-softmax denominator in fp32, two passes like torch (max, then sum of exp(x - max))
    max_vec = tl.full([BLOCK_C], float("-inf"), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        x = tl.load(row_ptr + c0 + offs_c, mask=c0 + offs_c < C, other=float("-inf")).to(tl.float32)
        max_vec = tl.maximum(max_vec, x)
    row_max = tl.max(max_vec, axis=0)
    sum_vec = tl.zeros([BLOCK_C], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        x = tl.load(row_ptr + c0 + offs_c, mask=c0 + offs_c < C, other=float("-inf")).to(tl.float32)
        sum_vec += tl.exp(x - row_max)
    log_sum = tl.log(tl.sum(sum_vec, axis=0))

    score = tl.load(scores_ptr + n).to(tl.float32)
    state = tl.load(states_ptr + n)
    alive = (state >= 0) & (score > float("-inf"))
    safe_state = tl.maximum(state, 0)  # dead rows read the root's row, then get masked out
    # A dead beam accepts no token: fold `alive` into the token bound so that every mask
    # below is a comparison of [BLOCK_BM] tensors (a scalar bool & a vector is not a valid
    # mask under TRITON_INTERPRET). tok < C also keeps a malformed trie from reading past the row.
    token_limit = tl.where(alive, C, 0)
    parent_local = n % R
    for j0 in range(0, Bm, BLOCK_BM):
        offs_j = j0 + tl.arange(0, BLOCK_BM)
        in_row = offs_j < Bm
        tok = tl.load(child_tokens_ptr + safe_state * Bm + offs_j, mask=in_row, other=-1)
        valid = in_row & (tok >= 0) & (tok < token_limit)
        x = tl.load(row_ptr + tok, mask=valid, other=float("-inf")).to(tl.float32)
        cand = ((x - row_max) - log_sum) + score  # torch's max-shifted log-softmax, then + beam score
        cand = tl.where(valid, cand, float("-inf"))
        cand = tl.where(cand == 0.0, 0.0, cand)  # -0.0 -> +0.0 (equal floats must give equal keys)
        # order-preserving int32 image of an fp32: negative floats have their magnitude bits flipped
        bits = cand.to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        flat = parent_local * Bm + offs_j
        key = (ordered.to(tl.int64) << 32) + (2147483647 - flat)
        tl.store(keys_ptr + n * Bm + offs_j, key, mask=in_row)


@triton.jit
def _decode_top_kernel(
    top_keys_ptr,  # [B, W] int64, the W largest keys of each request, descending
    states_ptr,  # [N = B * R] int64 input beam states
    child_tokens_ptr,  # [Nn, Bm] int64
    child_nodes_ptr,  # [Nn, Bm] int64
    tokens_out_ptr,  # [B * W] int64 out
    parents_out_ptr,  # [B * W] int64 out
    scores_out_ptr,  # [B * W] float32 out
    states_out_ptr,  # [B * W] int64 out
    W,
    R,
    Bm,
    BLOCK_W: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_W)
    mask = offs < W
    out = b * W + offs
    key = tl.load(top_keys_ptr + out, mask=mask, other=0)
    high = key >> 32  # arithmetic shift: the signed score image
    flat = 2147483647 - (key - (high << 32))
    ordered = high.to(tl.int32)
    bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    score = bits.to(tl.float32, bitcast=True)
    real = flat < R * Bm  # padding keys (X < W) are dead: parent = the request's first row
    parent = b * R + tl.where(real, flat // Bm, 0)
    slot = tl.where(real, flat % Bm, 0)
    live = score > float("-inf")
    # as the reference: the child of the parent's (clamped) state at that slot, -1 when dead
    state = tl.maximum(tl.load(states_ptr + parent, mask=mask, other=0), 0)
    token = tl.load(child_tokens_ptr + state * Bm + slot, mask=mask, other=-1)
    node = tl.load(child_nodes_ptr + state * Bm + slot, mask=mask, other=-1)
    tl.store(tokens_out_ptr + out, tl.where(live, token, -1), mask=mask)
    tl.store(parents_out_ptr + out, parent, mask=mask)
    tl.store(scores_out_ptr + out, score, mask=mask)
    tl.store(states_out_ptr + out, tl.where(live, node, -1), mask=mask)


def constrained_beam_step(
    logits_NC: torch.Tensor,
    beam_scores_N: torch.Tensor,
    states_N: torch.Tensor,
    child_tokens: torch.Tensor,
    child_nodes: torch.Tensor,
    beam_width: int,
    rows_per_request: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, parents, scores, states), the reference's contract; see the module docstring."""
    R = beam_width if rows_per_request is None else rows_per_request
    _check_inputs(logits_NC, beam_scores_N, states_N, child_tokens, child_nodes, beam_width, R)
    N, C = logits_NC.shape
    W = beam_width
    B = N // R
    Bm = child_tokens.shape[1]
    X = R * Bm
    device = logits_NC.device
    if max(X, W) > _FLAT_MAX:
        raise ValueError(f"rows_per_request * max_children = {X} candidates per request: at most {_FLAT_MAX}")
    tensors = (logits_NC, beam_scores_N, states_N, child_tokens, child_nodes)
    if any(t.device != device for t in tensors):
        raise ValueError(f"all inputs must be on one device, got {[str(t.device) for t in tensors]}")

    tokens_out = torch.empty(B * W, dtype=torch.long, device=device)
    parents_out = torch.empty(B * W, dtype=torch.long, device=device)
    scores_out = torch.empty(B * W, dtype=torch.float32, device=device)
    states_out = torch.empty(B * W, dtype=torch.long, device=device)
    if N == 0:  # an empty batch: nothing to launch (a grid of 0 programs is an error)
        return tokens_out, parents_out, scores_out, states_out

    logits_NC = logits_NC.contiguous()
    states_N = states_N.contiguous()
    child_tokens = child_tokens.contiguous()
    child_nodes = child_nodes.contiguous()
    keys_NBm = torch.empty(N, Bm, dtype=torch.long, device=device)
    _candidate_keys_kernel[(N,)](
        logits_NC,
        beam_scores_N.contiguous(),
        states_N,
        child_tokens,
        keys_NBm,
        C,
        R,
        Bm,
        BLOCK_C=min(triton.next_power_of_2(C), 1024),
        BLOCK_BM=min(triton.next_power_of_2(Bm), 1024),
    )
    keys_BX = keys_NBm.view(B, X)
    if X < W:
        keys_BX = torch.cat([keys_BX, _dead_keys(X, W, device).expand(B, -1)], dim=1)
    # Keys are unique per request, so topk's (unspecified) tie handling never comes into play.
    top_keys_BW = torch.topk(keys_BX, W, dim=1, largest=True, sorted=True).values.contiguous()
    _decode_top_kernel[(B,)](
        top_keys_BW,
        states_N,
        child_tokens,
        child_nodes,
        tokens_out,
        parents_out,
        scores_out,
        states_out,
        W,
        R,
        Bm,
        BLOCK_W=triton.next_power_of_2(W),
    )
    return tokens_out, parents_out, scores_out, states_out


def _dead_keys(first_flat: int, end_flat: int, device) -> torch.Tensor:
    """[1, end - first] keys of -inf candidates at flat indices first .. end - 1 (as kernel 1 builds them)."""
    bits = torch.tensor(float("-inf"), dtype=torch.float32).view(torch.int32).item()
    ordered = bits ^ 0x7FFFFFFF  # negative float: magnitude bits flipped
    flat = torch.arange(first_flat, end_flat, device=device)
    return ((ordered << 32) + (_FLAT_MAX - flat)).unsqueeze(0)
