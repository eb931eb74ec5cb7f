"""Ranking metrics for one held-out item per user, over the full catalogue.

Recall@K is the hit rate (one relevant item); NDCG@K = 1 / log2(rank + 2) for a hit at
0-based rank, else 0 (the ideal DCG is 1). Averaged over users.

Shape legend: B users, K ranked items.
"""

from __future__ import annotations

import torch


def hit_ranks(ranked_items_BK: torch.Tensor, target_B: torch.Tensor) -> torch.Tensor:
    """0-based rank of the target in each list, or K when it is absent."""
    hits_BK = ranked_items_BK == target_B.unsqueeze(1)
    K = ranked_items_BK.shape[1]
    first_hit = torch.where(hits_BK.any(dim=1), hits_BK.float().argmax(dim=1), torch.full_like(target_B, K))
    return first_hit


class MetricAccumulator:
    """Sums of per-user Recall/NDCG at each K; `state()` is a tensor ready for an all-reduce."""

    def __init__(self, ks: list[int]) -> None:
        self.ks = sorted(ks)
        self.sums = torch.zeros(2 * len(self.ks) + 1, dtype=torch.float64)  # recall@k..., ndcg@k..., count

    def update(self, ranked_items_BK: torch.Tensor, target_B: torch.Tensor) -> None:
        if ranked_items_BK.shape[1] < self.ks[-1]:
            raise ValueError(f"ranked lists of {ranked_items_BK.shape[1]} items cannot give metrics at K={self.ks[-1]}")
        rank_B = hit_ranks(ranked_items_BK, target_B).cpu().double()
        for i, k in enumerate(self.ks):
            hit_B = rank_B < k
            self.sums[i] += hit_B.sum()
            self.sums[len(self.ks) + i] += torch.where(hit_B, 1.0 / torch.log2(rank_B + 2), 0.0).sum()
        self.sums[-1] += len(target_B)

    def state(self) -> torch.Tensor:
        return self.sums

    def compute(self) -> dict[str, float]:
        count = max(float(self.sums[-1]), 1.0)
        out = {}
        for i, k in enumerate(self.ks):
            out[f"recall@{k}"] = float(self.sums[i]) / count
            out[f"ndcg@{k}"] = float(self.sums[len(self.ks) + i]) / count
        return out


def ranking_metrics(ranked_items_BK: torch.Tensor, target_B: torch.Tensor, ks: list[int]) -> dict[str, float]:
    acc = MetricAccumulator(ks)
    acc.update(ranked_items_BK, target_B)
    return acc.compute()
