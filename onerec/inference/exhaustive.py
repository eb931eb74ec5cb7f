"""Score every item of the catalogue by teacher forcing: the exact top-K that beam search
approximates. Only for small catalogues (tests, sanity checks).

Shape legend: B requests, N items, L code levels, C codebook size, K results.
"""

from __future__ import annotations

import torch

from onerec.model.onerec import OneRecModel


@torch.inference_mode()
def exhaustive_top_k(
    model: OneRecModel,
    history_codes_BSL: torch.Tensor,
    item_codes_NL: torch.Tensor,
    k: int,
    user_B: torch.Tensor | None = None,
    chunk_items: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(item) = sum over levels of log_softmax(logits)[code], the beam step's normalisation."""
    B = history_codes_BSL.shape[0]
    N, L = item_codes_NL.shape
    memory = model.encode(history_codes_BSL, user_B)
    scores_BN = torch.empty(B, N, device=history_codes_BSL.device)
    for start in range(0, N, chunk_items):
        codes_nL = item_codes_NL[start : start + chunk_items]
        n = codes_nL.shape[0]
        expanded = memory.repeat_beams(n)  # row b*n + j: request b, item j
        targets = codes_nL.repeat(B, 1).unsqueeze(1)  # [B*n, 1, L]
        hidden_logits = _session_logits(model, expanded, targets)  # [B*n, 1, L, C]
        log_probs = torch.log_softmax(hidden_logits.float(), dim=-1)
        per_level = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B*n, 1, L]
        scores_BN[:, start : start + n] = per_level.sum(dim=(1, 2)).view(B, n)
    top_scores, top_items = torch.topk(scores_BN, min(k, N), dim=1)
    return top_items, top_scores


def _session_logits(model: OneRecModel, memory, target_codes_BML: torch.Tensor) -> torch.Tensor:
    B, M, L = target_codes_BML.shape
    hidden_BPD, _ = model._decode(model._decoder_inputs(target_codes_BML), memory)
    return model._head(hidden_BPD.view(B, M, L + 1, -1)[:, :, :L])
