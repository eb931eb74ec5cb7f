"""Training the session reward model through the shared Trainer (onerec/train/trainer.py):
binary signals by cross-entropy on their rate, regression signals by squared error on their
z-score, early stopping on the held-out users' loss.

The Trainer brings the DeepSpeed engine (data parallel over the launcher's ranks), the
seeded resumable batch order, checkpoints, the NaN/inf guard, gradient clipping and logging;
this module says what one step and one evaluation compute, and how reward.* maps onto a
TrainConfig (`reward_train_config`):

    one epoch = ceil(sessions / reward.batch_size) steps; reward.batch_size is the global batch,
                every rank taking batch_size / ranks of it (so the ranks do not change the run)
    after each epoch: held-out loss -> Trainer keeps the best weights, counts reward.patience
    constant LR reward.lr (no warm-up, no decay), AdamW weight decay 0.01, gradient clip 1.0, fp32

Every rank's loss is its sessions' loss sum over the global batch's mean share
(sum_r x ranks / sessions in the global batch), so the engine's gradient average over ranks
is the gradient of the global batch's mean loss: any number of ranks takes the step one
process takes with the whole batch (up to float rounding). The held-out loss is sharded the
same way and summed over the ranks.

Shape legend: B sessions in a batch, R sessions, K signals.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from onerec.align.reward_scorer import RewardScorer
from onerec.align.sessions import LoggedSessions
from onerec.checkpoint import load_weights
from onerec.config import RewardConfig, TrainConfig
from onerec.data.sampler import DistributedBatchSampler
from onerec.errors import MissingInputError
from onerec.logging import RunLogger
from onerec.model.onerec import lookup_codes
from onerec.train.trainer import AfterStepFn, Trainer

log = logging.getLogger("onerec.reward")

SELECT_METRIC = "neg_heldout_loss"  # the Trainer keeps the highest: the lowest held-out loss


def regression_targets(sessions: LoggedSessions, binary_K: np.ndarray, mean_K: np.ndarray, std_K: np.ndarray) -> np.ndarray:
    """[R, K] training targets: rates for binary signals, z-scores for regression ones."""
    return np.where(binary_K[None, :], sessions.labels, (sessions.labels - mean_K) / std_K).astype(np.float32)


def session_losses(raw_BK: torch.Tensor, target_BK: torch.Tensor, binary_K: torch.Tensor) -> torch.Tensor:
    """[B] each session's loss, the mean over its signals of BCE (binary) or squared error."""
    bce = F.binary_cross_entropy_with_logits(raw_BK, target_BK, reduction="none")
    mse = (raw_BK - target_BK) ** 2
    return torch.where(binary_K, bce, mse).mean(dim=1)


def predict_signals(scorer: RewardScorer, sessions: LoggedSessions, batch_size: int) -> np.ndarray:
    """[R, K] signal values for logged sessions (rates / values in the signal's unit)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(sessions), batch_size):
            rows = slice(start, start + batch_size)
            raw = scorer.outputs(torch.as_tensor(sessions.history[rows]), torch.as_tensor(sessions.items[rows]))
            out.append(scorer.signal_values(raw).cpu().numpy())
    return np.concatenate(out)


def reward_train_config(cfg: RewardConfig, train: TrainConfig, num_sessions: int, world_size: int) -> TrainConfig:
    """The Trainer's settings for the reward model: everything that shapes the model comes from
    reward.*; train.* gives only how the run is kept (resume, checkpoints kept, logging cadence,
    the non-finite step limit), which the launchers set for every stage (train.resume=auto).
    The Trainer's batch_size is per rank: reward.batch_size / ranks."""
    per_rank = math.ceil(cfg.batch_size / world_size)
    if per_rank * world_size != cfg.batch_size:
        log.warning(
            "reward.batch_size=%d is not a multiple of the %d ranks: steps take %d sessions, so the updates "
            "differ from a run on another number of ranks", cfg.batch_size, world_size, per_rank * world_size,
        )
    steps_per_epoch = DistributedBatchSampler(num_sessions, per_rank, 0, 0, world_size).steps_per_epoch
    return TrainConfig(
        batch_size=per_rank,
        max_epochs=cfg.max_epochs,
        lr=cfg.lr,
        weight_decay=0.01,
        warmup_steps=0,
        min_lr_ratio=1.0,  # constant LR
        grad_clip=1.0,
        precision="fp32",
        zero_stage=0,
        eval_every=steps_per_epoch,  # once per epoch, so reward.patience counts epochs
        patience=cfg.patience,
        checkpoint_every=steps_per_epoch,
        keep_checkpoints=train.keep_checkpoints,
        log_every=train.log_every,
        resume=train.resume,
        max_nonfinite_steps=train.max_nonfinite_steps,
    )


def _sum_over_ranks(values: list[float], device: torch.device, world_size: int) -> list[float]:
    """The element-wise sum of `values` over every rank (float64; a collective when world_size > 1)."""
    if world_size == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


@dataclass
class RewardFit:
    best_epoch: int
    heldout_loss: float
    steps: int
    best_step: int
    stopped_early: bool


def fit_reward_model(
    scorer: RewardScorer,
    train: LoggedSessions,
    heldout: LoggedSessions,
    targets: dict[str, np.ndarray],
    train_cfg: TrainConfig,
    stage_dir: Path,
    dist_info: Any,
    run_logger: RunLogger,
    config_dict: dict,
    seed: int,
    after_step: Optional[AfterStepFn] = None,
) -> RewardFit:
    """Train `scorer.model` in place (every rank calls it, `dist_info` from init_distributed);
    it ends holding the weights of the best held-out epoch on every rank."""
    model, binary_K, codes_NL = scorer.model, scorer.binary_K, scorer.codes_NL
    device, world_size = dist_info.device, dist_info.world_size
    batch_size = train_cfg.batch_size

    def step_fn(engine, indices: torch.Tensor):
        rows = indices.numpy()
        if len(rows) == 0:  # this rank's share of a short last batch: no sessions, no gradient
            loss_sum = sum(p.sum() for p in model.parameters()) * 0.0
        else:
            history_BS = torch.as_tensor(train.history[rows], device=device)
            session_BM = torch.as_tensor(train.items[rows], device=device)
            codes_BSL, codes_BML = lookup_codes(history_BS, codes_NL), lookup_codes(session_BM, codes_NL)
            raw_BK = engine(history_BS, codes_BSL, session_BM, codes_BML)
            target_BK = torch.as_tensor(targets["train"][rows], device=device)
            loss_sum = session_losses(raw_BK, target_BK, binary_K).sum()
        global_sum, global_count = _sum_over_ranks([loss_sum.item(), float(len(rows))], device, world_size)
        # The engine averages gradients over ranks: this scale makes that the global batch's mean.
        loss = loss_sum * (world_size / global_count)
        return loss, {"batch_loss": global_sum / global_count}

    # Each rank scores a contiguous share of the held-out sessions; the sums meet in an all-reduce.
    share = math.ceil(len(heldout) / world_size)
    own = range(dist_info.rank * share, min(len(heldout), (dist_info.rank + 1) * share))

    def eval_fn() -> dict[str, float]:
        total = 0.0
        with torch.no_grad():
            for start in range(own.start, own.stop, batch_size):
                rows = slice(start, min(start + batch_size, own.stop))
                raw_BK = scorer.outputs(torch.as_tensor(heldout.history[rows]), torch.as_tensor(heldout.items[rows]))
                target_BK = torch.as_tensor(targets["heldout"][rows], device=device)
                total += session_losses(raw_BK, target_BK, binary_K).double().sum().item()
        (total,) = _sum_over_ranks([total], device, world_size)
        heldout_loss = total / len(heldout)
        return {"heldout_loss": heldout_loss, SELECT_METRIC: -heldout_loss}

    trainer = Trainer(
        train_cfg,
        model,
        num_examples=len(train),
        step_fn=step_fn,
        stage_dir=stage_dir,
        dist_info=dist_info,
        run_logger=run_logger,
        config_dict=config_dict,
        seed=seed,
        eval_fn=eval_fn,
        select_metric=SELECT_METRIC,
        after_step=after_step,
    )
    result = trainer.fit()
    if result.best_weights is None:  # the trainer reports only best weights this run wrote
        raise MissingInputError(
            f"{stage_dir / 'best'} holds no best weights of this training run (the held-out loss was never "
            "finite, or they were removed): start afresh with train.resume=none"
        )
    load_weights(model, result.best_weights)
    model.eval()
    return RewardFit(
        best_epoch=result.best_step // trainer.steps_per_epoch,
        heldout_loss=-result.best_metric,
        steps=result.steps,
        best_step=result.best_step,
        stopped_early=result.stopped_early,
    )
