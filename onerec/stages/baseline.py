"""`onerec baseline`: SASRec trained and evaluated on the run's own data and split.

It reads <out>/data (the `data` stage), trains on every user's training part, selects the
epoch by validation NDCG@10 (early stopping), then scores the test split once with the
best weights. Ranking is over the full catalogue, like the generative model's beam search,
with nothing masked (history items may be recommended, as in the generative decode).
Writes <out>/baselines/sasrec/{model.safetensors, metrics.json}; tokenize reads the item
embeddings back when tokenizer.collaborative_source names sasrec.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
from tqdm.auto import tqdm

from onerec.baselines.sasrec import WEIGHTS_FILE, SASRec, evaluate_sasrec, sequence_loss, training_sequences
from onerec.checkpoint import save_weights
from onerec.config import RootConfig, to_dict
from onerec.data.prepared import load_prepared
from onerec.data.splits import make_splits, training_lengths
from onerec.device import resolve_device
from onerec.logging import RunLogger, progress_disabled, write_json_atomic
from onerec.paths import RunPaths

log = logging.getLogger("onerec.baseline")


def main(cfg: RootConfig) -> dict:
    started = time.perf_counter()
    paths = RunPaths.of(cfg.run.out_dir)
    device = resolve_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    prepared = load_prepared(paths.require(paths.data, "data"))
    seqs = prepared.sequences
    splits = make_splits(seqs, cfg.data)
    num_items = len(prepared.items)
    sc = cfg.sasrec
    ks = list(cfg.eval.ks)

    rows = training_sequences(seqs.offsets, seqs.items, training_lengths(seqs, cfg.data), cfg.data.max_history)
    rows_UT = torch.as_tensor(rows, device=device)
    model = SASRec(sc, num_items, cfg.data.max_history).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=sc.lr, weight_decay=sc.weight_decay)
    log.info(
        "SASRec: %d training sequences, %d items, %.2fM parameters",
        len(rows),
        num_items,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    valid = splits["valid"]
    generator = torch.Generator().manual_seed(cfg.run.seed)
    run_logger = RunLogger(cfg.logging, paths.root, "sasrec", to_dict(cfg))
    best = {"epoch": 0, "ndcg@10": -1.0, "state": None, "valid": {}}
    epochs_run = 0
    try:
        bar = tqdm(range(1, sc.max_epochs + 1), desc="sasrec", disable=progress_disabled(), dynamic_ncols=True)
        for epoch in bar:
            model.train()
            order = torch.randperm(len(rows), generator=generator)
            total, batches = 0.0, 0
            for start in range(0, len(order), sc.batch_size):
                loss = sequence_loss(model, rows_UT[order[start : start + sc.batch_size].to(device)])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, batches = total + loss.item(), batches + 1
            metrics = evaluate_sasrec(model, valid.history, valid.target[:, 0], ks, 1024, device, cfg.eval.exclude_history)
            epochs_run = epoch
            run_logger.log({"loss": total / batches, **{f"valid/{k}": v for k, v in metrics.items()}}, epoch)
            bar.set_postfix(loss=f"{total / batches:.3f}", ndcg10=f"{metrics.get('ndcg@10', 0.0):.4f}")
            if metrics["ndcg@10"] > best["ndcg@10"]:
                best = {"epoch": epoch, "ndcg@10": metrics["ndcg@10"], "state": copy.deepcopy(model.state_dict()), "valid": metrics}
            elif sc.patience and epoch - best["epoch"] >= sc.patience:
                log.info("early stop at epoch %d: best validation NDCG@10 %.4f at epoch %d", epoch, best["ndcg@10"], best["epoch"])
                break
    finally:
        run_logger.close()

    model.load_state_dict(best["state"])
    test = splits["test"]
    test_metrics = evaluate_sasrec(model, test.history, test.target[:, 0], ks, 1024, device, cfg.eval.exclude_history)
    out_dir = paths.sasrec
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, out_dir / WEIGHTS_FILE)
    result = {
        "valid": best["valid"],
        "test": test_metrics,
        "best_epoch": best["epoch"],
        "epochs_run": epochs_run,
        "config": to_dict(sc),
        "device": str(device),
        "wall_seconds": time.perf_counter() - started,
    }
    write_json_atomic(out_dir / "metrics.json", result)
    log.info("SASRec best epoch %d; valid %s; test %s", best["epoch"], _fmt(best["valid"]), _fmt(test_metrics))
    return result


def _fmt(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items())
