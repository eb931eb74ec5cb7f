"""Balanced residual k-means (OneRec, arXiv 2502.18965, Algorithm 1), in torch (GPU when present).

Shape legend: N items, D embedding dim, K clusters (codebook size), L levels, U items still unassigned.

OneRec asks that every cluster hold exactly |V|/K items: codes then spread evenly over
the codebook, which keeps the decoder's vocabulary fully used and the trie's branching
even. The paper fills clusters one after another with their nearest free items; that
leaves the last clusters with whatever is far from everything. We instead run a
vectorised capacity-constrained greedy (deferred acceptance), which keeps the exact
sizes but lets every item compete for its nearest cluster:

    round r:  every unassigned item proposes to its nearest cluster that still has room
              each cluster accepts its closest proposers, up to its remaining capacity
              the rejected ones try again next round (their full clusters now masked)

A round either places every proposer or fills at least one cluster, so there are at
most K + 1 rounds, each a masked argmin over [U, K] with U shrinking fast.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from onerec.logging import progress_disabled


def _check_points(x_ND: torch.Tensor) -> None:
    if x_ND.dim() != 2:
        raise ValueError(f"expected item vectors of shape [N, D], got {tuple(x_ND.shape)}")
    if not x_ND.is_floating_point():
        raise ValueError(f"expected floating-point item vectors, got {x_ND.dtype}")
    if not torch.isfinite(x_ND).all():
        raise ValueError("item vectors contain NaN or inf; check the embeddings")


def _assignment_scores(x_ND: torch.Tensor, centroids_KD: torch.Tensor) -> torch.Tensor:
    """||c||^2 - 2 x.c: the squared distance minus the per-item constant ||x||^2 (one addmm).

    Enough to rank clusters for one item; add ||x||^2 back to compare different items.
    """
    return torch.addmm(centroids_KD.pow(2).sum(1), x_ND, centroids_KD.T, alpha=-2.0)


def _capacities(score_NK: torch.Tensor) -> torch.Tensor:
    """floor(N/K) for every cluster; the N mod K extra slots go to the clusters most in demand."""
    N, K = score_NK.shape
    base, extra = divmod(N, K)
    capacity_K = torch.full((K,), base, dtype=torch.long, device=score_NK.device)
    if extra:
        demand_K = torch.bincount(score_NK.argmin(1), minlength=K)
        # Stable descending sort: ties go to the lower cluster index, so the result is deterministic.
        busiest = torch.sort(demand_K, descending=True, stable=True).indices[:extra]
        capacity_K[busiest] += 1
    return capacity_K


def balanced_assign(x_ND: torch.Tensor, centroids_KD: torch.Tensor) -> torch.Tensor:
    """Assign every item to a centroid so that cluster sizes are exactly floor/ceil(N / K)."""
    N, K = x_ND.shape[0], centroids_KD.shape[0]
    score_NK = _assignment_scores(x_ND, centroids_KD)
    norm_N = x_ND.pow(2).sum(1)
    room_K = _capacities(score_NK)
    assert int(room_K.sum()) == N
    assign_N = torch.full((N,), -1, dtype=torch.long, device=x_ND.device)
    open_U = torch.arange(N, device=x_ND.device)  # items not yet placed
    for _ in range(K + 1):
        if open_U.numel() == 0:
            break
        if open_U.numel() == N:  # first round: every cluster has room, no gather needed
            best_U, choice_U = score_NK.min(1)
        else:
            score_UK = score_NK[open_U].masked_fill_((room_K == 0).unsqueeze(0), float("inf"))
            best_U, choice_U = score_UK.min(1)
        best_d_U = best_U + norm_N[open_U]  # true squared distance: comparable across items
        # Group proposals by cluster, closest first (two stable sorts = lexicographic (cluster, distance)).
        by_dist = torch.sort(best_d_U, stable=True).indices
        order = by_dist[torch.sort(choice_U[by_dist], stable=True).indices]
        cluster_sorted = choice_U[order]
        counts_K = torch.bincount(cluster_sorted, minlength=K)
        first_K = torch.cumsum(counts_K, 0) - counts_K
        rank = torch.arange(order.numel(), device=x_ND.device) - first_K[cluster_sorted]
        accepted = rank < room_K[cluster_sorted]
        winners = order[accepted]
        assign_N[open_U[winners]] = choice_U[winners]
        room_K -= torch.bincount(choice_U[winners], minlength=K)
        keep_U = torch.ones(open_U.numel(), dtype=torch.bool, device=x_ND.device)
        keep_U[winners] = False
        open_U = open_U[keep_U]
    assert open_U.numel() == 0 and bool((room_K == 0).all()), "balanced assignment left items unplaced"
    return assign_N


def kmeans_plus_plus(x_ND: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): spread initial centroids over the data."""
    N = x_ND.shape[0]
    norm_N = x_ND.pow(2).sum(1)
    first = int(torch.randint(N, (1,), generator=generator))
    chosen = [first]

    def sq_dist_to(index: int) -> torch.Tensor:  # a mat-vec, not an [N, D] difference
        return (norm_N - 2.0 * (x_ND @ x_ND[index]) + norm_N[index]).clamp_(min=0.0)

    nearest_N = sq_dist_to(first)
    for _ in range(1, k):
        weights = nearest_N.double().cpu()
        weights[chosen] = 0.0  # rounding can leave a chosen point a tiny positive weight
        if float(weights.sum()) <= 0.0:  # every remaining point duplicates a centroid: pick uniformly
            weights = torch.ones(N, dtype=torch.float64)
            weights[chosen] = 0.0
        index = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(index)
        nearest_N = torch.minimum(nearest_N, sq_dist_to(index))
    return x_ND[torch.tensor(chosen, device=x_ND.device)].clone()


def centroid_means(x_ND: torch.Tensor, assign_N: torch.Tensor, k: int) -> torch.Tensor:
    counts_K = torch.bincount(assign_N, minlength=k).clamp(min=1).unsqueeze(1)
    if not x_ND.is_cuda:
        sums_KD = torch.zeros(k, x_ND.shape[1], dtype=x_ND.dtype, device=x_ND.device).index_add_(0, assign_N, x_ND)
        return sums_KD / counts_K
    # On CUDA index_add_ accumulates with atomics (run-to-run float noise would break seeded
    # determinism); a one-hot matmul in fixed-size row chunks is deterministic and bounded in memory.
    sums_KD = torch.zeros(k, x_ND.shape[1], dtype=x_ND.dtype, device=x_ND.device)
    chunk = max(1, (1 << 26) // k)
    for start in range(0, x_ND.shape[0], chunk):
        onehot_NK = torch.nn.functional.one_hot(assign_N[start : start + chunk], k).to(x_ND.dtype)
        sums_KD += onehot_NK.T @ x_ND[start : start + chunk]
    return sums_KD / counts_K


def balanced_kmeans(
    x_ND: torch.Tensor, k: int, iters: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced k-means: (assign_N, centroids_KD), every cluster holds exactly floor/ceil(N / k) items.

    Lloyd iterations with the balanced assignment step; stops early when the assignment
    no longer changes. Centroids returned are the means of the returned assignment.
    `generator` is a CPU torch.Generator (k-means++ seeding), so results depend only on it.
    """
    _check_points(x_ND)
    N = x_ND.shape[0]
    if k < 1:
        raise ValueError(f"k={k}: expected at least one cluster")
    if N < k:
        raise ValueError(
            f"{N} items cannot fill a balanced codebook of {k} codes (each code needs at least one item): "
            f"lower tokenizer.codebook_size to at most {N}"
        )
    if iters < 0:
        raise ValueError(f"iters={iters}: expected >= 0")
    centroids_KD = kmeans_plus_plus(x_ND, k, generator)
    assign_N = balanced_assign(x_ND, centroids_KD)
    for _ in range(iters):
        centroids_KD = centroid_means(x_ND, assign_N, k)
        new_assign_N = balanced_assign(x_ND, centroids_KD)
        if torch.equal(new_assign_N, assign_N):
            break
        assign_N = new_assign_N
    return assign_N, centroid_means(x_ND, assign_N, k)


def residual_kmeans(
    x_ND: torch.Tensor,
    levels: int,
    codebook_size: int,
    iters: int,
    seed: int,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Residual quantisation: level l clusters what levels < l left unexplained.

    Returns codes_NL (int64, on CPU) and one codebook [K, D] per level (on CPU), so that
    x ~= sum_l codebooks[l][codes_NL[:, l]].
    """
    _check_points(x_ND)
    if levels < 1:
        raise ValueError(f"levels={levels}: expected >= 1")
    generator = torch.Generator().manual_seed(seed)
    residual_ND = x_ND.detach().to(device=device, dtype=torch.float32).clone()
    codes, codebooks = [], []
    bar = tqdm(range(levels), desc="residual k-means", disable=progress_disabled(), dynamic_ncols=True)
    for level in bar:
        assign_N, centroids_KD = balanced_kmeans(residual_ND, codebook_size, iters, generator)
        codes.append(assign_N)
        codebooks.append(centroids_KD.cpu())
        residual_ND = residual_ND - centroids_KD[assign_N]
        bar.set_postfix(level=level, residual_mse=f"{residual_ND.pow(2).sum(1).mean().item():.4f}")
    return torch.stack(codes, dim=1).cpu(), codebooks
