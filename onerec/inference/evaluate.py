"""Evaluation drivers: the model's top-K by constrained beam search, and the popularity baseline.

Shape legend: B users in a batch, S history length, N items, L code levels, W beam width, K cutoff,
R rows of one rank's shard.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from onerec.inference.beam_search import check_item_scores, constrained_beam_search, num_leaves
from onerec.inference.metrics import MetricAccumulator
from onerec.logging import progress_disabled
from onerec.model.onerec import lookup_codes
from onerec.tokenizer.trie import Trie

log = logging.getLogger("onerec.inference")
_WARNED_WIDTHS: set[tuple[int, int]] = set()  # (beam_width, catalogue size) pairs already warned about


def evaluate_examples(
    model,
    history_BS: np.ndarray | torch.Tensor,
    target_B: np.ndarray | torch.Tensor,
    user_B: np.ndarray | torch.Tensor | None,
    item_codes_NL: torch.Tensor,
    trie: Trie,
    beam_width: int,
    ks: list[int],
    batch_size: int,
    device: torch.device | str,
    max_users: int = 0,
    desc: str = "eval",
    distributed: bool = False,
    exclude_history: bool = False,
    item_score_weight: float = 0.0,
) -> dict[str, float]:
    """Recall/NDCG@K of the top-K beams for each (history, held-out target) row.

    exclude_history=True: no row is recommended an item of its own history.
    item_score_weight > 0 (eval.item_score_weight): the W beams are reranked by beam log-prob +
    item_score_weight x the item head's log-probability before the top K are taken; the
    model needs an item-ID embedding (a ValueError says so before anything is decoded).

    A beam_width above the catalogue size is searched as one beam per item (the same result;
    a warning says so). The search's memory is estimated before its first batch: a
    ResourceError names eval.batch_size and eval.beam_width when it would not fit.

    history_BS holds item indices, right-aligned with -1 padding on the left. max_users > 0
    evaluates only the first max_users rows (0: all). The model is put in eval mode and its
    previous mode restored afterwards; it must already be on `device`.

    distributed=True: every rank of the default process group calls this with the same rows;
    each decodes its own shard and the hit counts are summed over ranks, so every rank returns
    exactly the single-process metrics. The shards are padded to equal length (padding rows
    are decoded but not counted): every rank runs the same number of equally sized batches,
    which an expert-parallel model needs, since its forward is a collective.
    """
    history_BS = torch.as_tensor(history_BS).long()
    target_B = torch.as_tensor(target_B).long()
    user_B = None if user_B is None else torch.as_tensor(user_B).long()
    if history_BS.dim() != 2 or target_B.dim() != 1 or len(history_BS) != len(target_B):
        raise ValueError(
            f"expected history [users, S] and target [users], got {tuple(history_BS.shape)} and {tuple(target_B.shape)}"
        )
    if user_B is not None and user_B.shape != target_B.shape:
        raise ValueError(f"user_B must be [users]={len(target_B)}, got {tuple(user_B.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    accumulator = MetricAccumulator(ks)
    top_k = accumulator.ks[-1]
    if beam_width < top_k:
        raise ValueError(f"beam_width={beam_width} must be >= the largest K in ks ({top_k})")
    if max_users < 0:
        raise ValueError(f"max_users={max_users}: expected >= 0 (0 means every user)")
    check_item_scores(model, item_score_weight)
    if max_users:
        history_BS, target_B = history_BS[:max_users], target_B[:max_users]
        user_B = None if user_B is None else user_B[:max_users]

    num_counted = len(target_B)
    sharded = distributed and dist.get_world_size() > 1
    if sharded:
        shard_R, num_counted = _shard_rows(len(target_B), dist.get_rank(), dist.get_world_size())
        history_BS, target_B = history_BS[shard_R], target_B[shard_R]
        user_B = None if user_B is None else user_B[shard_R]

    items = num_leaves(trie)
    if beam_width > items and (beam_width, items) not in _WARNED_WIDTHS:  # once, not at every validation
        _WARNED_WIDTHS.add((beam_width, items))
        log.warning(
            "eval.beam_width=%d is more than the %d items of the catalogue: a beam per item already "
            "covers every answer, so the search runs %d beams (same result, less memory)",
            beam_width, items, items,
        )
    # What a ResourceError from the search's memory check tells the user to lower.
    settings = f"eval.batch_size ({batch_size}) or eval.beam_width ({beam_width})"

    device = torch.device(device)
    codes_NL = item_codes_NL.to(device)
    trie = trie.to(device)  # once, not per batch
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(target_B), batch_size)
        for start in tqdm(starts, desc=desc, disable=progress_disabled(), leave=False, dynamic_ncols=True):
            rows = slice(start, start + batch_size)
            history_items_BS = history_BS[rows].to(device)
            history_codes_BSL = lookup_codes(history_items_BS, codes_NL)
            users = None if user_B is None else user_B[rows].to(device)
            output = constrained_beam_search(
                model,
                history_codes_BSL,
                trie,
                beam_width,
                user_B=users,
                history_items_BS=history_items_BS,
                exclude_items_BX=history_items_BS if exclude_history else None,
                settings=settings,
                item_score_weight=item_score_weight,
            )
            counted = max(0, min(batch_size, num_counted - start))  # padding rows are not counted
            if counted:
                accumulator.update(output.items_BW[:counted, :top_k].cpu(), target_B[rows][:counted])
    finally:
        model.train(was_training)
    if sharded:
        sums = accumulator.state().to(device)  # nccl reduces device tensors only
        dist.all_reduce(sums)
        accumulator.load_state(sums)
    return accumulator.compute()


def _shard_rows(num_rows: int, rank: int, world_size: int) -> tuple[torch.Tensor, int]:
    """Row indices of this rank's shard (rank, rank + world_size, ...), padded with row 0 to
    ceil(num_rows / world_size) entries, and how many of them are real."""
    shard_R = torch.arange(rank, num_rows, world_size)
    padded = math.ceil(num_rows / world_size)
    padding_R = torch.zeros(padded - len(shard_R), dtype=torch.long)
    return torch.cat([shard_R, padding_R]), len(shard_R)


def popularity_ranking(train_item_counts_N: np.ndarray | torch.Tensor, k: int) -> torch.Tensor:
    """LongTensor[k]: the k most frequent training items, ties to the lower item_index.

    When the catalogue has fewer than k items the list is padded with -1 (never a hit).
    """
    if k < 1:
        raise ValueError(f"k={k}: expected >= 1")
    counts_N = torch.as_tensor(train_item_counts_N)
    if counts_N.dim() != 1:
        raise ValueError(f"train_item_counts_N must be 1-D [num_items], got shape {tuple(counts_N.shape)}")
    # A stable ascending sort of -count keeps equal counts in item_index order.
    order_N = torch.sort(-counts_N.double(), stable=True).indices[:k]
    return torch.cat([order_N, torch.full((k - len(order_N),), -1, dtype=torch.long)])


def evaluate_popularity(
    train_item_counts_N: np.ndarray | torch.Tensor, target_B: np.ndarray | torch.Tensor, ks: list[int]
) -> dict[str, float]:
    """Recall/NDCG@K when every user gets the same list: the catalogue ranked by training count."""
    target_B = torch.as_tensor(target_B).long()
    accumulator = MetricAccumulator(ks)
    ranked_K = popularity_ranking(train_item_counts_N, accumulator.ks[-1])
    accumulator.update(ranked_K.unsqueeze(0).expand(len(target_B), -1), target_B)
    return accumulator.compute()
