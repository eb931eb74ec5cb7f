"""Stage `reward`: train the session reward model on logged sessions and their feedback.

Reads <out>/data and <out>/semantic_ids; writes <out>/reward/{model.safetensors, reward.json}.
reward.json holds the signals, the regression targets' mean/std, the model shape, and the
held-out report: per signal the model's AUC (binary) / RMSE, the same for the baseline that
predicts each item's mean signal, and (binary signals) the AUC of ranking sessions by their
items' training popularity.

Only interactions before each user's validation target are used (in_training_period): the
reward model steers IPA, so it must not have seen the targets the aligned model is scored on.

Shape legend: B sessions in a batch, S history length, M session items, L code levels, K signals.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from onerec.align.reward_eval import baseline_predictions, item_mean_signal, popularity_report, signal_report
from onerec.align.reward_model import SessionRewardModel
from onerec.align.sessions import (
    CONSUMED_COLUMN,
    LoggedSessions,
    build_sessions,
    holdout_users,
    item_signal_values,
    with_popularity_negatives,
)
from onerec.checkpoint import load_weights, save_weights
from onerec.config import RewardConfig, RootConfig, SignalConfig, to_dict
from onerec.data.splits import in_training_period, training_item_counts
from onerec.data.stage import load_prepared
from onerec.distributed.deepspeed import resolve_device
from onerec.logging import RunLogger, progress_disabled, write_json_atomic
from onerec.model.onerec import lookup_codes
from onerec.paths import RunPaths
from onerec.tokenizer.semantic_ids import SemanticIds

log = logging.getLogger("onerec.reward")


class RewardScorer:
    """A trained reward model with what it needs to turn tower outputs into signal values."""

    def __init__(self, model: SessionRewardModel, signals: list[SignalConfig], mean_K, std_K, codes_NL) -> None:
        self.model = model.eval()
        self.signals = signals
        device = next(model.parameters()).device
        self.binary_K = torch.tensor([s.kind == "binary" for s in signals], device=device)
        self.mean_K = torch.as_tensor(mean_K, dtype=torch.float32, device=device)
        self.std_K = torch.as_tensor(std_K, dtype=torch.float32, device=device)
        self.weight_K = torch.tensor([s.weight for s in signals], dtype=torch.float32, device=device)
        self.codes_NL = codes_NL.to(device)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.signals]

    def outputs(self, history_BS: torch.Tensor, sessions_BM: torch.Tensor) -> torch.Tensor:
        """Raw tower outputs [B, K]: logits (binary) and z-scores (regression)."""
        device = self.codes_NL.device
        history_BS, sessions_BM = history_BS.to(device), sessions_BM.to(device)
        return self.model(
            history_BS, lookup_codes(history_BS, self.codes_NL), sessions_BM, lookup_codes(sessions_BM, self.codes_NL)
        )

    def signal_values(self, raw_BK: torch.Tensor) -> torch.Tensor:
        """Predicted rates (binary) and values in the signal's own unit (regression)."""
        return torch.where(self.binary_K, torch.sigmoid(raw_BK), raw_BK * self.std_K + self.mean_K)

    def reward(self, raw_BK: torch.Tensor) -> torch.Tensor:
        """The IPA reward: sum_k weight_k * (rate_k for binary, z-score_k for regression)."""
        return (torch.where(self.binary_K, torch.sigmoid(raw_BK), raw_BK) * self.weight_K).sum(-1)

    @torch.no_grad()
    def score_sessions(self, history_BS: torch.Tensor, sessions_BNM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward [B, N], signal values [B, N, K]) for N candidate sessions per user."""
        B, N, M = sessions_BNM.shape
        history_xS = history_BS.repeat_interleave(N, dim=0)
        raw = self.outputs(history_xS, sessions_BNM.reshape(B * N, M))
        return self.reward(raw).view(B, N), self.signal_values(raw).view(B, N, -1)


def _model_kwargs(cfg: RewardConfig, num_items: int, codebook_sizes: list[int], num_signals: int, max_history: int):
    return {
        "num_items": num_items,
        "codebook_sizes": list(codebook_sizes),
        "num_signals": num_signals,
        "max_history": max_history,
        "d_model": cfg.d_model,
        "num_heads": cfg.num_heads,
        "session_layers": cfg.layers,
        "dropout": cfg.dropout,
    }


def load_reward(directory: Path, codes_NL: torch.Tensor, device: torch.device | str = "cpu") -> RewardScorer:
    directory = Path(directory)
    meta_path = directory / "reward.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory}: no reward.json; run `onerec reward` first")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    model = SessionRewardModel(**meta["model"])
    load_weights(model, directory / "model.safetensors")
    signals = [SignalConfig(**s) for s in meta["signals"]]
    return RewardScorer(model.to(device), signals, meta["target_mean"], meta["target_std"], codes_NL)


def _targets(sessions: LoggedSessions, binary: np.ndarray, mean_K: np.ndarray, std_K: np.ndarray) -> np.ndarray:
    """Training targets: rates for binary signals, z-scores for regression ones."""
    return np.where(binary[None, :], sessions.labels, (sessions.labels - mean_K) / std_K).astype(np.float32)


def _loss(raw_BK: torch.Tensor, target_BK: torch.Tensor, binary_K: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(raw_BK, target_BK, reduction="none")
    mse = (raw_BK - target_BK) ** 2
    return torch.where(binary_K, bce, mse).mean()


def _predict(scorer: RewardScorer, sessions: LoggedSessions, batch_size: int) -> np.ndarray:
    """Signal values [R, K] for logged sessions (rates / values in the signal's unit)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(sessions), batch_size):
            rows = slice(start, start + batch_size)
            raw = scorer.outputs(torch.as_tensor(sessions.history[rows]), torch.as_tensor(sessions.items[rows]))
            out.append(scorer.signal_values(raw).cpu().numpy())
    return np.concatenate(out)


def main(cfg: RootConfig) -> dict:
    rcfg = cfg.reward
    if not rcfg.signals:
        raise ValueError("reward.signals is empty: list the feedback signals to learn (see configs/demo.yaml)")
    started = time.perf_counter()
    paths = RunPaths.of(cfg.run.out_dir)
    device = resolve_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    prepared = load_prepared(paths.require(paths.data, "data"))
    semantic_ids = SemanticIds.load(paths.require(paths.semantic_ids, "tokenize"))
    num_items = int(semantic_ids.codes.shape[0])

    arrow = prepared.interactions.data
    columns = {name: arrow.column(name).to_numpy() for name in prepared.meta["feedback_columns"]}
    if any(s.column == CONSUMED_COLUMN for s in rcfg.signals):
        columns.setdefault(CONSUMED_COLUMN, np.ones(arrow.num_rows, dtype=np.float32))
    user_x, order_x = arrow.column("user_index").to_numpy(), arrow.column("order").to_numpy()
    rows_x = in_training_period(user_x, order_x, prepared.sequences, cfg.data)
    log.info("reward: %d of %d logged interactions precede their user's validation target", rows_x.sum(), len(rows_x))
    logged = columns.get("logged")
    sessions = build_sessions(
        user_x[rows_x],
        arrow.column("item_index").to_numpy()[rows_x],
        order_x[rows_x],
        item_signal_values(columns, list(rcfg.signals))[rows_x],
        None if logged is None else logged[rows_x],
        prepared.sequences,
        list(rcfg.signals),
        cfg.data.session_len,
        rcfg.session_gap,
        cfg.data.max_history,
    )
    item_counts_N = training_item_counts(prepared.sequences, cfg.data, num_items)
    sessions = with_popularity_negatives(sessions, rcfg.negatives, item_counts_N, cfg.run.seed)
    held_users = holdout_users(prepared.meta["users"], rcfg.holdout_fraction, cfg.run.seed)
    held = held_users[sessions.user]
    train, heldout = sessions.subset(np.flatnonzero(~held)), sessions.subset(np.flatnonzero(held))
    if len(train) == 0 or len(heldout) == 0:
        raise ValueError(f"{len(sessions)} sessions are too few to hold out reward.holdout_fraction={rcfg.holdout_fraction}")
    log.info("reward sessions: %d training, %d held out (%d users held out)", len(train), len(heldout), int(held_users.sum()))

    binary = np.asarray([s.kind == "binary" for s in rcfg.signals])
    mean_K = np.where(binary, 0.0, train.labels.mean(axis=0)).astype(np.float32)
    std_K = np.where(binary, 1.0, train.labels.std(axis=0).clip(min=1e-6)).astype(np.float32)
    kwargs = _model_kwargs(rcfg, num_items, list(semantic_ids.codebook_sizes), len(rcfg.signals), cfg.data.max_history)
    model = SessionRewardModel(**kwargs).to(device)
    scorer = RewardScorer(model, list(rcfg.signals), mean_K, std_K, semantic_ids.codes)
    binary_K = scorer.binary_K
    targets = {"train": _targets(train, binary, mean_K, std_K), "heldout": _targets(heldout, binary, mean_K, std_K)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=rcfg.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(cfg.run.seed)

    def heldout_loss() -> float:
        model.eval()
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(heldout), rcfg.batch_size):
                rows = slice(start, start + rcfg.batch_size)
                raw = scorer.outputs(torch.as_tensor(heldout.history[rows]), torch.as_tensor(heldout.items[rows]))
                target = torch.as_tensor(targets["heldout"][rows], device=device)
                total += _loss(raw, target, binary_K).item() * len(target)
        return total / len(heldout)

    best_loss, best_state, best_epoch, stale = float("inf"), None, 0, 0
    run_logger = RunLogger(cfg.logging, paths.root, "reward", to_dict(cfg))
    epochs = tqdm(range(1, rcfg.max_epochs + 1), desc="reward", disable=progress_disabled(), dynamic_ncols=True)
    for epoch in epochs:
        model.train()
        order = torch.randperm(len(train), generator=generator).numpy()
        for start in range(0, len(train), rcfg.batch_size):
            rows = order[start : start + rcfg.batch_size]
            raw = scorer.outputs(torch.as_tensor(train.history[rows]), torch.as_tensor(train.items[rows]))
            loss = _loss(raw, torch.as_tensor(targets["train"][rows], device=device), binary_K)
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
            if rcfg.patience and stale >= rcfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()

    names, kinds = [s.name for s in rcfg.signals], [s.kind for s in rcfg.signals]
    predictions = _predict(scorer, heldout, rcfg.batch_size)
    item_mean = item_mean_signal(train.items, train.item_values, num_items)
    report = {
        "model": signal_report(predictions, heldout.labels, heldout.any_event, kinds, names),
        "baseline_item_mean": signal_report(
            baseline_predictions(heldout.items, item_mean), heldout.labels, heldout.any_event, kinds, names
        ),
        "baseline_popularity": popularity_report(heldout, item_counts_N, kinds, names),
    }
    run_logger.summary({
        f"heldout/{name}/{metric}": value
        for name, values in report["model"].items() for metric, value in values.items()
    })
    run_logger.close()
    for name in names:
        ours, base = report["model"][name], report["baseline_item_mean"][name]
        if "auc" in ours:
            log.info(
                "held-out %s: AUC %.4f (item-mean baseline %.4f, popularity %.4f)",
                name, ours["auc"], base["auc"], report["baseline_popularity"][name]["auc"],
            )
        else:
            log.info("held-out %s: RMSE %.4f (item-mean baseline %.4f)", name, ours["rmse"], base["rmse"])

    out = paths.reward
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "model.safetensors")
    result = {
        "signals": [asdict(s) for s in rcfg.signals],
        "target_mean": mean_K.tolist(),
        "target_std": std_K.tolist(),
        "model": kwargs,
        "sessions": {"train": len(train), "heldout": len(heldout), "session_len": cfg.data.session_len},
        # logged rows before each user's validation target (the only ones learned from), of all
        "interactions": {"used": int(rows_x.sum()), "logged": len(rows_x)},
        "best_epoch": best_epoch,
        "heldout_loss": best_loss,
        "heldout": report,
        "wall_seconds": time.perf_counter() - started,
    }
    write_json_atomic(out / "reward.json", result)
    log.info("reward model written to %s", out)
    return result
