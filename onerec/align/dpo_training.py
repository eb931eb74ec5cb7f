"""DPO + NTP on a round's preference pairs through the shared Trainer (onerec/train/trainer.py).

Shape legend: B pairs in a batch (this rank's share of the step), S history length, M session
items, L code levels, C codebook size, X = 3 * B rows of the stacked forward.

The Trainer brings the DeepSpeed engine (data parallel over the ranks; experts sharded when
parallel.expert_parallel_size > 1; ZeRO 0/1/2), bf16 autocast on GPU, the NaN/inf guard,
gradient clipping, checkpoints in <out>/dpo/round_<k>/checkpoints and logging; this module
says what one step computes, and how align.* maps onto a TrainConfig (`round_train_config`):

    steps     = epochs_per_round x ceil(pairs / align.batch_size); align.batch_size is the
                global batch, every rank taking batch_size / ranks of it
    LR        = align.lr, constant (no warm-up, no decay); AdamW, no weight decay
    from train.*: precision, zero_stage, grad_clip, keep_checkpoints, log_every,
                  max_nonfinite_steps

One step, per rank, for its pairs: one forward of [chosen; rejected; real next session]
(3B rows sharing B prompts) gives log pi(chosen), log pi(rejected) and the NTP loss of the
real session. Every rank's loss is its sums over the global batch's counts, times the number
of ranks (sum_r x ranks / pairs of the global batch, and likewise per NTP token): the
engine's gradient average over ranks is then the gradient of the global batch's mean loss,
so any number of ranks takes the step one process takes with the whole batch (up to float
rounding), also on a short last batch. A rank left without pairs there still runs one forward
on a placeholder pair with weight 0: an expert-parallel forward is a collective.

The policy trains in eval mode (dropout off), as OneRec's margin must start at exactly 0
(policy == reference). The Trainer puts the model in train mode when fit() starts, so each
step puts it back (cheap: a walk over the modules).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from onerec.align.dpo import session_log_prob
from onerec.align.ipa import RoundStats
from onerec.align.pairs import PairTable, shard_rows
from onerec.align.sampling import model_users, stacked_forward
from onerec.config import AlignConfig, TrainConfig
from onerec.device import autocast_dtype
from onerec.model.onerec import lookup_codes
from onerec.train.trainer import AfterStepFn, FitResult, Trainer

log = logging.getLogger("onerec.dpo")

NEVER = 1 << 40  # eval_every: a round has no validation inside it (the stage evaluates after it)


def round_train_config(align: AlignConfig, train: TrainConfig, world_size: int) -> TrainConfig:
    """The Trainer's settings for one round's DPO (see the module docstring)."""
    per_rank = math.ceil(align.batch_size / world_size)
    if per_rank * world_size != align.batch_size:
        log.warning(
            "align.batch_size=%d is not a multiple of the %d ranks: steps take %d pairs, so the updates differ "
            "from a run on another number of ranks", align.batch_size, world_size, per_rank * world_size,
        )
    return TrainConfig(
        batch_size=per_rank,
        max_epochs=align.epochs_per_round,
        lr=align.lr,
        weight_decay=0.0,
        warmup_steps=0,
        min_lr_ratio=1.0,  # constant LR
        grad_clip=train.grad_clip,
        precision=train.precision,
        zero_stage=train.zero_stage,
        eval_every=NEVER,
        patience=0,
        checkpoint_every=align.checkpoint_every,
        keep_checkpoints=train.keep_checkpoints,
        log_every=train.log_every,
        resume="auto",  # a round's directory holds only this dpo run's files (see the stage)
        max_nonfinite_steps=train.max_nonfinite_steps,
    )


def _sum_over_ranks(values_V: torch.Tensor, device: torch.device, world_size: int) -> torch.Tensor:
    """Element-wise sum over the ranks (float64, on the host; a collective when world_size > 1)."""
    if world_size == 1:
        return values_V
    total = values_V.to(device)  # nccl reduces device tensors only
    dist.all_reduce(total)
    return total.cpu()


def pair_terms(forward, model, pairs: PairTable, rows_B: torch.Tensor, codes_NL: torch.Tensor, beta: float):
    """Per pair of `rows_B` (on the pairs' device), under `forward` (the engine or the model):
    (DPO loss [B], the real next session's negative log-likelihood summed over its tokens [B]
    (the NTP term), that session's token count [B], the implicit reward margin [B]).
    Per pair, not per batch, so a caller can weight rows (padding and placeholder rows 0)."""
    history_BS = pairs.history_RS[rows_B]
    user_B = model_users(model, pairs.user_R[rows_B])
    chosen_BML, rejected_BML = pairs.chosen_RML[rows_B], pairs.rejected_RML[rows_B]
    real_BML = lookup_codes(pairs.target_RM[rows_B], codes_NL)
    _, (chosen_logits, rejected_logits, real_logits) = stacked_forward(
        forward, history_BS, user_B, codes_NL, [chosen_BML, rejected_BML, real_BML]
    )
    margin_B = (session_log_prob(chosen_logits, chosen_BML) - pairs.ref_chosen_R[rows_B]) - (
        session_log_prob(rejected_logits, rejected_BML) - pairs.ref_rejected_R[rows_B]
    )
    # next_token_loss without label smoothing, per row: the sum of -log p over the real tokens
    ntp_B = -session_log_prob(real_logits, real_BML)
    tokens_B = (real_BML >= 0).flatten(1).sum(1)
    return -F.logsigmoid(beta * margin_B), ntp_B, tokens_B, margin_B


def dpo_step_fn(model, pairs: PairTable, codes_NL: torch.Tensor, align: AlignConfig, device: torch.device,
                world_size: int) -> Callable[[Any, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]:
    """The Trainer's step: (engine, this rank's pair indices) -> (loss, scalars); `pairs` on `device`."""

    def step_fn(engine, indices: torch.Tensor):
        if model.training:  # fit() set train mode: dropout stays off (see the module docstring)
            model.eval()
        rows_B = (indices if len(indices) else torch.zeros(1, dtype=torch.long)).to(device)
        weight_B = torch.full((len(rows_B),), 1.0 if len(indices) else 0.0, device=device)
        dpo_B, ntp_B, tokens_B, _ = pair_terms(engine, model, pairs, rows_B, codes_NL, align.beta)
        dpo_sum, ntp_sum = (dpo_B * weight_B).sum(), (ntp_B * weight_B).sum()
        local = torch.tensor([float(len(indices)), (tokens_B * weight_B).sum().item(), dpo_sum.item(), ntp_sum.item()],
                             dtype=torch.float64)
        num_pairs, num_tokens, dpo_total, ntp_total = _sum_over_ranks(local, device, world_size).tolist()
        num_tokens = max(num_tokens, 1.0)
        # The engine averages gradients over ranks: this makes it the global batch's mean.
        loss = world_size * (align.dpo_weight * dpo_sum / num_pairs + ntp_sum / num_tokens)
        dpo_mean, ntp_mean = dpo_total / num_pairs, ntp_total / num_tokens
        # "loss" replaces the Trainer's own (this rank's scaled share) in the run log: the global batch's
        return loss, {"loss": align.dpo_weight * dpo_mean + ntp_mean, "dpo_loss": dpo_mean, "ntp_loss": ntp_mean,
                      "pairs": num_pairs}

    return step_fn


@torch.no_grad()
def round_statistics(model, pairs: PairTable, codes_NL: torch.Tensor, align: AlignConfig, device: torch.device,
                     rank: int, world_size: int, autocast: Optional[torch.dtype], steps: int, users: int) -> RoundStats:
    """How the trained policy stands on the round's pairs (`pairs`: the usable ones, on
    `device`): its DPO and NTP losses and preference accuracy, each rank scoring its strided
    share (padded, so the batches line up under expert parallelism), summed over ranks."""
    if len(pairs) == 0:
        nan = float("nan")
        return RoundStats(users, 0, nan, nan, nan, nan, nan, steps)
    was_training = model.training
    model.eval()
    rows_R = shard_rows(len(pairs), rank, world_size)
    sums = torch.zeros(4, dtype=torch.float64)  # dpo loss, margin > 0, ntp sum, ntp tokens
    try:
        for start in range(0, len(rows_R), align.batch_size):
            rows = rows_R[start : start + align.batch_size]
            counted_B = (rows >= 0).to(device)  # the padding repeats row 0: computed, not counted
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                dpo_B, ntp_B, tokens_B, margin_B = pair_terms(
                    model, model, pairs, rows.clamp(min=0).to(device), codes_NL, align.beta
                )
            sums += torch.tensor([
                dpo_B[counted_B].double().sum().item(), (margin_B[counted_B] > 0).sum().item(),
                ntp_B[counted_B].double().sum().item(), tokens_B[counted_B].sum().item(),
            ], dtype=torch.float64)
    finally:
        model.train(was_training)
    dpo_total, accurate, ntp_total, tokens = _sum_over_ranks(sums, device, world_size).tolist()
    return RoundStats(
        users=users,
        pairs=len(pairs),
        chosen_reward=pairs.chosen_reward_R.mean().item(),
        rejected_reward=pairs.rejected_reward_R.mean().item(),
        dpo_loss=dpo_total / len(pairs),
        ntp_loss=ntp_total / max(tokens, 1.0),
        preference_accuracy=accurate / len(pairs),
        steps=steps,
    )


def train_on_pairs(
    model,
    pairs: PairTable,
    codes_NL: torch.Tensor,
    align: AlignConfig,
    train_cfg: TrainConfig,
    stage_dir: Path,
    dist_info: Any,
    run_logger: Any,
    config_dict: dict,
    seed: int,
    after_step: Optional[AfterStepFn] = None,
) -> FitResult:
    """Train `model` (the policy, every rank calling it) on `pairs` (the usable ones) through a
    fresh Trainer whose checkpoints go to `stage_dir`/checkpoints; resumes from them when
    there are some (train_cfg.resume). The model ends holding the last step's weights."""
    device = dist_info.device
    trainer = Trainer(
        train_cfg,
        model,
        num_examples=len(pairs),
        step_fn=dpo_step_fn(model, pairs.to(device), codes_NL.to(device), align, device, dist_info.world_size),
        stage_dir=stage_dir,
        dist_info=dist_info,
        run_logger=run_logger,
        config_dict=config_dict,
        seed=seed,
        after_step=after_step,
    )
    result = trainer.fit()
    model.eval()
    return result


def autocast_of(train: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype the Trainer trains in (the reference log-probs use it too)."""
    return autocast_dtype(train.precision, device)
