"""Iterative Preference Alignment (OneRec section 3.4): one round, and the held-out evaluation.

Shape legend: B users, N sampled sessions per user, M session items, L code levels,
S history length, K signals.

One round t, from the policy M_t:
    1. sample r_dpo of the training users; each user's prompt is their latest training history
    2. M_t generates N sessions per user by trie-constrained beam search
    3. the reward model scores them; the best is chosen, the worst rejected (ties: no pair)
    4. M_t, frozen, is the reference: its log-probs of both sessions are computed once
    5. the policy (starting from M_t) minimises NTP(real next session) + lambda * DPO(pairs)
The policy after the round is M_{t+1}.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from onerec.align.dpo import dpo_loss, select_pairs, session_log_prob
from onerec.align.reward_scorer import RewardScorer
from onerec.config import AlignConfig
from onerec.data.splits import Examples
from onerec.inference.beam_search import constrained_beam_search, generate_sessions
from onerec.inference.metrics import MetricAccumulator
from onerec.logging import progress_disabled
from onerec.model.onerec import lookup_codes
from onerec.tokenizer.trie import Trie
from onerec.train.losses import next_token_loss


@dataclass
class Prompts:
    """Users to generate for: their history and their real next session (for the NTP term)."""

    user: np.ndarray  # [B]
    history: np.ndarray  # [B, S]
    target: np.ndarray  # [B, M], -1 padding

    def __len__(self) -> int:
        return len(self.user)

    def subset(self, rows: np.ndarray) -> "Prompts":
        return Prompts(self.user[rows], self.history[rows], self.target[rows])


def _last_rows(user, history, target) -> np.ndarray:
    """[B] the row of each user's last example, in row order (the examples are grouped by user).

    From the training split (the columns of one onerec.data.splits.Examples) the rows are read
    off its CSR offsets: user u's examples are rows example_offsets[u] .. example_offsets[u+1] - 1,
    so this touches [U + 1] offsets and gathers nothing per example. Plain arrays (already
    whole) are scanned for the rows where the user changes.
    """
    examples = getattr(user, "examples", None)
    if isinstance(examples, Examples) and all(getattr(c, "examples", None) is examples for c in (history, target)):
        offsets_U1 = examples.example_offsets
        has_rows_U = offsets_U1[1:] > offsets_U1[:-1]  # users without examples have none to take
        return offsets_U1[1:][has_rows_U].astype(np.int64) - 1
    user = np.asarray(user)
    return np.flatnonzero(np.r_[user[1:] != user[:-1], True]) if len(user) else np.zeros(0, dtype=np.int64)


def latest_training_prompts(user, history, target) -> Prompts:
    """Each user's last training example (the examples are grouped by user, prefixes in order):
    user [N], history [N, S], target [N, M] as arrays, or the columns of an `Examples`
    (train.user, train.history, train.target), of which only those B rows are gathered."""
    last = _last_rows(user, history, target)
    return Prompts(user[last], history[last], target[last])


def _users(model, user_B: torch.Tensor) -> torch.Tensor | None:
    """The user ids when the model reads a hashed user token, else None."""
    return user_B if model.cfg.user_buckets > 0 else None


def _generate(model, prompts: Prompts, codes_NL, trie, num_samples: int, session_len: int, batch_size: int, device):
    """Sessions [B, N, M] and their codes [B, N, M, L] by beam search, in batches."""
    items, codes = [], []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            rows = slice(start, start + batch_size)
            history_BS = torch.as_tensor(prompts.history[rows], device=device)
            user_B = _users(model, torch.as_tensor(prompts.user[rows], device=device))
            out = generate_sessions(
                model, lookup_codes(history_BS, codes_NL), trie, num_samples, session_len, user_B, history_BS
            )
            items.append(out.items_BWM)
            codes.append(out.codes_BWML)
    finally:
        model.train(was_training)
    return torch.cat(items), torch.cat(codes)


def _log_probs(model, history_BS, user_B, codes_NL, session_codes_BML) -> torch.Tensor:
    output = model(lookup_codes(history_BS, codes_NL), session_codes_BML, _users(model, user_B), history_BS)
    return session_log_prob(output.logits_BMLC, session_codes_BML)


@dataclass
class RoundStats:
    users: int
    pairs: int
    chosen_reward: float
    rejected_reward: float
    dpo_loss: float
    ntp_loss: float
    preference_accuracy: float  # share of pairs whose implicit reward margin ends > 0


def ipa_round(
    policy,
    scorer: RewardScorer,
    prompts: Prompts,
    codes_NL: torch.Tensor,
    trie: Trie,
    cfg: AlignConfig,
    session_len: int,
    generator: torch.Generator,
    device: torch.device,
) -> RoundStats:
    """One round on `prompts` (already sampled); updates `policy` in place."""
    codes_NL = codes_NL.to(device)
    trie = trie.to(device)
    sessions_BNM, session_codes_BNML = _generate(
        policy, prompts, codes_NL, trie, cfg.num_samples, session_len, cfg.batch_size, device
    )
    history_BS = torch.as_tensor(prompts.history, device=device)
    rewards = []
    for start in range(0, len(prompts), cfg.batch_size):
        rows = slice(start, start + cfg.batch_size)
        reward_BN, _ = scorer.score_sessions(history_BS[rows], sessions_BNM[rows])
        rewards.append(reward_BN)
    reward_BN = torch.cat(rewards).to(device)
    # a dead beam (fewer valid sessions than N) must never be chosen nor rejected
    dead_BN = (sessions_BNM < 0).any(-1)
    chosen_B, rejected_B, usable_B = select_pairs(_mask_dead(reward_BN, dead_BN))
    rows_B = torch.arange(len(prompts), device=device)
    keep = usable_B.nonzero().squeeze(1)
    chosen_codes = session_codes_BNML[rows_B, chosen_B][keep]
    rejected_codes = session_codes_BNML[rows_B, rejected_B][keep]
    history_BS = history_BS[keep]
    user_B = torch.as_tensor(prompts.user, device=device)[keep]
    target_BM = torch.as_tensor(prompts.target, device=device)[keep]
    chosen_reward = reward_BN[rows_B, chosen_B][keep]
    rejected_reward = reward_BN[rows_B, rejected_B][keep]
    if len(keep) == 0:
        return RoundStats(len(prompts), 0, float("nan"), float("nan"), float("nan"), float("nan"), float("nan"))

    reference = copy.deepcopy(policy).eval()
    with torch.no_grad():
        ref_chosen, ref_rejected = [], []
        for start in range(0, len(keep), cfg.batch_size):
            rows = slice(start, start + cfg.batch_size)
            ref_chosen.append(_log_probs(reference, history_BS[rows], user_B[rows], codes_NL, chosen_codes[rows]))
            ref_rejected.append(_log_probs(reference, history_BS[rows], user_B[rows], codes_NL, rejected_codes[rows]))
        ref_chosen, ref_rejected = torch.cat(ref_chosen), torch.cat(ref_rejected)
    del reference

    # Dropout off while aligning: the DPO margin must start at exactly 0 (policy == reference).
    was_training = policy.training
    policy.eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    dpo_total, ntp_total, batches = 0.0, 0.0, 0
    for _ in range(cfg.epochs_per_round):
        order = torch.randperm(len(keep), generator=generator).to(device)
        for start in tqdm(range(0, len(keep), cfg.batch_size), desc="dpo", disable=progress_disabled(), leave=False):
            rows = order[start : start + cfg.batch_size]
            history_codes = lookup_codes(history_BS[rows], codes_NL)
            chosen = _log_probs(policy, history_BS[rows], user_B[rows], codes_NL, chosen_codes[rows])
            rejected = _log_probs(policy, history_BS[rows], user_B[rows], codes_NL, rejected_codes[rows])
            dpo = dpo_loss(chosen, rejected, ref_chosen[rows], ref_rejected[rows], cfg.beta)
            real_codes = lookup_codes(target_BM[rows], codes_NL)
            output = policy(history_codes, real_codes, _users(policy, user_B[rows]), history_BS[rows])
            ntp, _ = next_token_loss(output.logits_BMLC, real_codes, policy.code_mask_LC)
            loss = ntp + cfg.dpo_weight * dpo
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            dpo_total, ntp_total, batches = dpo_total + dpo.item(), ntp_total + ntp.item(), batches + 1
    with torch.no_grad():
        margins = []
        for start in range(0, len(keep), cfg.batch_size):
            rows = slice(start, start + cfg.batch_size)
            chosen = _log_probs(policy, history_BS[rows], user_B[rows], codes_NL, chosen_codes[rows]) - ref_chosen[rows]
            rejected = _log_probs(policy, history_BS[rows], user_B[rows], codes_NL, rejected_codes[rows]) - ref_rejected[rows]
            margins.append(chosen - rejected)
        accuracy = (torch.cat(margins) > 0).float().mean().item()
    policy.train(was_training)
    return RoundStats(
        users=len(prompts),
        pairs=len(keep),
        chosen_reward=chosen_reward.mean().item(),
        rejected_reward=rejected_reward.mean().item(),
        dpo_loss=dpo_total / max(batches, 1),
        ntp_loss=ntp_total / max(batches, 1),
        preference_accuracy=accuracy,
    )


def _mask_dead(reward_BN: torch.Tensor, dead_BN: torch.Tensor) -> torch.Tensor:
    """Dead beams cannot be chosen: give them the row's live minimum (never above a live beam).
    A row whose live beams all tie then has no pair (select_pairs marks it unusable)."""
    live_min = reward_BN.masked_fill(dead_BN, float("inf")).min(dim=1, keepdim=True).values
    return torch.where(dead_BN, live_min, reward_BN)


@torch.no_grad()
def evaluate_alignment(
    model,
    scorer: RewardScorer,
    prompts: Prompts,
    targets_B: np.ndarray,
    codes_NL: torch.Tensor,
    trie: Trie,
    num_samples: int,
    session_len: int,
    beam_width: int,
    ks: list[int],
    batch_size: int,
    device: torch.device,
    exclude_history: bool = False,
) -> dict:
    """OneRec Table 1 on held-out users: reward of the N generated sessions (mean and max over
    beams, averaged over users), per signal, and Recall/NDCG@K of the first generated items
    (the item-level beam search the evaluate stage uses, with the same exclude_history rule)
    against the held-out next item."""
    codes_NL = codes_NL.to(device)
    trie = trie.to(device)
    sessions_BNM, _ = _generate(model, prompts, codes_NL, trie, num_samples, session_len, batch_size, device)
    history_all = torch.as_tensor(prompts.history, device=device)
    accumulator = MetricAccumulator(ks)
    reward_mean, reward_max, signal_mean, signal_max = [], [], [], []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            rows = slice(start, start + batch_size)
            live_BN = (sessions_BNM[rows] >= 0).all(-1)
            reward_BN, values_BNK = scorer.score_sessions(history_all[rows], sessions_BNM[rows].clamp(min=0))
            count_B = live_BN.sum(1).clamp(min=1)
            reward_mean.append((reward_BN * live_BN).sum(1) / count_B)
            reward_max.append(reward_BN.masked_fill(~live_BN, float("-inf")).max(1).values)
            signal_mean.append((values_BNK * live_BN[..., None]).sum(1) / count_B[:, None])
            signal_max.append(values_BNK.masked_fill(~live_BN[..., None], float("-inf")).max(1).values)
            history_BS = history_all[rows]
            user_B = _users(model, torch.as_tensor(prompts.user[rows], device=device))
            top = constrained_beam_search(
                model, lookup_codes(history_BS, codes_NL), trie, beam_width, user_B, history_BS,
                exclude_items_BX=history_BS if exclude_history else None,
            )
            accumulator.update(top.items_BW[:, : max(ks)].cpu(), torch.as_tensor(targets_B[rows]))
    finally:
        model.train(was_training)
    signal_mean_K = torch.cat(signal_mean).mean(0)
    signal_max_K = torch.cat(signal_max).mean(0)
    result = {
        "users": len(prompts),
        "reward_mean": torch.cat(reward_mean).mean().item(),
        "reward_max": torch.cat(reward_max).mean().item(),
        "per_signal": {
            name: {"mean": signal_mean_K[k].item(), "max": signal_max_K[k].item()} for k, name in enumerate(scorer.names)
        },
    }
    result.update(accumulator.compute())
    return result
