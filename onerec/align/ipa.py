"""Iterative Preference Alignment (OneRec section 3.4): the users of a round, and the held-out
evaluation of a model before and after rounds.

Shape legend: B users, N sampled sessions per user, M session items, L code levels,
S history length, K signals, U users of a round.

One round t, from the policy M_t (the stage, onerec/stages/dpo.py, runs it over the ranks):
    1. sample r_dpo of the training users (round_users); a user's prompt is their latest
       training history (latest_training_prompts)
    2. M_t generates N sessions per user by trie-constrained beam search   (align/sampling.py)
    3. the reward model scores them; the best is chosen, the worst rejected (ties: no pair)
    4. M_t, frozen, is the reference: its log-probs of both sessions are computed once
    5. the policy (starting from M_t) minimises NTP(real next session) + lambda * DPO(pairs)
       through the shared Trainer                                          (align/dpo_training.py)
The policy after the round is M_{t+1}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from onerec.align.pairs import shard_rows
from onerec.align.reward_scorer import RewardScorer
from onerec.align.sampling import model_users
from onerec.data.splits import Examples
from onerec.inference.beam_search import constrained_beam_search, generate_sessions
from onerec.inference.metrics import MetricAccumulator
from onerec.model.onerec import lookup_codes
from onerec.tokenizer.trie import Trie


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


def round_users(seed: int, round_index: int, num_prompts: int, fraction: float) -> np.ndarray:
    """[U] the prompt rows sampled for round `round_index`, sorted: ceil(fraction x prompts) of
    them (at least one), drawn from a generator seeded with (seed, round) alone, so a resumed
    job, any number of ranks and a round run on its own all sample the same users."""
    rng = np.random.default_rng([seed, round_index])
    size = min(num_prompts, max(1, math.ceil(fraction * num_prompts)))
    return np.sort(rng.choice(num_prompts, size=size, replace=False))


@dataclass
class RoundStats:
    """One round's pairs and how the trained policy stands on them (round.json "train")."""

    users: int
    pairs: int
    chosen_reward: float
    rejected_reward: float
    # The round's DPO and NTP losses of the policy after training, over all its pairs.
    dpo_loss: float
    ntp_loss: float
    preference_accuracy: float  # share of pairs whose implicit reward margin ends > 0
    steps: int = 0  # DPO optimizer steps of the round (over all ranks together)


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
    distributed: bool = False,
) -> dict:
    """OneRec Table 1 on held-out users: reward of the N generated sessions (mean and max over
    beams, averaged over users), per signal, and Recall/NDCG@K of the first generated items
    (the item-level beam search the evaluate stage uses, with the same exclude_history rule)
    against the held-out next item.

    distributed=True: every rank of the default process group calls this with the same users;
    each evaluates its strided share (padded to equal length, so an expert-parallel model's
    collectives line up) and the per-user sums meet in one all-reduce: every rank returns the
    single-process numbers, up to the order of float additions.
    """
    codes_NL = codes_NL.to(device)
    trie = trie.to(device)
    world = dist.get_world_size() if distributed and dist.is_initialized() else 1
    rows_R = shard_rows(len(prompts), dist.get_rank() if world > 1 else 0, world)
    counted_R = rows_R >= 0
    rows_R = rows_R.clamp(min=0).numpy()
    accumulator = MetricAccumulator(ks)
    K = len(scorer.names)
    # per-user sums: reward mean, reward max, users, then K signal means and K signal maxima
    sums = torch.zeros(3 + 2 * K, dtype=torch.float64)
    settings = f"align.sample_batch_size ({batch_size}) or align.num_samples ({num_samples})"
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows_R), batch_size):
            rows, counted_B = rows_R[start : start + batch_size], counted_R[start : start + batch_size]
            history_BS = torch.as_tensor(prompts.history[rows], device=device)
            user_B = model_users(model, torch.as_tensor(prompts.user[rows], device=device))
            history_codes_BSL = lookup_codes(history_BS, codes_NL)
            sessions_BNM = generate_sessions(
                model, history_codes_BSL, trie, num_samples, session_len, user_B, history_BS, settings=settings
            ).items_BWM
            live_BN = (sessions_BNM >= 0).all(-1)
            reward_BN, values_BNK = scorer.score_sessions(history_BS, sessions_BNM.clamp(min=0))
            reward_BN, values_BNK, live_BN = reward_BN.cpu().double(), values_BNK.cpu().double(), live_BN.cpu()
            count_B = live_BN.sum(1).clamp(min=1)
            per_user = torch.cat([
                ((reward_BN * live_BN).sum(1) / count_B)[:, None],
                reward_BN.masked_fill(~live_BN, float("-inf")).max(1).values[:, None],
                torch.ones(len(rows), 1, dtype=torch.float64),
                (values_BNK * live_BN[..., None]).sum(1) / count_B[:, None],
                values_BNK.masked_fill(~live_BN[..., None], float("-inf")).max(1).values,
            ], dim=1)
            sums += per_user[counted_B].sum(0)  # padding rows were computed, not counted
            top = constrained_beam_search(
                model, history_codes_BSL, trie, beam_width, user_B, history_BS,
                exclude_items_BX=history_BS if exclude_history else None,
            )
            if counted_B.any():
                accumulator.update(top.items_BW[:, : max(ks)].cpu()[counted_B], torch.as_tensor(targets_B[rows])[counted_B])
    finally:
        model.train(was_training)
    if world > 1:
        # nccl reduces device tensors only
        totals = torch.cat([sums, accumulator.state()]).to(device)
        dist.all_reduce(totals)
        totals = totals.cpu()
        sums = totals[: len(sums)]
        accumulator.load_state(totals[len(sums) :])
    users = sums[2].clamp(min=1)
    signal_mean_K, signal_max_K = sums[3 : 3 + K] / users, sums[3 + K :] / users
    result = {
        "users": len(prompts),
        "reward_mean": (sums[0] / users).item(),
        "reward_max": (sums[1] / users).item(),
        "per_signal": {
            name: {"mean": signal_mean_K[k].item(), "max": signal_max_K[k].item()} for k, name in enumerate(scorer.names)
        },
    }
    result.update(accumulator.compute())
    return result
