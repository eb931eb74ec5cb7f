"""Score every item of the catalogue by teacher forcing: the exact top-K that beam search
approximates. Only for small catalogues (tests, sanity checks): it runs the model once per
(request, item) pair.

Shape legend: B requests, S history length, N items, n items in one chunk, L code levels,
C codebook size (C_max), K results.
"""

from __future__ import annotations

import torch

from onerec.inference.beam_search import model_device


@torch.inference_mode()
def exhaustive_top_k(
    model,
    history_codes_BSL: torch.Tensor,
    item_codes_NL: torch.Tensor,
    k: int,
    user_B: torch.Tensor | None = None,
    chunk_rows: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(items_BK, scores_BK): the k items of highest log p(item | history), ties to the lower item_index.

    log p(item) = sum over levels of log_softmax(logits)[code], the beam step's normalisation
    (log-softmax over the full C_max row; the -inf codes beyond a level's size get zero mass).
    Each chunk scores n items for all B requests in one teacher-forced forward pass of B * n rows.
    """
    if history_codes_BSL.dim() != 3:
        raise ValueError(f"history_codes_BSL must be [batch, history, levels], got {tuple(history_codes_BSL.shape)}")
    if item_codes_NL.dim() != 2 or item_codes_NL.shape[1] != history_codes_BSL.shape[2]:
        raise ValueError(
            f"item_codes_NL must be [num_items, {history_codes_BSL.shape[2]}], got {tuple(item_codes_NL.shape)}"
        )
    if k < 1:
        raise ValueError(f"k={k}: expected >= 1")
    device = model_device(model, history_codes_BSL.device)
    history_codes_BSL = history_codes_BSL.to(device)
    item_codes_NL = item_codes_NL.to(device)
    user_B = None if user_B is None else user_B.to(device)
    B, S, L = history_codes_BSL.shape
    N = item_codes_NL.shape[0]
    chunk = max(1, chunk_rows // max(B, 1))

    scores_BN = torch.empty(B, N, device=device)
    for start in range(0, N, chunk):
        codes_nL = item_codes_NL[start : start + chunk]
        n = codes_nL.shape[0]
        # Row b * n + j pairs request b with item j of the chunk.
        history_xSL = history_codes_BSL.repeat_interleave(n, dim=0)
        user_x = None if user_B is None else user_B.repeat_interleave(n, dim=0)
        targets_x1L = codes_nL.repeat(B, 1).unsqueeze(1)
        logits_x1LC = model(history_xSL, targets_x1L, user_x).logits_BMLC
        log_probs_xLC = torch.log_softmax(logits_x1LC[:, 0].float(), dim=-1)
        per_level_xL = log_probs_xLC.gather(-1, targets_x1L[:, 0].unsqueeze(-1)).squeeze(-1)
        # Accumulate level by level from 0, in the beam search's order, so equal math gives equal floats.
        total_x = torch.zeros(B * n, device=device)
        for level in range(L):
            total_x = total_x + per_level_xL[:, level]
        scores_BN[:, start : start + n] = total_x.view(B, n)

    # A stable sort (not topk) so ties go to the lower item_index, deterministically.
    sorted_BN, order_BN = torch.sort(scores_BN, dim=1, descending=True, stable=True)
    return order_BN[:, :k], sorted_BN[:, :k]
