"""Ranking metrics for one held-out item per user, over the full catalogue.

Leave-one-out with a single relevant item: Recall@K is the hit rate, and
NDCG@K = 1 / log2(rank + 2) for a hit at 0-based rank < K, else 0 (the ideal DCG is 1).
Averaged over users.

Shape legend: B users, K ranked items.
"""

from __future__ import annotations

import torch


def hit_ranks(ranked_items_BK: torch.Tensor, target_B: torch.Tensor) -> torch.Tensor:
    """0-based rank of the target in each list, or K when it is absent. -1 entries (dead beams) never hit."""
    hits_BK = (ranked_items_BK == target_B.unsqueeze(1)) & (ranked_items_BK >= 0)
    K = ranked_items_BK.shape[1]
    first_hit_B = hits_BK.int().argmax(dim=1)  # argmax returns the first maximum
    return torch.where(hits_BK.any(dim=1), first_hit_B, torch.full_like(first_hit_B, K))


class MetricAccumulator:
    """Recall/NDCG at each K, accumulated over any number of batches.

    It keeps integer counts only (users with a hit at each 0-based rank < max K, and users
    seen), so the result does not depend on how users were split into batches or ranks.
    `state()` is that float64 vector [hits at rank 0 .. max K - 1, users] (exact integers):
    all-reduce it with SUM across ranks (in place, or pass the reduced copy to `load_state`),
    then `compute()`.
    """

    def __init__(self, ks: list[int]) -> None:
        if not ks or min(ks) < 1:
            raise ValueError(f"ks={list(ks)}: expected one or more cutoffs >= 1")
        self.ks = sorted(set(int(k) for k in ks))
        self.sums = torch.zeros(self.ks[-1] + 1, dtype=torch.float64)

    def update(self, ranked_items_BK: torch.Tensor, target_B: torch.Tensor) -> None:
        ranked_items_BK = torch.as_tensor(ranked_items_BK).cpu()
        target_B = torch.as_tensor(target_B).cpu().long()
        if ranked_items_BK.dim() != 2 or target_B.dim() != 1 or len(target_B) != ranked_items_BK.shape[0]:
            raise ValueError(
                f"expected ranked items [B, K] and targets [B], got {tuple(ranked_items_BK.shape)} "
                f"and {tuple(target_B.shape)}"
            )
        K = self.ks[-1]
        if ranked_items_BK.shape[1] < K:
            raise ValueError(
                f"ranked lists of {ranked_items_BK.shape[1]} items cannot give metrics at K={K} "
                "(raise the beam width or lower the largest K)"
            )
        if (target_B < 0).any():
            raise ValueError("targets must be item indices >= 0 (a -1 target is padding, not a held-out item)")
        rank_B = hit_ranks(ranked_items_BK[:, :K], target_B)  # K means no hit within the largest cutoff
        self.sums[:K] += torch.bincount(rank_B, minlength=K + 1)[:K].double()
        self.sums[K] += len(target_B)

    def state(self) -> torch.Tensor:
        return self.sums

    def load_state(self, sums: torch.Tensor) -> None:
        if sums.shape != self.sums.shape:
            raise ValueError(f"state of shape {tuple(sums.shape)} does not match {tuple(self.sums.shape)}")
        self.sums = sums.detach().to("cpu", torch.float64).clone()

    def compute(self) -> dict[str, float]:
        """{"recall@k": ..., "ndcg@k": ...} averaged over users (0.0 before any update)."""
        hits_K = self.sums[:-1]
        users = max(float(self.sums[-1]), 1.0)
        gains_K = 1.0 / torch.log2(torch.arange(len(hits_K), dtype=torch.float64) + 2)
        out = {}
        for k in self.ks:
            out[f"recall@{k}"] = float(hits_K[:k].sum()) / users
            out[f"ndcg@{k}"] = float((hits_K[:k] * gains_K[:k]).sum()) / users
        return out


def ranking_metrics(ranked_items_BK: torch.Tensor, target_B: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """Recall@K and NDCG@K at each K in ks, averaged over the B users."""
    acc = MetricAccumulator(ks)
    acc.update(ranked_items_BK, target_B)
    return acc.compute()
