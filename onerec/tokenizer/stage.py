"""Stage `tokenize`: item text -> embeddings -> balanced residual k-means -> dedup -> SemanticIds.

Reads <out>/data/items, writes <out>/semantic_ids/ (codes, per-level statistics, and the
embedding cache so a re-run with the same texts skips the encoder).
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets

from onerec.config import RootConfig
from onerec.distributed.deepspeed import resolve_device
from onerec.paths import RunPaths
from onerec.tokenizer.embed import embed_texts
from onerec.tokenizer.rq_kmeans import residual_kmeans
from onerec.tokenizer.semantic_ids import SemanticIds, add_dedup_level, codebook_stats

log = logging.getLogger("onerec.tokenizer")


def main(cfg: RootConfig) -> Path:
    paths = RunPaths.of(cfg.run.out_dir)
    tok = cfg.tokenizer
    items = datasets.load_from_disk(str(paths.require(paths.data, "data") / "items"))
    texts = list(items["text"])
    device = resolve_device(cfg.run.device)
    embeddings = embed_texts(
        texts, tok.encoder, tok.embed_batch_size, paths.semantic_ids / "cache" / "embeddings.safetensors", str(device)
    )
    log.info("embedded %d items with %s: dim %d", len(texts), tok.encoder, embeddings.shape[1])
    codes_NL, _ = residual_kmeans(embeddings, tok.levels, tok.codebook_size, tok.kmeans_iters, cfg.run.seed, device)
    sizes = [tok.codebook_size] * tok.levels
    stats = codebook_stats(codes_NL, sizes)
    for level, values in enumerate(stats["per_level"]):
        log.info(
            "level %d: utilization %.3f, entropy %.2f bits (max %.2f)",
            level, values["utilization"], values["entropy"], stats["max_entropy_bits"][level],
        )
    log.info("collision rate before dedup: %.4f", stats["collision_rate_before_dedup"])
    if tok.dedup:
        codes_NL, dedup_size = add_dedup_level(codes_NL)
        sizes = sizes + [dedup_size]
        log.info("dedup level: %d codes", dedup_size)
    elif stats["collision_rate_before_dedup"] > 0:
        raise ValueError(
            f"{stats['collision_rate_before_dedup']:.2%} of items share a code tuple with another item; "
            "set tokenizer.dedup=true or use more levels / a larger codebook"
        )
    semantic_ids = SemanticIds(codes_NL, sizes, tok.levels, stats)
    semantic_ids.save(paths.semantic_ids)
    return paths.semantic_ids
