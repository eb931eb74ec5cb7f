"""DPO on generated sessions (OneRec section 3.4; Rafailov et al. 2023).

Shape legend: B users, N sampled sessions per user, M session items, L code levels, C codebook size.

For a chosen session y_w and a rejected one y_l of the same user x, with the frozen
reference model pi_ref (M_t) and the policy pi (M_{t+1}, initialised from M_t):

    loss = -log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

where log pi(y|x) sums the log-probabilities of every semantic-ID token of the session.
When policy and reference agree the argument is 0 and the loss is log 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def session_log_prob(logits_BMLC: torch.Tensor, targets_BML: torch.Tensor) -> torch.Tensor:
    """Sum over the session's real tokens of log p(token), [B]; target -1 marks padding (ignored)."""
    if logits_BMLC.shape[:-1] != targets_BML.shape:
        raise ValueError(
            f"logits {tuple(logits_BMLC.shape)} and targets {tuple(targets_BML.shape)} disagree on [B, M, L]"
        )
    log_probs = F.log_softmax(logits_BMLC.float(), dim=-1)
    real = targets_BML >= 0
    picked = log_probs.gather(-1, targets_BML.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(~real, 0.0).flatten(1).sum(1)


def dpo_loss(
    policy_chosen_B: torch.Tensor,
    policy_rejected_B: torch.Tensor,
    reference_chosen_B: torch.Tensor,
    reference_rejected_B: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Mean DPO loss over the pairs; inputs are session log-probabilities [B]."""
    if beta <= 0:
        raise ValueError(f"beta={beta}: expected > 0")
    margin_B = (policy_chosen_B - reference_chosen_B) - (policy_rejected_B - reference_rejected_B)
    return -F.logsigmoid(beta * margin_B).mean()


def select_pairs(rewards_BN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen index [B], rejected index [B], usable [B]): the best and the worst of each user's
    N samples by reward; a user whose samples all score the same has no preference (unusable).
    Ties resolve to the lowest index, so the choice is deterministic."""
    if rewards_BN.dim() != 2 or rewards_BN.shape[1] < 2:
        raise ValueError(f"rewards must be [users, samples >= 2], got {tuple(rewards_BN.shape)}")
    chosen_B = rewards_BN.argmax(dim=1)
    rejected_B = rewards_BN.argmin(dim=1)
    usable_B = rewards_BN.max(dim=1).values > rewards_BN.min(dim=1).values
    return chosen_B, rejected_B, usable_B
