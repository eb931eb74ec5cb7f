"""One trie-constrained beam-search step in plain PyTorch: the golden value and the CPU path.

Shape legend: B requests, W beams per request, N = B * W beam rows (rows b*W .. b*W+W-1
belong to request b), C codebook size (C_max), Bm max children of a trie node
(fixed-width CSR rows, STATIC arXiv 2602.22647), Nn trie nodes.

    logits_NC --log_softmax (fp32)--> gather at each beam's children   -> cand_NBm (+ beam score)
    request b's W x Bm candidates, flat index = parent_local * Bm + slot
        --stable descending sort, keep W--> tokens, parent rows, scores, child states

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
) -> None:
    # Shapes and dtypes only: a value check would cost a host sync per step on GPU.
    if beam_width < 1:
        raise ValueError(f"beam_width={beam_width}: expected >= 1")
    if logits_NC.dim() != 2:
        raise ValueError(f"logits_NC must be [N, C], got shape {tuple(logits_NC.shape)}")
    N = logits_NC.shape[0]
    if N % beam_width:
        raise ValueError(f"{N} beam rows is not a multiple of beam_width={beam_width} (rows must be B * W)")
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

    What a stable descending sort's first k columns are, without sorting all X: torch.topk
    promises no tie order, so each fp32 score and its index are packed into one unique int64
    key (order-preserving int32 image of the score | 2^31 - 1 - index) and topk runs on the
    keys. The Triton kernel builds the same keys. -0.0 is made +0.0 first (equal as floats).
    """
    X = scores_BX.shape[1]
    if X >= _INDEX_LIMIT:
        raise ValueError(f"{X} candidates per request: at most {_INDEX_LIMIT - 1}")
    bits_BX = (scores_BX.float() + 0.0).view(torch.int32).to(torch.int64)
    ordered_BX = bits_BX ^ ((bits_BX >> 31) & 0x7FFFFFFF)  # signed order == float order
    index_X = torch.arange(X, device=scores_BX.device)
    keys_BX = (ordered_BX << 32) | (_INDEX_LIMIT - 1 - index_X)
    top_keys_Bk = torch.topk(keys_BX, k, dim=1, largest=True, sorted=True).values
    return _INDEX_LIMIT - 1 - (top_keys_Bk & 0xFFFFFFFF)


def constrained_beam_step(
    logits_NC: torch.Tensor,
    beam_scores_N: torch.Tensor,
    states_N: torch.Tensor,
    child_tokens: torch.Tensor,
    child_nodes: torch.Tensor,
    beam_width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (tokens_N, parents_N, scores_N, states_N); each request's W beams sorted by score.

    parents are global row indices into the N input beams. A beam is dead when its state is -1
    or its score -inf: it has no children. When fewer than W live candidates exist, the extra
    output beams are dead (token -1, state -1, score -inf). Ties go to the lower flat candidate
    index (parent beam first, then child slot), so results are deterministic.
    """
    _check_inputs(logits_NC, beam_scores_N, states_N, child_tokens, child_nodes, beam_width)
    N = logits_NC.shape[0]
    W = beam_width
    B = N // W
    device = logits_NC.device

    log_probs_NC = torch.log_softmax(logits_NC.float(), dim=-1)
    beam_scores_N = beam_scores_N.float()
    alive_N = (states_N >= 0) & (beam_scores_N > float("-inf"))
    safe_states_N = states_N.clamp(min=0)  # dead rows read the root's row, then get masked out
    tokens_NBm = child_tokens[safe_states_N]
    nodes_NBm = child_nodes[safe_states_N]
    Bm = tokens_NBm.shape[1]
    valid_NBm = (tokens_NBm >= 0) & alive_N.unsqueeze(1)
    cand_NBm = log_probs_NC.gather(1, tokens_NBm.clamp(min=0)) + beam_scores_N.unsqueeze(1)
    cand_NBm = cand_NBm.masked_fill(~valid_NBm, float("-inf"))

    # W * Bm >= W always, so keeping W is well defined.
    pick_BW = top_by_score_then_index(cand_NBm.view(B, W * Bm), W)
    scores_N = cand_NBm.view(B, W * Bm).gather(1, pick_BW).reshape(N)
    parents_N = (pick_BW // Bm + torch.arange(B, device=device).unsqueeze(1) * W).reshape(N)
    slots_N = (pick_BW % Bm).reshape(N)
    live_N = scores_N > float("-inf")
    tokens_out_N = tokens_NBm[parents_N, slots_N].masked_fill(~live_N, -1)
    states_out_N = nodes_NBm[parents_N, slots_N].masked_fill(~live_N, -1)
    return tokens_out_N, parents_N, scores_N, states_out_N
