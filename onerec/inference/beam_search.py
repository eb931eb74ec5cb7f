"""Trie-constrained beam search: every beam is always a prefix of a real item's code tuple.

Shape legend: B requests, W beams per request, N = B * W beam rows (N = B at the first step),
S history length, L code levels, C codebook size (C_max), T codes generated so far.

The encoder runs once per request; each of the L steps runs the decoder for all beams, then
one `constrained_beam_step` (log-softmax, valid trie children only, top W per request) and a
gather that reorders the generated prefixes by parent. The first step has one row per
request, the root, and fans out to W beams (the decoder and the step would otherwise score
W identical copies of it):

    step t:  generated_NT --decode_step--> logits_NC --beam step--> tokens_N, parents_N
             generated_N(T+1) = cat(generated_NT[parents_N], tokens_N)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onerec.kernels.constrained_beam import constrained_beam_step
from onerec.tokenizer.trie import Trie


@dataclass
class BeamSearchOutput:
    items_BW: torch.Tensor  # int64 item_index, -1 for dead beams
    scores_BW: torch.Tensor  # float32 sum of per-level log-probs, -inf for dead beams; sorted descending
    codes_BWL: torch.Tensor  # int64 code tuple of each beam's item, all -1 for dead beams


def model_device(model: torch.nn.Module, fallback: torch.device) -> torch.device:
    """The device of the model's first parameter or buffer (fallback for a model with neither)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return fallback


@torch.inference_mode()
def constrained_beam_search(
    model,
    history_codes_BSL: torch.Tensor,
    trie: Trie,
    beam_width: int,
    user_B: torch.Tensor | None = None,
    history_items_BS: torch.Tensor | None = None,
    exclude_items_BX: torch.Tensor | None = None,
) -> BeamSearchOutput:
    """Top-`beam_width` items per request by beam search restricted to the trie.

    exclude_items_BX (item indices, -1 padding) are never returned: at the last level their
    leaves are masked out of each request's beams, so the W beams go to other items (used to
    leave out what the user already has, where items are not consumed twice).

    Runs on the model's device, in whatever train/eval mode the caller left the model
    (call `model.eval()` first for deterministic results).
    """
    if beam_width < 1:
        raise ValueError(f"beam_width={beam_width}: expected >= 1")
    if history_codes_BSL.dim() != 3 or history_codes_BSL.shape[-1] != trie.depth:
        raise ValueError(
            f"history_codes_BSL must be [batch, history, {trie.depth}] (the trie has {trie.depth} code levels), "
            f"got shape {tuple(history_codes_BSL.shape)}"
        )
    device = model_device(model, history_codes_BSL.device)
    B, W, L = history_codes_BSL.shape[0], beam_width, trie.depth
    trie = trie.to(device)
    history_codes_BSL = history_codes_BSL.to(device)
    user_B = None if user_B is None else user_B.to(device)
    history_items_BS = None if history_items_BS is None else history_items_BS.to(device)
    if exclude_items_BX is not None and (exclude_items_BX.dim() != 2 or exclude_items_BX.shape[0] != B):
        raise ValueError(f"exclude_items_BX must be [batch={B}, X], got shape {tuple(exclude_items_BX.shape)}")
    excluded_rows = None if exclude_items_BX is None else exclude_items_BX.to(device)  # [rows, X]

    # The first step reads one row per request (its root) and fans out to W beams; from then
    # on every request has W rows, and the encoder states are repeated to match.
    memory = model.encode(history_codes_BSL, user_B, history_items_BS)
    rows_per_request = 1
    scores_N = torch.zeros(B, device=device)
    states_N = torch.zeros(B, dtype=torch.long, device=device)
    generated_NT = torch.zeros(B, 0, dtype=torch.long, device=device)
    for depth in range(L):
        # Dead beams carry -1 tokens; feed them as code 0 (their logits are never used).
        logits_NC = model.decode_step(memory, generated_NT.clamp(min=0))
        local_states_N, child_tokens, child_nodes = trie.step_tables(depth, states_N)
        if excluded_rows is not None and depth == L - 1:
            logits_NC, scores_N = _mask_excluded_leaves(
                logits_NC, scores_N, local_states_N, child_tokens, child_nodes, trie, excluded_rows
            )
        tokens_N, parents_N, scores_N, states_N = constrained_beam_step(
            logits_NC, scores_N, local_states_N, child_tokens, child_nodes, W, rows_per_request=rows_per_request
        )
        generated_NT = torch.cat([generated_NT[parents_N], tokens_N.unsqueeze(1)], dim=1)
        if rows_per_request == 1:
            memory = memory.repeat_beams(W)
            excluded_rows = None if excluded_rows is None else excluded_rows.repeat_interleave(W, dim=0)
            rows_per_request = W

    # After L steps each live beam sits on a leaf. Items are distinct by construction: each
    # leaf is exactly one item, and two beams never share a path (a beam's children are
    # distinct trie nodes and every step keeps each (parent, child) candidate at most once).
    live_N = states_N >= 0
    items_N = torch.where(live_N, trie.node_item[states_N.clamp(min=0)], -1)
    codes_NL = generated_NT.masked_fill(~live_N.unsqueeze(1), -1)
    # The step returns each request's beams sorted by score, dead ones last, so the output is sorted.
    return BeamSearchOutput(
        items_BW=items_N.view(B, W), scores_BW=scores_N.view(B, W), codes_BWL=codes_NL.view(B, W, L)
    )


def _mask_excluded_leaves(
    logits_NC: torch.Tensor,
    scores_N: torch.Tensor,
    local_states_N: torch.Tensor,
    child_tokens: torch.Tensor,
    child_nodes: torch.Tensor,
    trie: Trie,
    excluded_NX: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, beam scores) with -inf at the last-level codes whose leaf is one of the beam's
    excluded items.

    The step's log-softmax then renormalises over the codes left, i.e. it scores an item
    given that it is not an excluded one. A row left with no finite logit at all (every code
    of the level excluded) would make that log-softmax NaN, and whether a NaN candidate sorts
    first or last depends on its sign bit, which differs between CPU and GPU arithmetic: such
    a beam is made dead instead (score -inf, finite logits).
    """
    rows_N = local_states_N.clamp(min=0)
    nodes_NK = child_nodes[rows_N]  # [N, Bd], -1 padding
    items_NK = torch.where(nodes_NK >= 0, trie.node_item[nodes_NK.clamp(min=0)], -1)
    hit_NK = (items_NK.unsqueeze(-1) == excluded_NX.unsqueeze(1)).any(-1) & (items_NK >= 0)
    # amax, not a plain scatter: padding entries (token clamped to 0, hit False) must not
    # overwrite a real hit on code 0.
    mask_NC = torch.zeros(logits_NC.shape, dtype=torch.int8, device=logits_NC.device)
    mask_NC.scatter_reduce_(1, child_tokens[rows_N].clamp(min=0), hit_NK.to(torch.int8), reduce="amax")
    logits_NC = logits_NC.masked_fill(mask_NC.bool(), float("-inf"))
    emptied_N = torch.isneginf(logits_NC).all(dim=1)
    logits_NC = logits_NC.masked_fill(emptied_N.unsqueeze(1), 0.0)
    return logits_NC, scores_N.masked_fill(emptied_N, float("-inf"))


@dataclass
class SessionSearchOutput:
    items_BWM: torch.Tensor  # int64 item_index per session slot, -1 for dead beams
    scores_BW: torch.Tensor  # float32 session log-prob (every code of every item), sorted descending
    codes_BWML: torch.Tensor  # int64 code tuples, all -1 for dead beams


@torch.inference_mode()
def generate_sessions(
    model,
    history_codes_BSL: torch.Tensor,
    trie: Trie,
    num_sessions: int,
    session_len: int,
    user_B: torch.Tensor | None = None,
    history_items_BS: torch.Tensor | None = None,
) -> SessionSearchOutput:
    """The `num_sessions` best M-item sessions per request, code by code, every item a real one.

    The same beam search as `constrained_beam_search`, run for M * L steps: whenever a beam
    completes an item (reaches a trie leaf) it restarts at the root for the next item, and
    the decoder sees the BOS that separates items. The W output beams are W distinct
    sessions (distinct code paths), as IPA samples them (OneRec section 3.4).
    """
    if num_sessions < 1 or session_len < 1:
        raise ValueError(f"num_sessions={num_sessions} and session_len={session_len}: expected >= 1")
    if session_len > model.session_len:
        raise ValueError(f"session_len={session_len} exceeds the model's session_len={model.session_len}")
    if history_codes_BSL.dim() != 3 or history_codes_BSL.shape[-1] != trie.depth:
        raise ValueError(
            f"history_codes_BSL must be [batch, history, {trie.depth}], got shape {tuple(history_codes_BSL.shape)}"
        )
    device = model_device(model, history_codes_BSL.device)
    B, W, L, M = history_codes_BSL.shape[0], num_sessions, trie.depth, session_len
    N = B * W
    trie = trie.to(device)
    user_B = None if user_B is None else user_B.to(device)
    history_items_BS = None if history_items_BS is None else history_items_BS.to(device)
    memory = model.encode(history_codes_BSL.to(device), user_B, history_items_BS)

    # As in constrained_beam_search: one row per request until the first step fans out to W.
    rows_per_request = 1
    scores_N = torch.zeros(B, device=device)
    states_N = torch.zeros(B, dtype=torch.long, device=device)
    generated_NT = torch.zeros(B, 0, dtype=torch.long, device=device)
    items_NM = torch.full((B, M), -1, dtype=torch.long, device=device)
    for m in range(M):
        for depth in range(L):
            logits_NC = model.decode_step(memory, generated_NT.clamp(min=0))
            local_states_N, child_tokens, child_nodes = trie.step_tables(depth, states_N)
            tokens_N, parents_N, scores_N, states_N = constrained_beam_step(
                logits_NC, scores_N, local_states_N, child_tokens, child_nodes, W, rows_per_request=rows_per_request
            )
            generated_NT = torch.cat([generated_NT[parents_N], tokens_N.unsqueeze(1)], dim=1)
            items_NM = items_NM[parents_N]
            if rows_per_request == 1:
                memory, rows_per_request = memory.repeat_beams(W), W
        live_N = states_N >= 0
        items_NM[:, m] = torch.where(live_N, trie.node_item[states_N.clamp(min=0)], -1)
        states_N = torch.where(live_N, torch.zeros_like(states_N), states_N)  # next item starts at the root
    live_N = items_NM[:, -1] >= 0
    items_NM = items_NM.masked_fill(~live_N.unsqueeze(1), -1)
    codes_NML = generated_NT.view(N, M, L).masked_fill(~live_N.view(N, 1, 1), -1)
    return SessionSearchOutput(
        items_BWM=items_NM.view(B, W, M), scores_BW=scores_N.view(B, W), codes_BWML=codes_NML.view(B, W, M, L)
    )
