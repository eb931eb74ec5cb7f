"""Training losses.

Shape legend: B batch, M session items, L code levels, C codebook size (C_max over levels).
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
