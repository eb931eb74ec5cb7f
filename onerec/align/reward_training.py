"""Training the session reward model: binary signals by cross-entropy on their rate, regression
signals by squared error on their z-score, with early stopping on the held-out users' loss.

Shape legend: B sessions in a batch, R sessions, K signals.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from onerec.align.reward_scorer import RewardScorer
from onerec.align.sessions import LoggedSessions
from onerec.config import RewardConfig
from onerec.logging import RunLogger, progress_disabled

log = logging.getLogger("onerec.reward")


def regression_targets(sessions: LoggedSessions, binary_K: np.ndarray, mean_K: np.ndarray, std_K: np.ndarray) -> np.ndarray:
    """[R, K] training targets: rates for binary signals, z-scores for regression ones."""
    return np.where(binary_K[None, :], sessions.labels, (sessions.labels - mean_K) / std_K).astype(np.float32)


def reward_loss(raw_BK: torch.Tensor, target_BK: torch.Tensor, binary_K: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(raw_BK, target_BK, reduction="none")
    mse = (raw_BK - target_BK) ** 2
    return torch.where(binary_K, bce, mse).mean()


def predict_signals(scorer: RewardScorer, sessions: LoggedSessions, batch_size: int) -> np.ndarray:
    """[R, K] signal values for logged sessions (rates / values in the signal's unit)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(sessions), batch_size):
            rows = slice(start, start + batch_size)
            raw = scorer.outputs(torch.as_tensor(sessions.history[rows]), torch.as_tensor(sessions.items[rows]))
            out.append(scorer.signal_values(raw).cpu().numpy())
    return np.concatenate(out)


@dataclass
class RewardFit:
    best_epoch: int
    heldout_loss: float


def fit_reward_model(
    scorer: RewardScorer,
    train: LoggedSessions,
    heldout: LoggedSessions,
    targets: dict[str, np.ndarray],
    cfg: RewardConfig,
    run_logger: RunLogger,
    seed: int,
) -> RewardFit:
    """Train `scorer.model` in place; it ends holding the weights of the best held-out epoch."""
    model, binary_K = scorer.model, scorer.binary_K
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)

    def heldout_loss() -> float:
        model.eval()
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(heldout), cfg.batch_size):
                rows = slice(start, start + cfg.batch_size)
                raw = scorer.outputs(torch.as_tensor(heldout.history[rows]), torch.as_tensor(heldout.items[rows]))
                target = torch.as_tensor(targets["heldout"][rows], device=device)
                total += reward_loss(raw, target, binary_K).item() * len(target)
        return total / len(heldout)

    best_loss, best_state, best_epoch, stale = float("inf"), None, 0, 0
    epochs = tqdm(range(1, cfg.max_epochs + 1), desc="reward", disable=progress_disabled(), dynamic_ncols=True)
    for epoch in epochs:
        model.train()
        order = torch.randperm(len(train), generator=generator).numpy()
        for start in range(0, len(train), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            raw = scorer.outputs(torch.as_tensor(train.history[rows]), torch.as_tensor(train.items[rows]))
            loss = reward_loss(raw, torch.as_tensor(targets["train"][rows], device=device), binary_K)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        current = heldout_loss()
        epochs.set_postfix(heldout_loss=f"{current:.4f}")
        log.info("reward epoch %d: held-out loss %.4f", epoch, current)
        run_logger.log({"heldout_loss": current, "train_loss": loss.item()}, epoch)
        if current < best_loss - 1e-5:
            best_loss, best_state, best_epoch, stale = current, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if cfg.patience and stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return RewardFit(best_epoch, best_loss)
