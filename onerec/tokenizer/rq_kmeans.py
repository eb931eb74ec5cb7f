"""Balanced residual k-means (OneRec, arXiv 2502.18965, Algorithm 1), in torch (GPU when present).

Shape legend: N items, D embedding dim, K clusters (codebook size), L levels.

Balanced assignment, as in the paper: visit the clusters in turn and give each the
nearest still-unassigned items up to its capacity, so every cluster holds exactly
floor(N/K) or ceil(N/K) items. Codes spread evenly over the codebook, which keeps the
decoder's vocabulary fully used and the trie's branching even.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from onerec.logging import progress_disabled


def _capacities(n: int, k: int) -> list[int]:
    base, extra = divmod(n, k)
    return [base + (1 if c < extra else 0) for c in range(k)]


def balanced_assign(x_ND: torch.Tensor, centroids_KD: torch.Tensor) -> torch.Tensor:
    N, K = x_ND.shape[0], centroids_KD.shape[0]
    dist_NK = torch.cdist(x_ND, centroids_KD)
    assign_N = torch.full((N,), -1, dtype=torch.long, device=x_ND.device)
    taken_N = torch.zeros(N, dtype=torch.bool, device=x_ND.device)
    for k, capacity in enumerate(_capacities(N, K)):
        dist = dist_NK[:, k].masked_fill(taken_N, float("inf"))
        chosen = torch.topk(dist, capacity, largest=False).indices
        assign_N[chosen] = k
        taken_N[chosen] = True
    return assign_N


def balanced_kmeans(
    x_ND: torch.Tensor, k: int, iters: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (assign_N, centroids_KD) with cluster sizes exactly floor/ceil(N / k)."""
    N = x_ND.shape[0]
    if N < k:
        raise ValueError(f"{N} items cannot fill a codebook of {k} codes: lower tokenizer.codebook_size")
    init = torch.randperm(N, generator=generator)[:k].to(x_ND.device)
    centroids_KD = x_ND[init].clone()
    assign_N = balanced_assign(x_ND, centroids_KD)
    for _ in range(iters):
        sums_KD = torch.zeros_like(centroids_KD).index_add_(0, assign_N, x_ND)
        counts_K = torch.bincount(assign_N, minlength=k).clamp(min=1).unsqueeze(1)
        centroids_KD = sums_KD / counts_K
        new_assign = balanced_assign(x_ND, centroids_KD)
        if torch.equal(new_assign, assign_N):
            break
        assign_N = new_assign
    return assign_N, centroids_KD


def residual_kmeans(
    x_ND: torch.Tensor, levels: int, codebook_size: int, iters: int, seed: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Quantise the residual left by each level: codes_NL and one codebook [K, D] per level."""
    generator = torch.Generator().manual_seed(seed)
    residual_ND = x_ND.to(device).float().clone()
    codes, codebooks = [], []
    for _ in tqdm(range(levels), desc="residual k-means", disable=progress_disabled(), dynamic_ncols=True):
        assign_N, centroids_KD = balanced_kmeans(residual_ND, codebook_size, iters, generator)
        codes.append(assign_N)
        codebooks.append(centroids_KD.cpu())
        residual_ND = residual_ND - centroids_KD[assign_N]
    return torch.stack(codes, dim=1).cpu(), codebooks
