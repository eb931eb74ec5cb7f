"""One trie-constrained beam-search step in plain PyTorch: the golden value and the CPU path.

Shape legend: B requests, W beams per request out, R input rows per request (R = W, or
R = 1 for the first step, where each request has only its root), N = B * R input rows (rows
b*R .. b*R+R-1 belong to request b), C codebook size (C_max), Bm max children of a trie
node (fixed-width CSR rows, STATIC arXiv 2602.22647), Nn trie nodes, X = R * Bm.

    logits_NC --log_softmax (fp32)--> gather at each beam's children   -> cand_NBm (+ beam score)
    request b's X = R x Bm candidates, flat index = parent_local * Bm + slot
        --stable descending sort, keep W--> tokens, parent rows, scores, child states  [B * W]

Why R: at the first step every request has one live beam (the root). Reading W copies of it
would score W x C candidates per request to keep W: 50x the work at W = 50, for nothing.

No Python loop over beams or requests and no host synchronisation (.item(), nonzero,
boolean-mask indexing): every size is known from the shapes, so a whole decode can be
queued or graph-captured without stalls. Dead beams are carried as (-1 state, -inf score)
instead of being removed, for the same reason.
"""

from __future__ import annotations

import torch

# Keys keep 2^31 - 1 - index in their low 32 bits, so indices stay below 2^31.
_INDEX_LIMIT = 2**31


def _check_inputs(
    logits_NC: torch.Tensor,
    beam_scores_N: torch.Tensor,
    states_N: torch.Tensor,
    child_tokens: torch.Tensor,
    child_nodes: torch.Tensor,
    beam_width: int,
    rows_per_request: int,
) -> None:
    # Shapes and dtypes only: a value check would cost a host sync per step on GPU.
    if beam_width < 1 or rows_per_request < 1:
        raise ValueError(f"beam_width={beam_width} and rows_per_request={rows_per_request}: expected >= 1")
    if logits_NC.dim() != 2:
        raise ValueError(f"logits_NC must be [N, C], got shape {tuple(logits_NC.shape)}")
    N = logits_NC.shape[0]
    if N % rows_per_request:
        raise ValueError(
            f"{N} beam rows is not a multiple of rows_per_request={rows_per_request} "
            "(the beam width unless given; rows must be B * R)"
        )
    if beam_scores_N.shape != (N,) or states_N.shape != (N,):
        raise ValueError(
            f"beam_scores_N and states_N must be [N]={N}, got {tuple(beam_scores_N.shape)} and {tuple(states_N.shape)}"
        )
    if child_tokens.dim() != 2 or child_tokens.shape != child_nodes.shape:
        raise ValueError(
            "child_tokens and child_nodes must both be [num_nodes, max_children], "
            f"got {tuple(child_tokens.shape)} and {tuple(child_nodes.shape)}"
        )
    for name, t in (("states_N", states_N), ("child_tokens", child_tokens), ("child_nodes", child_nodes)):
        if t.dtype != torch.long:
            raise ValueError(f"{name} must be int64, got {t.dtype}")


def top_by_score_then_index(scores_BX: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the k best entries of each row: higher score first, then lower index.

    What a stable descending sort's first k columns are, without sorting all X. On CPU, where
    a host read costs nothing, a plain float top-k runs first; when its k-th value has no
    equal outside the k it kept (the usual case with real scores), that set is the answer and
    only those k entries need the exact order. Otherwise, and always on GPU, every entry gets
    an exact key (`_top_by_keys`).
    """
    X = scores_BX.shape[1]
    if scores_BX.device.type == "cpu" and 0 < k < X and scores_BX.shape[0] > 0:
        values_Bk, columns_Bk = torch.topk(scores_BX, k, dim=1, largest=True, sorted=False)
        kth_B1 = values_Bk.min(dim=1, keepdim=True).values
        if bool((torch.count_nonzero(scores_BX >= kth_B1, dim=1) == k).all()):
            # The k-best set is unique; order it by score, ties by column (sorting the
            # columns first makes "lower position" mean "lower column").
            columns_Bk, by_column = columns_Bk.sort(dim=1)
            return columns_Bk.gather(1, _top_by_keys(values_Bk.gather(1, by_column), k))
    return _top_by_keys(scores_BX, k)


def _top_by_keys(scores_BX: torch.Tensor, k: int) -> torch.Tensor:
    """top_by_score_then_index for any input: each fp32 score and its index are packed into
    one unique int64 key (order-preserving int32 image of the score | 2^31 - 1 - index) and
    topk runs on the keys, as torch.topk promises no tie order. The Triton kernel builds the
    same keys. -0.0 is made +0.0 first (equal as floats)."""
    X = scores_BX.shape[1]
    if X >= _INDEX_LIMIT:
        raise ValueError(f"{X} candidates per request: at most {_INDEX_LIMIT - 1}")
    keys_BX = (scores_BX.float() + 0.0).view(torch.int32).to(torch.int64)
    keys_BX ^= (keys_BX >> 31) & 0x7FFFFFFF  # signed order == float order (in place: X can be large)
    keys_BX <<= 32
    keys_BX |= _INDEX_LIMIT - 1 - torch.arange(X, device=scores_BX.device)
    top_keys_Bk = torch.topk(keys_BX, k, dim=1, largest=True, sorted=True).values
    return _INDEX_LIMIT - 1 - (top_keys_Bk & 0xFFFFFFFF)


def constrained_beam_step(
    logits_NC: torch.Tensor,
    beam_scores_N: torch.Tensor,
    states_N: torch.Tensor,
    child_tokens: torch.Tensor,
    child_nodes: torch.Tensor,
    beam_width: int,
    rows_per_request: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (tokens, parents, scores, states), each [B * W]; each request's W beams sorted by score.

    rows_per_request (R, default W): how many of the N input rows belong to each request.
    parents are global row indices into the N input rows. A beam is dead when its state is -1
    or its score -inf: it has no children. When fewer than W live candidates exist, the extra
    output beams are dead (token -1, state -1, score -inf). Ties go to the lower flat candidate
    index (parent beam first, then child slot), so results are deterministic. When a request
    has fewer than W candidates at all (R * Bm < W), the missing beams are dead with the
    request's first row as parent.
    """
    R = beam_width if rows_per_request is None else rows_per_request
    _check_inputs(logits_NC, beam_scores_N, states_N, child_tokens, child_nodes, beam_width, R)
    N = logits_NC.shape[0]
    W = beam_width
    B = N // R
    device = logits_NC.device

    log_probs_NC = torch.log_softmax(logits_NC.float(), dim=-1)
    beam_scores_N = beam_scores_N.float()
    alive_N = (states_N >= 0) & (beam_scores_N > float("-inf"))
    safe_states_N = states_N.clamp(min=0)  # dead rows read the root's row, then get masked out
    tokens_NBm = child_tokens[safe_states_N]  # child nodes are read only for the W picks
    Bm = tokens_NBm.shape[1]
    valid_NBm = (tokens_NBm >= 0) & alive_N.unsqueeze(1)
    cand_NBm = log_probs_NC.gather(1, tokens_NBm.clamp(min=0)) + beam_scores_N.unsqueeze(1)
    cand_NBm = cand_NBm.masked_fill(~valid_NBm, float("-inf"))

    X = R * Bm
    cand_BX = cand_NBm.view(B, X)
    if X < W:  # too few candidates to fill W beams: pad with dead ones that sort last
        cand_BX = torch.cat([cand_BX, cand_BX.new_full((B, W - X), float("-inf"))], dim=1)
    pick_BW = top_by_score_then_index(cand_BX, W)
    scores_out = cand_BX.gather(1, pick_BW).reshape(B * W)
    real_BW = pick_BW < X
    parent_local_BW = torch.where(real_BW, pick_BW // Bm, 0)
    parents_out = (parent_local_BW + torch.arange(B, device=device).unsqueeze(1) * R).reshape(B * W)
    slots_out = torch.where(real_BW, pick_BW % Bm, 0).reshape(B * W)
    live_out = scores_out > float("-inf")
    tokens_out = tokens_NBm[parents_out, slots_out].masked_fill(~live_out, -1)
    states_out = child_nodes[safe_states_N[parents_out], slots_out].masked_fill(~live_out, -1)
    return tokens_out, parents_out, scores_out, states_out
