"""`onerec reward`: train the session reward model on logged sessions and their feedback.

Reads <out>/data and <out>/semantic_ids; writes <out>/reward/{model.safetensors, reward.json}.
reward.json holds the signals, the regression targets' mean/std, the model shape, and the
held-out report: per signal the model's AUC (binary) / RMSE, the same for the baseline that
predicts each item's mean signal, and (binary signals) the AUC of ranking sessions by their
items' training popularity.

Only interactions before each user's validation target are used (in_training_period): the
reward model steers IPA, so it must not have seen the targets the aligned model is scored on.

Training goes through the shared Trainer (onerec/align/reward_training.py): it runs on every
rank of a launcher, data parallel (`distributed` in the stage table), and keeps resumable
checkpoints in <out>/reward/checkpoints and the best held-out epoch's weights in
<out>/reward/best (train.resume=auto, which the launchers pass, continues a killed run).
Every rank builds the same sessions from the same seed and ends holding the best weights;
only rank 0 writes model.safetensors and reward.json.

Shape legend: B sessions in a batch, S history length, M session items, L code levels, K signals.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Optional

import numpy as np
import torch

from onerec.align.reward_eval import baseline_predictions, item_mean_signal, popularity_report, signal_report
from onerec.align.reward_model import SessionRewardModel
from onerec.align.reward_scorer import RewardScorer, model_kwargs
from onerec.align.reward_training import fit_reward_model, predict_signals, regression_targets, reward_train_config
from onerec.align.sessions import (
    CONSUMED_COLUMN,
    build_sessions,
    holdout_users,
    item_signal_values,
    with_popularity_negatives,
)
from onerec.checkpoint import save_weights
from onerec.config import RootConfig, to_dict
from onerec.data.prepared import load_prepared
from onerec.data.splits import in_training_period, training_item_counts
from onerec.distributed.deepspeed import init_distributed
from onerec.logging import RunLogger, write_json_atomic
from onerec.paths import RunPaths
from onerec.tokenizer.semantic_ids import SemanticIds
from onerec.train.trainer import AfterStepFn

log = logging.getLogger("onerec.reward")


def main(cfg: RootConfig, after_step: Optional[AfterStepFn] = None) -> dict:
    """after_step: called with each finished training step's number (tests inject faults with it)."""
    rcfg = cfg.reward
    if not rcfg.signals:
        raise ValueError("reward.signals is empty: list the feedback signals to learn (see configs/demo.yaml)")
    started = time.perf_counter()
    paths = RunPaths.of(cfg.run.out_dir)
    dist_info = init_distributed(cfg.run.device)
    device = dist_info.device
    torch.manual_seed(cfg.run.seed)  # every rank builds the same initial weights
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
    kwargs = model_kwargs(rcfg, num_items, list(semantic_ids.codebook_sizes), len(rcfg.signals), cfg.data.max_history)
    model = SessionRewardModel(**kwargs).to(device)
    scorer = RewardScorer(model, list(rcfg.signals), mean_K, std_K, semantic_ids.codes)
    targets = {
        "train": regression_targets(train, binary, mean_K, std_K),
        "heldout": regression_targets(heldout, binary, mean_K, std_K),
    }
    train_cfg = reward_train_config(rcfg, cfg.train, len(train), dist_info.world_size)
    config_dict = to_dict(cfg)
    run_logger = RunLogger(cfg.logging, paths.root, "reward", config_dict, rank=dist_info.rank)
    try:
        fit = fit_reward_model(
            scorer, train, heldout, targets, train_cfg, paths.reward, dist_info, run_logger, config_dict,
            cfg.run.seed, after_step,
        )
        report = _heldout_report(scorer, train, heldout, item_counts_N, num_items, rcfg)
        run_logger.summary({
            f"heldout/{name}/{metric}": value
            for name, values in report["model"].items() for metric, value in values.items()
        })
    finally:
        run_logger.close()
    if dist_info.is_main:
        _log_report(report, [s.name for s in rcfg.signals])
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
        "best_epoch": fit.best_epoch,
        "heldout_loss": fit.heldout_loss,
        # steps run, the best epoch's last step, sessions per step over all ranks (reward.batch_size)
        "training": {
            "steps": fit.steps, "best_step": fit.best_step, "stopped_early": fit.stopped_early,
            "ranks": dist_info.world_size, "global_batch": train_cfg.batch_size * dist_info.world_size,
        },
        "heldout": report,
        "wall_seconds": time.perf_counter() - started,
    }
    if dist_info.is_main:
        write_json_atomic(paths.reward / "reward.json", result)
        log.info("reward model written to %s", paths.reward)
    if dist_info.world_size > 1:  # the job ends when rank 0 has written the output
        torch.distributed.barrier()
    return result


def _heldout_report(scorer: RewardScorer, train, heldout, item_counts_N: np.ndarray, num_items: int, rcfg) -> dict:
    """Per signal, on the held-out sessions: the model (best weights), the item-mean baseline
    and (binary signals) popularity. Every rank computes it alike; rank 0 writes it."""
    names, kinds = [s.name for s in rcfg.signals], [s.kind for s in rcfg.signals]
    predictions = predict_signals(scorer, heldout, rcfg.batch_size)
    item_mean = item_mean_signal(train.items, train.item_values, num_items)
    return {
        "model": signal_report(predictions, heldout.labels, heldout.any_event, kinds, names),
        "baseline_item_mean": signal_report(
            baseline_predictions(heldout.items, item_mean), heldout.labels, heldout.any_event, kinds, names
        ),
        "baseline_popularity": popularity_report(heldout, item_counts_N, kinds, names),
    }


def _log_report(report: dict, names: list[str]) -> None:
    for name in names:
        ours, base = report["model"][name], report["baseline_item_mean"][name]
        if "auc" in ours:
            log.info(
                "held-out %s: AUC %.4f (item-mean baseline %.4f, popularity %.4f)",
                name, ours["auc"], base["auc"], report["baseline_popularity"][name]["auc"],
            )
        else:
            log.info("held-out %s: RMSE %.4f (item-mean baseline %.4f)", name, ours["rmse"], base["rmse"])
