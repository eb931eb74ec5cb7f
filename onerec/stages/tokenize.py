"""`onerec tokenize`: item text (or, with tokenizer.encoder=features, the items' numeric
feature vectors) -> embeddings (+ collaborative vectors from the training sequences, when
tokenizer.collaborative_weight > 0: co-occurrence PPMI-SVD, or the SASRec baseline's item
embeddings) -> quantiser -> dedup -> SemanticIds.

The quantiser is `tokenizer.method`: balanced residual k-means (OneRec) or an RQ-VAE (TIGER).

Reads <out>/data/items (HF dataset: item_index 0..N-1 in order, raw_id, title, text), with
a collaborative_source that names sasrec also <out>/baselines/sasrec/model.safetensors, and
writes <out>/semantic_ids/ atomically: codes, per-level statistics, and the embedding
cache (cache/embeddings.safetensors) so a re-run with the same texts skips the encoder.

Sharded over the ranks of a launcher (WORLD_SIZE > 1: launch/torchrun.sh, launch/pipeline.sh;
gloo on CPU, nccl on GPU, joined as pretrain joins it). Shape legend: N items, n this rank's
items, D vector dim, C collaborative dim, L code levels, W ranks.

    rank r:  items [start_r, stop_r)  (contiguous, in rank order; whole embedding batches when
             every rank gets one, so a sentence encoder sees exactly the batches one process
             gives it)
             -> its own texts only -> embeddings [n, D], cached per rank
                (cache/embeddings.rank<r>-of-<W>.safetensors: no file has two writers)
             (+ its rows of the collaborative matrix [N, C], which needs every user's sequence:
                rank 0 computes it, as one process does, and sends it to all)
             -> balanced residual k-means with group=: each rank assigns its own rows, sums
                and counts are all-reduced (onerec/tokenizer/rq_kmeans.py)
             -> codes gathered to every rank [N, L]: all check collisions alike
    rank 0:  dedup, writes semantic_ids/, metrics, provenance; the others wait at a barrier.

Same codes as one process. Where a single process seeds k-means exactly (N * K <=
rq_kmeans.EXACT_SEEDING_MAX: every shipped data set), a sharded k-means would seed from a
sample instead and give other (equally balanced) codes, so such a catalogue is quantised by
rank 0 from the gathered vectors, exactly as one process does; only the embedding is
sharded (at those sizes the rows fit on one rank, and the encoder is the costly part).
Above it both seed from the same sample and the sharded k-means equals the single-process
one up to the rounding of all-reduced sums (tests/distributed/test_rq_kmeans_sharded.py). An
RQ-VAE trains on all vectors at once: they are gathered to rank 0, which trains it alone.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from onerec.baselines.sasrec import WEIGHTS_FILE, load_item_vectors
from onerec.config import RootConfig, TokenizerConfig, to_dict
from onerec.data.prepared import load_prepared
from onerec.data.splits import training_item_counts
from onerec.device import resolve_device
from onerec.distributed.deepspeed import init_distributed
from onerec.logging import RunLogger, codebook_scalars
from onerec.paths import RunPaths
from onerec.tokenizer import rq_kmeans
from onerec.tokenizer.collaborative import blend
from onerec.tokenizer.embed import embed_texts
from onerec.tokenizer.item_vectors import (
    FEATURES_ENCODER,
    collaborative_matrix,
    count_items,
    read_item_features,
    read_item_texts,
    suggest_codebook_size,
)
from onerec.tokenizer.rq_kmeans import residual_kmeans
from onerec.tokenizer.rq_vae import train_rq_vae
from onerec.tokenizer.semantic_ids import CACHE_DIR, SemanticIds, add_dedup_level, codebook_stats

log = logging.getLogger("onerec.tokenizer")

# A rank that is done with its share waits for the others (a rank whose embeddings were
# cached beside ranks that encode, the other ranks while rank 0 computes the collaborative
# vectors or trains an RQ-VAE, writes the output). Those waits and the stage's own exchanges
# go through a gloo group with this timeout: the launcher's group keeps DeepSpeed's
# (DEEPSPEED_TIMEOUT, 10 minutes), meant for a training step, and a failed rank still ends
# the job at once (torchrun stops every worker when one fails).
WAIT_TIMEOUT = dt.timedelta(hours=24)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks sharing the stage (one rank: no process group)."""

    rank: int
    world: int
    device: torch.device
    group: Optional[dist.ProcessGroup] = None  # the launcher's (gloo/nccl): the sharded k-means
    wait_group: Optional[dist.ProcessGroup] = None  # gloo, WAIT_TIMEOUT: CPU tensors, barriers

    @property
    def sharded(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join_ranks(requested_device: str) -> Ranks:
    """One process: no process group (as before sharding). Under a launcher (WORLD_SIZE > 1, or
    a driver that initialised a larger group): the launcher's group, joined as pretrain joins
    it (gloo on CPU, nccl on GPU), and a gloo group for waiting."""
    initialised = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialised else int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(0, 1, resolve_device(requested_device))
    info = init_distributed(requested_device)
    wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)  # every rank calls it, in order
    return Ranks(info.rank, info.world_size, info.device, dist.group.WORLD, wait_group)


def item_bounds(num_items: int, world: int, batch_size: int) -> list[int]:
    """[W + 1] row bounds: rank r holds items [bounds[r], bounds[r + 1]), contiguous, in rank order.

    Whole embedding batches of batch_size when every rank gets at least one, so the encoder
    sees the batches one process would give it (a sentence model's vectors can depend, by
    rounding, on the batch an item is encoded in); otherwise an even split of the items.
    """
    unit = batch_size if num_items >= world * batch_size else 1
    units = -(-num_items // unit)
    return [min(num_items, (r * units // world) * unit) for r in range(world + 1)]


def _padded(local_nX: torch.Tensor, rows: int) -> torch.Tensor:
    out = local_nX.new_zeros((rows, *local_nX.shape[1:]))
    out[: local_nX.shape[0]] = local_nX
    return out


def gather_rows(ranks: Ranks, local_nX: torch.Tensor, bounds: list[int], everyone: bool) -> Optional[torch.Tensor]:
    """Every rank's rows [N, ...] in item order: on every rank (everyone) or on rank 0 only
    (None elsewhere). Ranks hold different counts; each pads to the largest, cut off again."""
    sizes = [stop - start for start, stop in zip(bounds[:-1], bounds[1:])]
    padded = _padded(local_nX.cpu().contiguous(), max(sizes))
    if everyone:
        parts = [torch.empty_like(padded) for _ in range(ranks.world)]
        dist.all_gather(parts, padded, group=ranks.wait_group)
    else:
        parts = [torch.empty_like(padded) for _ in range(ranks.world)] if ranks.is_main else None
        dist.gather(padded, parts, dst=0, group=ranks.wait_group)
        if not ranks.is_main:
            return None
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def broadcast_from_main(ranks: Ranks, tensor: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Rank 0's 2-D `tensor` on every rank (the others pass None and learn its shape first)."""
    shape_2 = torch.tensor(tensor.shape if ranks.is_main else (0, 0), dtype=torch.long)
    dist.broadcast(shape_2, src=0, group=ranks.wait_group)
    out = tensor.to(dtype).cpu().contiguous() if ranks.is_main else torch.empty(*shape_2.tolist(), dtype=dtype)
    dist.broadcast(out, src=0, group=ranks.wait_group)
    return out


def quantises_whole_catalogue(tok: TokenizerConfig, num_items: int) -> bool:
    """Whether a sharded run gathers the vectors and quantises them on rank 0 alone: an RQ-VAE,
    and k-means small enough that one process seeds it exactly (see the module docstring).
    Read at call time, so a test can lower EXACT_SEEDING_MAX to take the sharded k-means."""
    return tok.method == "rq_vae" or num_items * tok.codebook_size <= rq_kmeans.EXACT_SEEDING_MAX


def _quantise(embeddings_ND: torch.Tensor, cfg: RootConfig, device: torch.device) -> tuple[torch.Tensor, dict]:
    """(codes_NL, RQ-VAE training record or {}) of every item, in this process."""
    tok = cfg.tokenizer
    if tok.method == "rq_vae":
        return train_rq_vae(embeddings_ND, tok.levels, tok.codebook_size, tok.rq_vae, cfg.run.seed, device)
    codes_NL, _ = residual_kmeans(embeddings_ND, tok.levels, tok.codebook_size, tok.kmeans_iters, cfg.run.seed, device)
    return codes_NL, {}


def main(cfg: RootConfig) -> Path:
    paths = RunPaths.of(cfg.run.out_dir)
    tok = cfg.tokenizer
    items_dir = paths.require(paths.data, "data") / "items"
    num_items = count_items(items_dir)
    if num_items < tok.codebook_size:
        # Balanced k-means needs at least one item per code (OneRec: |V| / K items per cluster).
        raise ValueError(
            f"the catalogue has {num_items} items, fewer than tokenizer.codebook_size={tok.codebook_size}: "
            f"set tokenizer.codebook_size to at most {num_items} (e.g. tokenizer.codebook_size={suggest_codebook_size(num_items)})"
        )
    ranks = join_ranks(cfg.run.device)
    device = ranks.device
    if num_items < ranks.world:
        raise ValueError(f"the catalogue has {num_items} items, fewer than the {ranks.world} ranks sharing them: "
                         "run `onerec tokenize` on fewer processes")
    bounds = item_bounds(num_items, ranks.world, tok.embed_batch_size)
    start, stop = bounds[ranks.rank], bounds[ranks.rank + 1]
    rows = range(start, stop) if ranks.sharded else None
    started = time.perf_counter()
    if ranks.sharded:  # one cache file per rank: no two ranks ever write the same file
        cache_path = paths.semantic_ids / CACHE_DIR / f"embeddings.rank{ranks.rank:05d}-of-{ranks.world:05d}.safetensors"
    else:
        cache_path = paths.semantic_ids / CACHE_DIR / "embeddings.safetensors"
    if tok.encoder == FEATURES_ENCODER:
        embeddings_nD = read_item_features(items_dir, rows)
    else:
        embeddings_nD = embed_texts(read_item_texts(items_dir, rows), tok.encoder, tok.embed_batch_size, cache_path, str(device))
    log.info("embedded %d items%s with %s: dim %d", stop - start,
             f" ({start}..{stop - 1}, rank {ranks.rank} of {ranks.world})" if ranks.sharded else "",
             tok.encoder, embeddings_nD.shape[1])
    # The user sequences, read once, for whatever below learns from training use (on rank 0
    # only when sharded: the collaborative vectors and the dedup order are made there).
    uses_sequences = "cooccurrence" in tok.collaborative_sources or (tok.dedup and tok.dedup_order == "popularity")
    sequences = load_prepared(paths.data).sequences if uses_sequences and ranks.is_main else None
    if tok.collaborative_sources:
        # Learnt from every user's sequence at once (an SVD over all items, or SASRec's whole
        # table): not sharded. Rank 0 computes the [N, C] matrix as one process does and sends
        # it to the others, which blend in their rows (blend is row by row).
        collaborative_NC = None
        if ranks.is_main:
            sasrec_NC = load_item_vectors(paths.sasrec / WEIGHTS_FILE, num_items) if tok.needs_sasrec else None
            collaborative_NC = collaborative_matrix(cfg, sequences, num_items, sasrec_NC)
        if ranks.sharded:
            collaborative_NC = broadcast_from_main(ranks, collaborative_NC, torch.float32)
        log.info("collaborative weight %.2f (%s)", tok.collaborative_weight, tok.collaborative_source)
        embeddings_nD = blend(embeddings_nD, collaborative_NC[start:stop], tok.collaborative_weight)

    if not ranks.sharded:
        codes_NL, training = _quantise(embeddings_nD, cfg, device)
    elif quantises_whole_catalogue(tok, num_items):
        log.info("%s: the %d ranks' vectors are gathered, rank 0 quantises them as one process does",
                 "rq_vae" if tok.method == "rq_vae" else "exact k-means++ seeding", ranks.world)
        embeddings_ND = gather_rows(ranks, embeddings_nD, bounds, everyone=False)
        codes_NL, training = _quantise(embeddings_ND, cfg, device) if ranks.is_main else (None, {})
        del embeddings_ND
        codes_NL = broadcast_from_main(ranks, codes_NL, torch.int64)
    else:
        # Every rank is done embedding before any enters the launcher's group (its timeout is
        # meant for training steps, not for waiting on another rank's encoder).
        dist.barrier(group=ranks.wait_group)
        log.info("balanced k-means sharded over %d ranks", ranks.world)
        codes_nL, _ = residual_kmeans(
            embeddings_nD, tok.levels, tok.codebook_size, tok.kmeans_iters, cfg.run.seed, device, group=ranks.group
        )
        codes_NL, training = gather_rows(ranks, codes_nL, bounds, everyone=True), {}
    del embeddings_nD

    # Every rank has every code from here on, so all raise the same error together.
    sizes = [tok.codebook_size] * tok.levels
    stats = codebook_stats(codes_NL, sizes)
    stats["method"] = tok.method
    if training:
        stats["training"] = training
    if ranks.is_main:
        for level, values in enumerate(stats["per_level"]):
            log.info(
                "level %d: utilization %.3f, entropy %.2f bits (max %.2f), perplexity %.1f",
                level, values["utilization"], values["entropy"], stats["max_entropy_bits"][level], values["perplexity"],
            )
        log.info(
            "collision rate before dedup: %.4f (%d unique tuples for %d items, at most %d items per tuple)",
            stats["collision_rate_before_dedup"], stats["unique_tuples"], num_items, stats["max_items_per_tuple"],
        )
    if not tok.dedup and stats["collision_rate_before_dedup"] > 0:
        raise ValueError(
            f"{stats['collision_rate_before_dedup']:.2%} of items share a code tuple with another item, so the "
            "model could not tell them apart: set tokenizer.dedup=true, or raise tokenizer.levels / codebook_size"
        )
    if ranks.is_main:
        if tok.dedup:
            priority_N = None
            if tok.dedup_order == "popularity":
                # Training parts only: neither held-out target may shape the codes.
                priority_N = training_item_counts(sequences, cfg.data, num_items)
            codes_NL, dedup_size = add_dedup_level(codes_NL, priority_N)
            sizes = sizes + [dedup_size]
            log.info("dedup level: %d codes, in %s order", dedup_size, tok.dedup_order)
        # Every rank's embedding cache is written (each wrote its own before the codes were
        # exchanged), so the save keeps them all.
        SemanticIds(codes_NL, sizes, tok.levels, stats).save(paths.semantic_ids)
        # Codebook utilisation to metrics.jsonl and W&B (rank 0 only, like every stage's metrics).
        run_logger = RunLogger(cfg.logging, paths.root, "tokenize", to_dict(cfg), rank=ranks.rank)
        try:
            run_logger.log(codebook_scalars(stats), step=0)
        finally:
            run_logger.close()
        log.info("semantic IDs %s written to %s in %.1fs", sizes, paths.semantic_ids, time.perf_counter() - started)
    if ranks.sharded:
        dist.barrier(group=ranks.wait_group)  # the stage ends together, its output written
        dist.destroy_process_group(ranks.wait_group)
    return paths.semantic_ids
