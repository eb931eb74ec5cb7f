"""Evaluation drivers: the model's top-K by constrained beam search, and the popularity baseline.

Shape legend: B users in a batch, S history length, N items, L code levels, W beam width.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from onerec.inference.beam_search import constrained_beam_search
from onerec.inference.metrics import MetricAccumulator
from onerec.logging import progress_disabled
from onerec.model.onerec import lookup_codes
from onerec.tokenizer.trie import Trie


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
    desc: str = "eval",
) -> dict[str, float]:
    """Recall/NDCG@K of the top-K beams for each (history, held-out target) row."""
    history_BS = torch.as_tensor(history_BS)
    target_B = torch.as_tensor(target_B)
    user_B = None if user_B is None else torch.as_tensor(user_B)
    codes_NL = item_codes_NL.to(device)
    was_training = model.training
    model.eval()
    accumulator = MetricAccumulator(ks)
    starts = range(0, len(target_B), batch_size)
    for start in tqdm(starts, desc=desc, disable=progress_disabled(), leave=False, dynamic_ncols=True):
        rows = slice(start, start + batch_size)
        history_codes = lookup_codes(history_BS[rows].to(device), codes_NL)
        users = None if user_B is None else user_B[rows].to(device)
        output = constrained_beam_search(model, history_codes, trie, beam_width, user_B=users)
        accumulator.update(output.items_BW[:, : max(ks)].cpu(), target_B[rows])
    model.train(was_training)
    return accumulator.compute()


def popularity_ranking(train_item_counts_N: torch.Tensor, k: int) -> torch.Tensor:
    """The k most frequent training items; ties go to the lower item_index."""
    counts = torch.as_tensor(train_item_counts_N)
    order = torch.sort(-counts, stable=True).indices
    return order[:k]


def evaluate_popularity(train_item_counts_N: torch.Tensor, target_B: torch.Tensor, ks: list[int]) -> dict[str, float]:
    top = popularity_ranking(train_item_counts_N, max(ks))
    accumulator = MetricAccumulator(ks)
    accumulator.update(top.unsqueeze(0).expand(len(target_B), -1), torch.as_tensor(target_B))
    return accumulator.compute()
