"""`onerec evaluate`: validation and test Recall/NDCG@K of the exported model, beside a
popularity baseline computed in the same run, written to <out>/metrics.json.

With align.enabled the evaluated model is the aligned one (<out>/dpo/export); the pretrained
model's numbers are kept under "pretrain_model" and the alignment report under "alignment".

Full-catalogue ranking: the model's top-K comes from trie-constrained beam search over
every item (its beams reranked by the item head when eval.item_score_weight > 0); the
popularity baseline ranks every item by its training count.

With W&B on, the stage's W&B run (job type "evaluate") gets metrics.json as its summary (flat
keys: test/recall@10, baselines/popularity/test/ndcg@10, ...) and as the table
`evaluate/metrics` (one row per split and model, the report's table).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from onerec.config import BASELINE_MODELS, RootConfig, to_dict
from onerec.data.prepared import load_prepared
from onerec.data.splits import make_splits, training_item_counts
from onerec.device import resolve_device
from onerec.export import load_export
from onerec.inference.evaluate import evaluate_examples, evaluate_popularity
from onerec.logging import RunLogger, flat_scalars, write_json_atomic
from onerec.paths import RunPaths
from onerec.report.tables import metrics_table

log = logging.getLogger("onerec.evaluate")


def main(cfg: RootConfig) -> dict:
    paths = RunPaths.of(cfg.run.out_dir)
    run_logger = RunLogger(cfg.logging, paths.root, "evaluate", to_dict(cfg))
    try:
        metrics = _evaluate(cfg)
        log_metrics(run_logger, with_baselines(metrics, paths.baselines))
    finally:
        run_logger.close()
    return metrics


def with_baselines(metrics: dict, baselines_dir: Path) -> dict:
    """metrics with the valid/test numbers of every next-item baseline that ran in this run
    directory (<baselines_dir>/<model>/metrics.json, in config.BASELINE_MODELS order) beside the
    popularity baseline: for the W&B summary and table only (metrics.json stays what this
    stage computed, so its freshness depends on its own inputs)."""
    found = {}
    for name in BASELINE_MODELS:
        path = baselines_dir / name / "metrics.json"
        if path.is_file():
            result = json.loads(path.read_text())
            found[name] = {split: result[split] for split in ("valid", "test") if split in result}
    if not found:
        return metrics
    return {**metrics, "baselines": {**metrics.get("baselines", {}), **found}}


def log_metrics(run_logger: RunLogger, metrics: dict) -> None:
    """metrics.json to W&B: every number as the run's summary, and the table of the models
    beside the baselines (nothing is sent without W&B)."""
    run_logger.summary(flat_scalars(metrics))
    run_logger.log_table("metrics", *metrics_table(metrics))


def _evaluate(cfg: RootConfig) -> dict:
    started = time.perf_counter()
    paths = RunPaths.of(cfg.run.out_dir)
    device = resolve_device(cfg.run.device)
    aligned = cfg.align.enabled
    exported = load_export(paths.require(paths.dpo_export, "dpo") if aligned else paths.require(paths.export, "pretrain"), device)
    prepared = load_prepared(paths.require(paths.data, "data"))
    splits = make_splits(prepared.sequences, cfg.data)
    codes_NL = exported.semantic_ids.codes.to(device)
    use_user_token = exported.cfg.model.user_buckets > 0
    counts_N = training_item_counts(prepared.sequences, cfg.data, len(exported.raw_ids))

    metrics: dict = {"baselines": {"popularity": {}}, "model": "dpo/export" if aligned else "pretrain/export"}
    pretrained = load_export(paths.export, device) if aligned else None
    for split in ("valid", "test"):
        examples = splits[split]
        if pretrained is not None:
            metrics.setdefault("pretrain_model", {})[split] = evaluate_examples(
                pretrained.model, examples.history, examples.target[:, 0], examples.user if use_user_token else None,
                codes_NL, pretrained.trie, beam_width=cfg.eval.beam_width, ks=list(cfg.eval.ks),
                batch_size=cfg.eval.batch_size, device=device, desc=f"{split} (pretrained)",
                exclude_history=cfg.eval.exclude_history, item_score_weight=cfg.eval.item_score_weight,
            )
            log.info("%s pretrained model: %s", split, _fmt(metrics["pretrain_model"][split]))
        metrics[split] = evaluate_examples(
            exported.model,
            examples.history,
            examples.target[:, 0],
            examples.user if use_user_token else None,
            codes_NL,
            exported.trie,
            beam_width=cfg.eval.beam_width,
            ks=list(cfg.eval.ks),
            batch_size=cfg.eval.batch_size,
            device=device,
            desc=split,
            exclude_history=cfg.eval.exclude_history,
            item_score_weight=cfg.eval.item_score_weight,
        )
        metrics["baselines"]["popularity"][split] = evaluate_popularity(
            torch.as_tensor(counts_N), torch.as_tensor(examples.target[:, 0]), list(cfg.eval.ks)
        )
        log.info("%s: %s", split, _fmt(metrics[split]))
        log.info("%s popularity: %s", split, _fmt(metrics["baselines"]["popularity"][split]))

    meta = prepared.meta
    sid = exported.semantic_ids
    metrics["data"] = {"users": meta["users"], "items": meta["items"], "interactions": meta["interactions"]}
    metrics["semantic_ids"] = {
        "levels": len(sid.codebook_sizes),
        "semantic_levels": sid.semantic_levels,
        "codebook_size": cfg.tokenizer.codebook_size,
        "codebook_sizes": list(sid.codebook_sizes),
        "collision_rate_before_dedup": sid.stats["collision_rate_before_dedup"],
    }
    if aligned:
        metrics["alignment"] = json.loads((paths.dpo / "alignment.json").read_text(encoding="utf-8"))
    metrics["wall_seconds"] = time.perf_counter() - started
    write_json_atomic(paths.metrics, metrics)
    log.info("wrote %s", paths.metrics)
    return metrics


def _fmt(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items())

