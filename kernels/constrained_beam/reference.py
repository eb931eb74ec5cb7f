"""One trie-constrained beam-search step in plain PyTorch: the golden value and the CPU path.

Shape legend: B requests, W beams per request, N = B * W beam rows, C codebook size
(C_max), Bm max children of a trie node (fixed-width CSR, STATIC arXiv 2602.22647).

    logits_NC --log_softmax--> gather at each beam's children  -> cand_NBm (+ beam score)
    request b's W x Bm candidates --stable sort, keep W--> tokens, parent rows, scores, states

No Python loop over beams or requests and no host synchronisation: every size is known
from the shapes, so a whole decode can be captured or queued without stalls.
"""

from __future__ import annotations

import torch


def constrained_beam_step(
    logits_NC: torch.Tensor,
    beam_scores_N: torch.Tensor,
    states_N: torch.Tensor,
    child_tokens: torch.Tensor,
    child_nodes: torch.Tensor,
    beam_width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (tokens_N, parents_N, scores_N, states_N), each request's beams sorted by score.

    parents are global row indices into the N input beams. A beam is dead when its state
    is -1 or its score -inf; when fewer than W live candidates exist, the extra output
    beams are dead (token -1, state -1, score -inf). Ties go to the lower flat index
    (parent beam first, then child slot), so results are deterministic.
    """
    N, _ = logits_NC.shape
    W = beam_width
    if N % W:
        raise ValueError(f"{N} beam rows is not a multiple of beam_width={W}")
    B = N // W
    log_probs_NC = torch.log_softmax(logits_NC.float(), dim=-1)
    alive_N = (states_N >= 0) & torch.isfinite(beam_scores_N)
    safe_states_N = states_N.clamp(min=0)
    tokens_NBm = child_tokens[safe_states_N]
    nodes_NBm = child_nodes[safe_states_N]
    Bm = tokens_NBm.shape[1]
    valid_NBm = (tokens_NBm >= 0) & alive_N.unsqueeze(1)
    cand_NBm = log_probs_NC.gather(1, tokens_NBm.clamp(min=0)) + beam_scores_N.float().unsqueeze(1)
    cand_NBm = cand_NBm.masked_fill(~valid_NBm, float("-inf"))

    # Flat candidate index within a request: parent_local * Bm + child slot.
    sorted_scores, order = torch.sort(cand_NBm.view(B, W * Bm), dim=1, descending=True, stable=True)
    scores_BW, pick_BW = sorted_scores[:, :W], order[:, :W]
    parents_BW = pick_BW // Bm + torch.arange(B, device=logits_NC.device).unsqueeze(1) * W
    slots_BW = pick_BW % Bm
    parents_N, slots_N, scores_N = parents_BW.reshape(N), slots_BW.reshape(N), scores_BW.reshape(N)
    live_N = torch.isfinite(scores_N)
    tokens_out = tokens_NBm[parents_N, slots_N].masked_fill(~live_N, -1)
    states_out = nodes_NBm[parents_N, slots_N].masked_fill(~live_N, -1)
    return tokens_out, parents_N, scores_N, states_out
