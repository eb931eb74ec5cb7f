"""Trie-constrained beam search: every beam is always a prefix of a real item's code tuple.

Shape legend: B requests, W beams per request, N = B * W, S history length, L code
levels, C codebook size, T codes generated so far.

The encoder runs once per request; each of the L steps runs the decoder for all N beams,
then one `constrained_beam_step` (log-softmax, valid children only, top W per request)
and a gather that reorders the generated prefixes by parent. Returned items are distinct:
each complete path ends at its own leaf, one leaf per item, and beams never share a path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onerec.kernels.constrained_beam import constrained_beam_step
from onerec.tokenizer.trie import Trie


@dataclass
class BeamSearchOutput:
    items_BW: torch.Tensor  # int64 item_index, -1 for dead beams
    scores_BW: torch.Tensor  # float32 sum of log-probs, -inf for dead beams; sorted descending
    codes_BWL: torch.Tensor  # the generated code tuples


@torch.inference_mode()
def constrained_beam_search(
    model, history_codes_BSL: torch.Tensor, trie: Trie, beam_width: int, user_B: torch.Tensor | None = None
) -> BeamSearchOutput:
    B = history_codes_BSL.shape[0]
    W = beam_width
    device = history_codes_BSL.device
    memory = model.encode(history_codes_BSL, user_B).repeat_beams(W)
    # All beams start at the root; only beam 0 is alive so the first step has no duplicates.
    scores_N = torch.full((B * W,), float("-inf"), device=device)
    scores_N[::W] = 0.0
    states_N = torch.zeros(B * W, dtype=torch.long, device=device)
    generated_NT = torch.zeros(B * W, 0, dtype=torch.long, device=device)
    for _ in range(trie.depth):
        logits_NC = model.decode_step(memory, generated_NT)
        tokens_N, parents_N, scores_N, states_N = constrained_beam_step(
            logits_NC, scores_N, states_N, trie.child_tokens, trie.child_nodes, W
        )
        generated_NT = torch.cat([generated_NT[parents_N], tokens_N.unsqueeze(1)], dim=1)
    items_N = torch.where(states_N >= 0, trie.node_item[states_N.clamp(min=0)], -1)
    return BeamSearchOutput(
        items_BW=items_N.view(B, W),
        scores_BW=scores_N.view(B, W),
        codes_BWL=generated_NT.view(B, W, trie.depth),
    )
