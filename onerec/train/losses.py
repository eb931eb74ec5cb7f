"""Training losses.

Shape legend: B batch, M session items, L code levels, C codebook size (C_max over levels),
N items (the catalogue).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(
    logits_BMLC: torch.Tensor,
    targets_BML: torch.Tensor,
    code_mask_LC: torch.Tensor,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the real target codes of a session.

    Padding items (target codes -1) carry no loss. Logits of codes that do not exist at a
    level are -inf; label smoothing spreads its mass over the level's real codes only, so
    a small dedup level is not penalised for the codes it cannot have.
    Returns (loss, number of target codes that counted).
    """
    log_probs_BMLC = F.log_softmax(logits_BMLC.float(), dim=-1)
    valid_BML = targets_BML >= 0
    target_log_prob_BML = log_probs_BMLC.gather(-1, targets_BML.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_loss_BML = -target_log_prob_BML
    if label_smoothing > 0:
        mask_LC = code_mask_LC.to(log_probs_BMLC.device)
        # mean log-prob over the level's real codes; -inf entries are excluded, not summed.
        real_log_probs = log_probs_BMLC.masked_fill(~mask_LC, 0.0)
        smooth_BML = -real_log_probs.sum(-1) / mask_LC.sum(-1).clamp(min=1)
        token_loss_BML = (1 - label_smoothing) * token_loss_BML + label_smoothing * smooth_BML
    num_tokens = valid_BML.sum()
    loss = token_loss_BML.masked_fill(~valid_BML, 0.0).sum() / num_tokens.clamp(min=1)
    return loss, num_tokens


def item_loss(item_logits_BN: torch.Tensor, target_items_B: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the item head over the rows whose target is a real item (>= 0).

    A row with target -1 (no next item) carries no loss; with no real row at all the loss is
    0, not NaN, so a step of such rows stays finite.
    """
    real_B = target_items_B >= 0
    log_probs_BN = F.log_softmax(item_logits_BN.float(), dim=-1)
    target_log_prob_B = log_probs_BN.gather(-1, target_items_B.long().clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -target_log_prob_B.masked_fill(~real_B, 0.0).sum() / real_B.sum().clamp(min=1)
