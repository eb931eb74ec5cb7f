"""`onerec tokenize`: item text (or, with tokenizer.encoder=features, the items' numeric
feature vectors) -> embeddings (+ collaborative vectors from the training sequences, when
tokenizer.collaborative_weight > 0: co-occurrence PPMI-SVD, or the SASRec baseline's item
embeddings) -> quantiser -> dedup -> SemanticIds.

The quantiser is `tokenizer.method`: balanced residual k-means (OneRec) or an RQ-VAE (TIGER).

Reads <out>/data/items (HF dataset: item_index 0..N-1 in order, raw_id, title, text), with
a collaborative_source that names sasrec also <out>/baselines/sasrec/model.safetensors, and
writes <out>/semantic_ids/ atomically: codes, per-level statistics, and the embedding
cache (cache/embeddings.safetensors) so a re-run with the same texts skips the encoder.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from onerec.baselines.sasrec import WEIGHTS_FILE, load_item_vectors
from onerec.config import RootConfig, to_dict
from onerec.data.prepared import load_prepared
from onerec.data.splits import training_item_counts
from onerec.distributed.deepspeed import resolve_device
from onerec.logging import RunLogger, codebook_scalars
from onerec.paths import RunPaths
from onerec.tokenizer.embed import embed_texts
from onerec.tokenizer.item_vectors import (
    FEATURES_ENCODER,
    blend_collaborative,
    read_item_features,
    read_item_texts,
    suggest_codebook_size,
)
from onerec.tokenizer.rq_kmeans import residual_kmeans
from onerec.tokenizer.rq_vae import train_rq_vae
from onerec.tokenizer.semantic_ids import CACHE_DIR, SemanticIds, add_dedup_level, codebook_stats

log = logging.getLogger("onerec.tokenizer")


def main(cfg: RootConfig) -> Path:
    paths = RunPaths.of(cfg.run.out_dir)
    tok = cfg.tokenizer
    items_dir = paths.require(paths.data, "data") / "items"
    texts = read_item_texts(items_dir)
    if len(texts) < tok.codebook_size:
        # Balanced k-means needs at least one item per code (OneRec: |V| / K items per cluster).
        raise ValueError(
            f"the catalogue has {len(texts)} items, fewer than tokenizer.codebook_size={tok.codebook_size}: "
            f"set tokenizer.codebook_size to at most {len(texts)} (e.g. tokenizer.codebook_size={suggest_codebook_size(len(texts))})"
        )
    device = resolve_device(cfg.run.device)
    started = time.perf_counter()
    cache_path = paths.semantic_ids / CACHE_DIR / "embeddings.safetensors"
    if tok.encoder == FEATURES_ENCODER:
        embeddings_ND = read_item_features(items_dir)
    else:
        embeddings_ND = embed_texts(texts, tok.encoder, tok.embed_batch_size, cache_path, str(device))
    log.info("embedded %d items with %s: dim %d", len(texts), tok.encoder, embeddings_ND.shape[1])
    # The user sequences, read once, for whatever below learns from training use.
    uses_sequences = "cooccurrence" in tok.collaborative_sources or (tok.dedup and tok.dedup_order == "popularity")
    sequences = load_prepared(paths.data).sequences if uses_sequences else None
    if tok.collaborative_sources:
        sasrec_NC = load_item_vectors(paths.sasrec / WEIGHTS_FILE, len(texts)) if tok.needs_sasrec else None
        embeddings_ND = blend_collaborative(embeddings_ND, cfg, sequences, sasrec_NC)

    if tok.method == "rq_vae":
        codes_NL, training = train_rq_vae(embeddings_ND, tok.levels, tok.codebook_size, tok.rq_vae, cfg.run.seed, device)
    else:
        codes_NL, _ = residual_kmeans(
            embeddings_ND, tok.levels, tok.codebook_size, tok.kmeans_iters, cfg.run.seed, device
        )
        training = {}
    sizes = [tok.codebook_size] * tok.levels
    stats = codebook_stats(codes_NL, sizes)
    stats["method"] = tok.method
    if training:
        stats["training"] = training
    for level, values in enumerate(stats["per_level"]):
        log.info(
            "level %d: utilization %.3f, entropy %.2f bits (max %.2f), perplexity %.1f",
            level, values["utilization"], values["entropy"], stats["max_entropy_bits"][level], values["perplexity"],
        )
    log.info(
        "collision rate before dedup: %.4f (%d unique tuples for %d items, at most %d items per tuple)",
        stats["collision_rate_before_dedup"], stats["unique_tuples"], len(texts), stats["max_items_per_tuple"],
    )
    if tok.dedup:
        priority_N = None
        if tok.dedup_order == "popularity":
            # Training parts only: neither held-out target may shape the codes.
            priority_N = training_item_counts(sequences, cfg.data, len(texts))
        codes_NL, dedup_size = add_dedup_level(codes_NL, priority_N)
        sizes = sizes + [dedup_size]
        log.info("dedup level: %d codes, in %s order", dedup_size, tok.dedup_order)
    elif stats["collision_rate_before_dedup"] > 0:
        raise ValueError(
            f"{stats['collision_rate_before_dedup']:.2%} of items share a code tuple with another item, so the "
            "model could not tell them apart: set tokenizer.dedup=true, or raise tokenizer.levels / codebook_size"
        )
    SemanticIds(codes_NL, sizes, tok.levels, stats).save(paths.semantic_ids)
    # Codebook utilisation to metrics.jsonl and W&B (rank 0 only, like every stage's metrics).
    run_logger = RunLogger(cfg.logging, paths.root, "tokenize", to_dict(cfg), rank=int(os.environ.get("RANK", "0")))
    try:
        run_logger.log(codebook_scalars(stats), step=0)
    finally:
        run_logger.close()
    log.info("semantic IDs %s written to %s in %.1fs", sizes, paths.semantic_ids, time.perf_counter() - started)
    return paths.semantic_ids

