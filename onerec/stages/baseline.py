"""`onerec baseline`: next-item baselines trained and evaluated on the run's own data and split.

It trains every enabled baseline model (config.BASELINE_MODELS, in order): `sasrec` (on by
default), `sasrec_pp`, SASRec++ (off by default: `sasrec_pp.enabled=true`) and `hstu`, HSTU
(off by default: `hstu.enabled=true`; onerec.baselines.hstu). Each reads
<out>/data (the `data` stage), trains on every user's training part, selects the epoch by
validation NDCG@10 (early stopping), then scores the test split once with the best weights.
Ranking is over the full catalogue, like the generative model's beam search, with nothing
masked unless eval.exclude_history (the same rule as the beam search).

A model whose `max_len` is set reads histories of that length, built from the same split
(the same validation and test users and targets as the harness, longer histories); with
`crop_prob` / `shuffle_prob` its training rows are augmented afresh every epoch
(onerec.baselines.sasrec.augmented_sequences). HSTU also reads each item's time where the log
has timestamps: training rows are drawn as positions into the log, so items and their times
always stay aligned.

Writes <out>/baselines/<model>/{model.safetensors, metrics.json}; tokenize reads the item
embeddings of `sasrec` (never of `sasrec_pp`) when tokenizer.collaborative_source names sasrec.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from onerec.baselines.hstu import HSTU
from onerec.baselines.sasrec import (
    WEIGHTS_FILE,
    NextItemRanker,
    SASRec,
    augmented_sequences,
    evaluate_next_item,
    sequence_loss,
    training_sequences,
)
from onerec.checkpoint import save_weights
from onerec.config import BASELINE_MODELS, ConfigError, RootConfig, SASRecConfig, to_dict
from onerec.data.prepared import load_prepared
from onerec.data.splits import Examples, UserSequences, history_rows, make_splits, training_lengths
from onerec.device import resolve_device
from onerec.logging import RunLogger, progress_disabled, write_json_atomic
from onerec.paths import RunPaths

log = logging.getLogger("onerec.baseline")

LABELS = {"sasrec": "SASRec", "sasrec_pp": "SASRec++", "hstu": "HSTU"}
MODEL_CLASSES = {"sasrec": SASRec, "sasrec_pp": SASRec, "hstu": HSTU}


def main(cfg: RootConfig) -> dict[str, dict]:
    """Train every enabled baseline model; {model: what its metrics.json holds}."""
    models = cfg.enabled_baselines
    if not models:
        raise ConfigError(
            f"`onerec baseline` has nothing to train: enable one of {', '.join(f'{m}.enabled' for m in BASELINE_MODELS)}"
        )
    paths = RunPaths.of(cfg.run.out_dir)
    device = resolve_device(cfg.run.device)
    prepared = load_prepared(paths.require(paths.data, "data"))
    num_items = len(prepared.items)
    return {name: train_baseline(cfg, name, prepared.sequences, num_items, device) for name in models}


def history_length(cfg: RootConfig, sc: SASRecConfig) -> int:
    """The history length a baseline reads: its own max_len, else data.max_history."""
    return sc.max_len or cfg.data.max_history


def rows_at(positions_UW: np.ndarray, values_I: np.ndarray) -> np.ndarray:
    """values at the log positions of rows [U, W] (-1 = padding, kept as -1), int64."""
    return np.where(positions_UW >= 0, values_I[np.maximum(positions_UW, 0)], -1).astype(np.int64)


def history_times(seqs: UserSequences, examples: Examples) -> np.ndarray:
    """[N, S] the times of each example's history items, aligned with examples.history."""
    user, end, _ = examples.locate(np.arange(len(examples)))
    return history_rows(seqs.offsets, seqs.orders, user, end, examples.max_history)


def train_baseline(cfg: RootConfig, name: str, seqs: UserSequences, num_items: int, device) -> dict:
    """Train, select and test the baseline model of config section `name`; writes its folder."""
    started = time.perf_counter()
    sc: SASRecConfig = getattr(cfg, name)
    label = LABELS.get(name, name)
    paths = RunPaths.of(cfg.run.out_dir)
    torch.manual_seed(cfg.run.seed)  # each model starts from the same seed, whichever ran before it
    max_len = history_length(cfg, sc)
    data_cfg = cfg.data if max_len == cfg.data.max_history else dataclasses.replace(cfg.data, max_history=max_len)
    splits = make_splits(seqs, data_cfg)
    ks = list(cfg.eval.ks)

    train_len = training_lengths(seqs, data_cfg)
    model: NextItemRanker = MODEL_CLASSES[name](sc, num_items, max_len).to(device)
    uses_time = model.uses_time and seqs.has_time
    if model.uses_time and not seqs.has_time:
        log.info("%s: this log has an order, not timestamps: no time bias", label)
    # Rows are drawn as positions into the log (seqs.items / seqs.orders), then read as items
    # (and times): a crop or shuffle moves an item and its time together.
    log_positions_I = np.arange(len(seqs.items))

    def training_rows(positions_UW: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        items_UW = torch.as_tensor(rows_at(positions_UW, seqs.items), device=device)
        return items_UW, torch.as_tensor(rows_at(positions_UW, seqs.orders), device=device) if uses_time else None

    rows_UT, times_UT = training_rows(training_sequences(seqs.offsets, log_positions_I, train_len, max_len))
    optimizer = torch.optim.AdamW(model.parameters(), lr=sc.lr, weight_decay=sc.weight_decay)
    log.info(
        "%s: %d training sequences, %d items, history %d, %.2fM parameters%s",
        label,
        len(rows_UT),
        num_items,
        max_len,
        sum(p.numel() for p in model.parameters()) / 1e6,
        f", crop {sc.crop_prob:g} x {sc.crop_ratio:g}, shuffle {sc.shuffle_prob:g} x {sc.shuffle_ratio:g}"
        if sc.augments else "",
    )
    valid, test = splits["valid"], splits["test"]
    valid_times, test_times = (history_times(seqs, valid), history_times(seqs, test)) if uses_time else (None, None)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    # A generator of its own: the augmentation draws leave the batch order and dropout streams alone.
    augment_rng = np.random.default_rng(cfg.run.seed)
    run_logger = RunLogger(cfg.logging, paths.root, name, to_dict(cfg))
    best = {"epoch": 0, "ndcg@10": -1.0, "state": None, "valid": {}}
    epochs_run, augment_seconds = 0, 0.0
    try:
        bar = tqdm(range(1, sc.max_epochs + 1), desc=name, disable=progress_disabled(), dynamic_ncols=True)
        for epoch in bar:
            model.train()
            if sc.augments:
                drawn = time.perf_counter()
                rows_UT, times_UT = training_rows(
                    augmented_sequences(seqs.offsets, log_positions_I, train_len, max_len, augment_rng,
                                        sc.crop_prob, sc.crop_ratio, sc.shuffle_prob, sc.shuffle_ratio)
                )
                augment_seconds += time.perf_counter() - drawn
            order = torch.randperm(len(rows_UT), generator=generator)
            total, batches = 0.0, 0
            for start in range(0, len(order), sc.batch_size):
                batch = order[start : start + sc.batch_size].to(device)
                loss = sequence_loss(model, rows_UT[batch], None if times_UT is None else times_UT[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, batches = total + loss.item(), batches + 1
            metrics = evaluate_next_item(model, valid.history, valid.target[:, 0], ks, 1024, device,
                                         cfg.eval.exclude_history, valid_times)
            epochs_run = epoch
            run_logger.log({"loss": total / batches, **{f"valid/{k}": v for k, v in metrics.items()}}, epoch)
            bar.set_postfix(loss=f"{total / batches:.3f}", ndcg10=f"{metrics.get('ndcg@10', 0.0):.4f}")
            if metrics["ndcg@10"] > best["ndcg@10"]:
                best = {"epoch": epoch, "ndcg@10": metrics["ndcg@10"], "state": copy.deepcopy(model.state_dict()), "valid": metrics}
            elif sc.patience and epoch - best["epoch"] >= sc.patience:
                log.info("%s: early stop at epoch %d: best validation NDCG@10 %.4f at epoch %d",
                         label, epoch, best["ndcg@10"], best["epoch"])
                break
    finally:
        run_logger.close()

    model.load_state_dict(best["state"])
    test_metrics = evaluate_next_item(model, test.history, test.target[:, 0], ks, 1024, device,
                                      cfg.eval.exclude_history, test_times)
    out_dir = paths.baselines / name
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, out_dir / WEIGHTS_FILE)
    result = {
        "model": name,
        "valid": best["valid"],
        "test": test_metrics,
        "best_epoch": best["epoch"],
        "epochs_run": epochs_run,
        "history_len": max_len,
        "uses_time": uses_time,
        "config": to_dict(sc),
        "seed": cfg.run.seed,
        "device": str(device),
        "augment_seconds": augment_seconds,
        "wall_seconds": time.perf_counter() - started,
    }
    write_json_atomic(out_dir / "metrics.json", result)
    log.info("%s best epoch %d; valid %s; test %s", label, best["epoch"], _fmt(best["valid"]), _fmt(test_metrics))
    return result


def _fmt(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items())
