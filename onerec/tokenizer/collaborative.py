"""Collaborative item vectors from the training sequences, to blend into the content vectors
that the quantiser turns into semantic IDs.

Shape legend: N items, D content dim, C collaborative dim, P co-occurring (item, item) pairs.

Why: content vectors (item text) put items that read alike under one code prefix, while
the decoder has to predict what a user takes next. OneRec aligns its item embeddings with
collaborative signal before quantising them; this is the light-weight version of that: a
positive-PMI matrix of items seen within `window` steps of each other in a user's sequence,
factorised by a truncated SVD (Levy & Goldberg 2014: the word2vec of implicit feedback).

Only the training part of each sequence (what comes before the user's validation target)
is counted, so neither held-out target can leak into the codes.
"""

from __future__ import annotations

import numpy as np
import torch

from onerec.data.splits import UserSequences

# Context-distribution smoothing (Levy, Goldberg & Dagan 2015): damps the PMI of pairs with a
# rare context item, which raw PMI overrates.
CONTEXT_SMOOTHING = 0.75


def cooccurrence_pairs(seqs: UserSequences, train_len: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(first, second) item indices [P] of every ordered pair at distance 1..window inside a
    user's training part; both directions are returned, so the counts are symmetric."""
    lengths = seqs.lengths()
    position = np.arange(len(seqs.items)) - np.repeat(seqs.offsets[:-1], lengths)
    limit = np.repeat(train_len, lengths)  # positions >= limit are validation / test items
    firsts, seconds = [], []
    for distance in range(1, window + 1):
        start = np.flatnonzero(position + distance < limit)  # same user, both ends in training
        firsts.append(seqs.items[start])
        seconds.append(seqs.items[start + distance])
    first = np.concatenate(firsts) if firsts else np.zeros(0, np.int64)
    second = np.concatenate(seconds) if seconds else np.zeros(0, np.int64)
    return np.concatenate([first, second]), np.concatenate([second, first])


def ppmi_svd_vectors(
    seqs: UserSequences, train_len: np.ndarray, num_items: int, dim: int, window: int, seed: int
) -> torch.Tensor:
    """[N, C] L2-normalised item vectors; an item with no training co-occurrence gets zeros."""
    if dim < 1 or window < 1:
        raise ValueError(f"collaborative vectors need dim >= 1 and window >= 1, got dim={dim}, window={window}")
    first_P, second_P = cooccurrence_pairs(seqs, train_len, window)
    if len(first_P) == 0:
        raise ValueError("no two items co-occur in any user's training sequence: no collaborative signal to use")
    indices = torch.from_numpy(np.stack([first_P, second_P]).astype(np.int64))
    ones_P = torch.ones(len(first_P), dtype=torch.float64)
    counts = torch.sparse_coo_tensor(indices, ones_P, (num_items, num_items), check_invariants=True).coalesce()
    (row, col), count = counts.indices(), counts.values()
    row_total_N = torch.zeros(num_items, dtype=torch.float64).index_add_(0, row, count)
    context_N = row_total_N.pow(CONTEXT_SMOOTHING)
    pmi = torch.log(count * context_N.sum() / (row_total_N[row] * context_N[col]))
    keep = pmi > 0
    ppmi_NN = torch.sparse_coo_tensor(
        torch.stack([row[keep], col[keep]]), pmi[keep].float(), (num_items, num_items), check_invariants=True
    ).coalesce()
    rank = min(dim, num_items - 1)
    with torch.random.fork_rng(devices=[]):  # svd_lowrank draws its random projection from the global RNG
        torch.manual_seed(seed)
        u_NC, s_C, _ = torch.svd_lowrank(ppmi_NN, q=rank, niter=6)
    # normalize divides by max(norm, eps): rows of items that never co-occur stay zero.
    vectors_NC = torch.nn.functional.normalize(u_NC * s_C.sqrt(), dim=1)
    if rank < dim:
        vectors_NC = torch.cat([vectors_NC, vectors_NC.new_zeros(num_items, dim - rank)], dim=1)
    return vectors_NC


def blend(content_ND: torch.Tensor, collaborative_NC: torch.Tensor, weight: float) -> torch.Tensor:
    """[N, D + C]: both parts L2-normalised and scaled so that a squared distance between two
    items is (1 - weight) * content distance + weight * collaborative distance."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"collaborative weight must be in [0, 1], got {weight}")
    if content_ND.shape[0] != collaborative_NC.shape[0]:
        raise ValueError(f"{content_ND.shape[0]} content vectors but {collaborative_NC.shape[0]} collaborative ones")
    content_ND = torch.nn.functional.normalize(content_ND.float(), dim=1)
    collaborative_NC = torch.nn.functional.normalize(collaborative_NC.float(), dim=1)
    return torch.cat([content_ND * (1.0 - weight) ** 0.5, collaborative_NC * weight**0.5], dim=1)
