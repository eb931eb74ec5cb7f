"""One rank's share of an IPA round's sampling (OneRec section 3.4, steps 2-4): for each user,
N sessions by trie-constrained beam search with the current model M_t, their rewards, the
best and the worst as a chosen / rejected pair, and the log-probabilities M_t gives both.

Shape legend: B users in a batch, N sampled sessions per user, M session items, L code
levels, S history length, C codebook size, X = k * B rows of a stacked forward.

The model that samples is the frozen reference of the round: M_t in eval mode under
no_grad, before any optimizer exists for it. Its log-probs of the pairs are computed here,
once, and saved with them; the policy then trains from the same weights, so the reference
never needs a copy of its own (nor one resident beside the policy and its optimizer state),
and under expert parallelism it is sharded exactly as the policy is, being the same module.

Users go through in batches of `batch_size` (align.sample_batch_size): a beam search holds
batch_size x N beam rows, which with OneRec's N = 128 is what bounds the memory. Beam search
is deterministic (no random draws), and a user's sessions do not depend on which other users
share its batch, so the pairs do not depend on how users are split over ranks or batches
beyond float rounding.
"""

from __future__ import annotations

from typing import Optional

import torch

from onerec.align.dpo import select_pairs, session_log_prob
from onerec.align.pairs import PairTable
from onerec.inference.beam_search import generate_sessions
from onerec.model.onerec import ModelOutput, lookup_codes
from onerec.tokenizer.trie import Trie


def model_users(model, user_B: torch.Tensor) -> Optional[torch.Tensor]:
    """The user ids when the model reads a hashed user token, else None."""
    return user_B if model.cfg.user_buckets > 0 else None


def stacked_forward(
    forward, history_BS: torch.Tensor, user_B: Optional[torch.Tensor], codes_NL: torch.Tensor,
    targets: list[torch.Tensor],
) -> tuple[ModelOutput, list[torch.Tensor]]:
    """One teacher-forced forward of k target sessions [B, M, L] for the same B prompts, as
    k * B rows (one call: under expert parallelism every forward is a collective, and one
    bigger batch is cheaper than k); (output, the k logits blocks [B, M, L, C])."""
    k, B = len(targets), history_BS.shape[0]
    history_XS = history_BS.repeat(k, 1)
    user_X = None if user_B is None else user_B.repeat(k)
    output = forward(lookup_codes(history_XS, codes_NL), torch.cat(targets), user_X, history_XS)
    return output, list(output.logits_BMLC.split(B))


def mask_dead(reward_BN: torch.Tensor, dead_BN: torch.Tensor) -> torch.Tensor:
    """Dead beams cannot be chosen: give them the row's live minimum (never above a live beam).
    A row whose live beams all tie then has no pair (select_pairs marks it unusable)."""
    live_min = reward_BN.masked_fill(dead_BN, float("inf")).min(dim=1, keepdim=True).values
    return torch.where(dead_BN, live_min, reward_BN)


@torch.no_grad()
def sample_pairs(
    model,
    scorer,
    history_RS: torch.Tensor,
    user_R: torch.Tensor,
    target_RM: torch.Tensor,
    row_R: torch.Tensor,
    codes_NL: torch.Tensor,
    trie: Trie,
    num_samples: int,
    session_len: int,
    batch_size: int,
    device: torch.device,
    autocast: Optional[torch.dtype] = None,
) -> PairTable:
    """The pair rows of these R prompts (row_R: their rows in the round, -1 for padding rows,
    which are computed like the others so every rank runs the same batches).

    `autocast`: the training precision, so the reference log-probs are computed as the
    policy's will be (the DPO margin then starts at 0 up to rounding). Generation runs in
    the model's own precision, as evaluation does.
    """
    codes_NL, trie = codes_NL.to(device), trie.to(device)
    settings = f"align.sample_batch_size ({batch_size}) or align.num_samples ({num_samples})"
    was_training = model.training
    model.eval()
    parts = []
    try:
        for start in range(0, len(row_R), batch_size):
            rows = slice(start, start + batch_size)
            history_BS = history_RS[rows].to(device)
            user_B = user_R[rows].to(device)
            out = generate_sessions(
                model, lookup_codes(history_BS, codes_NL), trie, num_samples, session_len,
                model_users(model, user_B), history_BS, settings=settings,
            )
            # Dead beams (fewer valid sessions than N) score like the rest but are never chosen.
            reward_BN, _ = scorer.score_sessions(history_BS, out.items_BWM)
            reward_BN = reward_BN.to(device)
            dead_BN = (out.items_BWM < 0).any(-1)
            chosen_B, rejected_B, usable_B = select_pairs(mask_dead(reward_BN, dead_BN))
            rows_B = torch.arange(len(history_BS), device=device)
            # clone(): the search runs in inference mode, and its tensors later index the
            # policy's logits in a step that autograd records.
            chosen_BML = out.codes_BWML[rows_B, chosen_B].clone()
            rejected_BML = out.codes_BWML[rows_B, rejected_B].clone()
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                _, (chosen_logits, rejected_logits) = stacked_forward(
                    model, history_BS, model_users(model, user_B), codes_NL, [chosen_BML, rejected_BML]
                )
            parts.append(PairTable(
                row_R=row_R[rows].clone(),
                user_R=user_R[rows].clone(),
                history_RS=history_RS[rows].clone(),
                target_RM=target_RM[rows].clone(),
                chosen_RML=chosen_BML.cpu(),
                rejected_RML=rejected_BML.cpu(),
                ref_chosen_R=session_log_prob(chosen_logits, chosen_BML).float().cpu(),
                ref_rejected_R=session_log_prob(rejected_logits, rejected_BML).float().cpu(),
                chosen_reward_R=reward_BN[rows_B, chosen_B].float().cpu(),
                rejected_reward_R=reward_BN[rows_B, rejected_B].float().cpu(),
                usable_R=usable_B.cpu().clone(),
            ))
    finally:
        model.train(was_training)
    return PairTable.concat(parts)
