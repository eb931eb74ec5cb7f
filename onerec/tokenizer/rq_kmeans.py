"""Balanced residual k-means (OneRec, arXiv 2502.18965, Algorithm 1), in torch (GPU when present).

Shape legend: N items, D embedding dim, K clusters (codebook size), L levels, U items still
unassigned, R rows of one chunk, S seeding sample, B centres drawn per seeding round,
W ranks (world size).

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

Scale (OneRec quantises millions of items with 3 x 8192 codes; [1M, 8192] scores are 32 GB
in fp32). A round only needs, per open item, the best cluster that still has room and its
distance, so the [U, K] scores are produced and reduced chunk by chunk:

    rows 0..R-1     -> addmm -> [R, K] scores -> mask full clusters -> min -> best_R, choice_R
    rows R..2R-1    -> ...                                              (R from max_chunk_bytes)

and everything kept across chunks is O(N) (per-item best distance and choice) or O(K).
The proposals and the acceptance are exactly the unchunked greedy's. The one thing a chunk
changes is floating-point rounding: a BLAS GEMM need not give a row the same bits when it
is computed in a call with a different number of rows, so when the whole [N, K] score
matrix fits in half the budget it is computed once, by one addmm, and later rounds gather
their rows from it: at the shipped sizes (12k items x 64 codes is 3 MB) the codes are
bit for bit those of the unchunked algorithm.

Seeding. k-means++ needs K sequential draws, each depending on all earlier ones. For small
problems (N * K <= EXACT_SEEDING_MAX) we keep the original seeding (a host draw per
centre, so seeded results do not change); above it, seeding runs on a uniform sample of
min(N, SEED_SAMPLE_PER_CODE * K) items, entirely on the device, drawing the centres
D^2-weighted in SEEDING_ROUNDS rounds of B (see _kmeans_plus_plus_on_device): no host
round trip per centre, and matmuls instead of K memory-bound mat-vecs.

Sharding. With a process group of W > 1 ranks (`group=`), each rank passes its own
contiguous slice of the items (rank order = item order). Scores and their chunks stay on
the rank that owns the rows; the per-round proposals (8 bytes + 8 bytes per open item)
are all-gathered so every rank runs the same acceptance; centroid sums and counts are
all-reduced. Every rank ends with the same codebook and the codes of its own items.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from onerec.logging import progress_disabled

# Scores held at once by one assignment step (the [R, K] chunk), by default. 256 MB keeps
# the addmm large enough to run near peak on CPU and GPU alike.
DEFAULT_CHUNK_BYTES = 256 * 2**20
# Up to this many item-centre distance evaluations (N * K), seeding is the original
# sequential k-means++ over all items (one host draw per centre): cheap there, and it
# keeps the codes of every shipped data set unchanged.
EXACT_SEEDING_MAX = 2**26
# Above it, k-means++ runs on a uniform sample of this many items per code (all items
# when N is smaller): enough to represent the data's density at the scale of one cluster.
SEED_SAMPLE_PER_CODE = 64
# Sampled seeding draws its centres in this many rounds (see _kmeans_plus_plus_on_device).
SEEDING_ROUNDS = 64


def _check_points(x_ND: torch.Tensor) -> None:
    if x_ND.dim() != 2:
        raise ValueError(f"expected item vectors of shape [N, D], got {tuple(x_ND.shape)}")
    if not x_ND.is_floating_point():
        raise ValueError(f"expected floating-point item vectors, got {x_ND.dtype}")
    if not torch.isfinite(x_ND).all():
        raise ValueError("item vectors contain NaN or inf; check the embeddings")


def _world_size(group: dist.ProcessGroup | None) -> int:
    """Ranks sharing the items: 1 unless a process group is given (and initialised)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _all_gather_rows(t_u: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, list[int]]:
    """Every rank's rows concatenated in rank order, and how many each rank gave.

    Ranks may hold different numbers of rows; all_gather needs equal shapes, so each pads
    to the largest and the padding is cut off again.
    """
    world = dist.get_world_size(group)
    count_1 = torch.tensor([t_u.shape[0]], dtype=torch.long, device=t_u.device)
    counts = [torch.zeros_like(count_1) for _ in range(world)]
    dist.all_gather(counts, count_1, group=group)
    sizes = [int(c) for c in counts]
    padded = t_u.new_zeros((max(sizes), *t_u.shape[1:]))
    padded[: t_u.shape[0]] = t_u
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]), sizes


def _all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if _world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _assignment_scores(x_ND: torch.Tensor, centroids_KD: torch.Tensor) -> torch.Tensor:
    """||c||^2 - 2 x.c: the squared distance minus the per-item constant ||x||^2 (one addmm).

    Enough to rank clusters for one item; add ||x||^2 back to compare different items.
    """
    return torch.addmm(centroids_KD.pow(2).sum(1), x_ND, centroids_KD.T, alpha=-2.0)


def _capacities(demand_K: torch.Tensor, n_items: int) -> torch.Tensor:
    """floor(N/K) for every cluster; the N mod K extra slots go to the clusters most in demand.

    demand_K counts the items whose nearest cluster is k (over all ranks when sharded).
    """
    K = demand_K.shape[0]
    base, extra = divmod(n_items, K)
    capacity_K = torch.full((K,), base, dtype=torch.long, device=demand_K.device)
    if extra:
        # Stable descending sort: ties go to the lower cluster index, so the result is deterministic.
        busiest = torch.sort(demand_K, descending=True, stable=True).indices[:extra]
        capacity_K[busiest] += 1
    return capacity_K


def _rows_per_chunk(budget_bytes: int, k: int, element_size: int) -> int:
    return max(1, budget_bytes // (k * element_size))


def _nearest_open(
    x_ND: torch.Tensor,
    centroids_KD: torch.Tensor,
    rows_U: torch.Tensor | None,
    full_K: torch.Tensor | None,
    rows_per_chunk: int,
    score_NK: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per listed item (all items when rows_U is None): (best score, cluster) over clusters with room.

    Holds at most [rows_per_chunk, K] scores at a time: gathered from score_NK when the
    dense matrix exists, else recomputed by one addmm per chunk. Ties go to the lowest
    cluster index (torch.min's first minimum), as in the unchunked argmin.
    """
    U = x_ND.shape[0] if rows_U is None else rows_U.numel()
    best_U = torch.empty(U, dtype=x_ND.dtype, device=x_ND.device)
    choice_U = torch.empty(U, dtype=torch.long, device=x_ND.device)
    centroid_sq_K = None if score_NK is not None else centroids_KD.pow(2).sum(1)
    mask_1K = None if full_K is None else full_K.unsqueeze(0)
    for start in range(0, U, rows_per_chunk):
        stop = min(start + rows_per_chunk, U)
        if score_NK is not None:
            if rows_U is None:
                score_RK = score_NK[start:stop]  # a view: masked below only after a copy
                if mask_1K is not None:
                    score_RK = score_RK.masked_fill(mask_1K, float("inf"))
            else:
                score_RK = score_NK[rows_U[start:stop]]
                if mask_1K is not None:
                    score_RK.masked_fill_(mask_1K, float("inf"))
        else:
            x_RD = x_ND[start:stop] if rows_U is None else x_ND[rows_U[start:stop]]
            score_RK = torch.addmm(centroid_sq_K, x_RD, centroids_KD.T, alpha=-2.0)
            if mask_1K is not None:
                score_RK.masked_fill_(mask_1K, float("inf"))
        torch.min(score_RK, 1, out=(best_U[start:stop], choice_U[start:stop]))
        del score_RK  # free this chunk before the next one is allocated
    return best_U, choice_U


def balanced_assign(
    x_ND: torch.Tensor,
    centroids_KD: torch.Tensor,
    *,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Assign every item to a centroid so that cluster sizes are exactly floor/ceil(N / K).

    At most max_chunk_bytes of scores exist at once (see the module docstring): the whole
    [N, K] matrix when it fits in half of it (the gathered chunk takes the other half),
    else [R, K] row chunks recomputed per round. With a process group of W > 1 ranks,
    x_ND is this rank's slice of the items (ranks in item order), N counts all ranks'
    items, and the result holds this rank's items' clusters.
    """
    n_local, K = x_ND.shape[0], centroids_KD.shape[0]
    sharded = _world_size(group) > 1
    device = x_ND.device
    element_size = x_ND.element_size()
    if n_local * K * element_size * 2 <= max_chunk_bytes:
        score_NK = _assignment_scores(x_ND, centroids_KD)
        rows_per_chunk = _rows_per_chunk(max_chunk_bytes // 2, K, element_size)
    else:
        score_NK = None
        rows_per_chunk = _rows_per_chunk(max_chunk_bytes, K, element_size)
    norm_N = x_ND.pow(2).sum(1)

    # First round: no cluster is full yet, and the same nearest clusters give the demand
    # that decides which clusters take the N mod K extra items.
    best_U, choice_U = _nearest_open(x_ND, centroids_KD, None, None, rows_per_chunk, score_NK)
    demand_K = _all_reduce_sum(torch.bincount(choice_U, minlength=K), group)
    n_items = int(_all_reduce_sum(torch.tensor([n_local], device=device), group)) if sharded else n_local
    room_K = _capacities(demand_K, n_items)
    assert int(room_K.sum()) == n_items
    assign_N = torch.full((n_local,), -1, dtype=torch.long, device=device)
    open_U = torch.arange(n_local, device=device)  # this rank's items not yet placed, in item order
    unplaced = n_items  # over all ranks: the same number on every rank, so all stop together
    for round_index in range(K + 1):
        if unplaced == 0:
            break
        if round_index > 0:
            best_U, choice_U = _nearest_open(x_ND, centroids_KD, open_U, room_K == 0, rows_per_chunk, score_NK)
        best_d_U = best_U + norm_N[open_U]  # true squared distance: comparable across items
        if sharded:
            # Every rank sees every open item's proposal, in global item order, and runs the
            # same acceptance; float64 holds both the fp32 distance and the cluster exactly.
            pairs_U2, sizes = _all_gather_rows(torch.stack([best_d_U.double(), choice_U.double()], 1), group)
            all_d_U, all_choice_U = pairs_U2[:, 0], pairs_U2[:, 1].long()
            first_local = sum(sizes[: dist.get_rank(group)])
        else:
            all_d_U, all_choice_U, first_local = best_d_U, choice_U, 0
        # Group proposals by cluster, closest first (two stable sorts = lexicographic
        # (cluster, distance), then item order).
        by_dist = torch.sort(all_d_U, stable=True).indices
        order = by_dist[torch.sort(all_choice_U[by_dist], stable=True).indices]
        cluster_sorted = all_choice_U[order]
        counts_K = torch.bincount(cluster_sorted, minlength=K)
        first_K = torch.cumsum(counts_K, 0) - counts_K
        place_in_queue = torch.arange(order.numel(), device=device) - first_K[cluster_sorted]
        accepted = place_in_queue < room_K[cluster_sorted]
        winners = order[accepted]
        unplaced -= winners.numel()
        room_K -= torch.bincount(all_choice_U[winners], minlength=K)
        if sharded:
            winners = winners - first_local
            winners = winners[(winners >= 0) & (winners < open_U.numel())]  # this rank's winners
        assign_N[open_U[winners]] = choice_U[winners]
        keep_U = torch.ones(open_U.numel(), dtype=torch.bool, device=device)
        keep_U[winners] = False
        open_U = open_U[keep_U]
    assert open_U.numel() == 0 and bool((room_K == 0).all()), "balanced assignment left items unplaced"
    return assign_N


def kmeans_plus_plus(x_ND: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): spread initial centroids over the data.

    One host draw per centre (K round trips): used as is for small problems, where it
    fixes the seeded codes; large ones go through _kmeans_plus_plus_on_device.
    """
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


def _kmeans_plus_plus_on_device(
    x_SD: torch.Tensor, k: int, generator: torch.Generator, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> torch.Tensor:
    """k-means++ seeding with every draw made on x_SD's device: no host round trip per centre.

    Centres are drawn in SEEDING_ROUNDS rounds of B = ceil((k - 1) / SEEDING_ROUNDS) at a
    time: each round draws B distinct points with probability proportional to D^2 (the
    squared distance to the nearest centre so far) by the Gumbel top-B trick (the B
    largest log D^2 + Gumbel noise are a weighted draw without replacement), then updates
    D^2 with one [S, B] matmul. With B = 1 (k <= SEEDING_ROUNDS + 1) this is k-means++
    (the same distribution of draws); with larger B it trades the K sequential,
    memory-bound mat-vecs of k-means++ for SEEDING_ROUNDS compute-bound matmuls (the idea
    of k-means||, Bahmani et al. 2012, drawing B per round). The noise comes from the CPU
    generator, one [S] draw per round copied to the device, so a seed gives the same
    draws on any device.
    """
    S, device = x_SD.shape[0], x_SD.device
    norm_S = x_SD.pow(2).sum(1)
    taken_S = torch.zeros(S, dtype=torch.bool, device=device)
    nearest_S = torch.full((S,), float("inf"), dtype=x_SD.dtype, device=device)

    def absorb(new_B: torch.Tensor) -> None:
        """Mark new centres taken; lower D^2 to them, in row chunks of at most max_chunk_bytes."""
        taken_S[new_B] = True
        centre_BD = x_SD[new_B]
        centre_sq_B = centre_BD.pow(2).sum(1)
        rows = _rows_per_chunk(max_chunk_bytes, new_B.numel(), x_SD.element_size())
        for start in range(0, S, rows):
            score_RB = torch.addmm(centre_sq_B, x_SD[start : start + rows], centre_BD.T, alpha=-2.0)
            dist_R = (score_RB.min(1).values + norm_S[start : start + rows]).clamp_(min=0.0)
            torch.minimum(nearest_S[start : start + rows], dist_R, out=nearest_S[start : start + rows])

    first_1 = (torch.rand(1, generator=generator, dtype=torch.float64) * S).long().clamp_(max=S - 1).to(device)
    chosen = [first_1]
    absorb(first_1)
    per_round = -(-(k - 1) // SEEDING_ROUNDS)
    remaining = k - 1
    while remaining > 0:
        draws = min(per_round, remaining)
        uniform_S = torch.rand(S, generator=generator, dtype=torch.float64).clamp_(min=1e-300).to(device)
        gumbel_S = -torch.log(-torch.log(uniform_S))
        weight_S = nearest_S.double()
        # Points at D^2 = 0 that are not centres (duplicates of one) rank after every point
        # with weight, in random order (the original's uniform fallback); centres never again.
        key_S = torch.where(weight_S > 0, weight_S.log() + gumbel_S, gumbel_S - 1e6)
        key_S.masked_fill_(taken_S, float("-inf"))
        new_B = torch.topk(key_S, draws).indices
        chosen.append(new_B)
        remaining -= draws
        if remaining > 0:
            absorb(new_B)
    return x_SD[torch.cat(chosen)].clone()


def _seed_centroids(
    x_ND: torch.Tensor,
    n_items: int,
    k: int,
    generator: torch.Generator,
    seed_sample_per_code: int,
    max_chunk_bytes: int,
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """Initial centroids: exact k-means++ for small problems, else k-means++ on a sample.

    The sample is drawn over all N items by the CPU generator (so every rank draws the
    same one), in item order; when sharded each rank contributes its sampled rows and
    every rank then seeds from the same gathered sample.
    """
    sharded = _world_size(group) > 1
    if not sharded and n_items * k <= EXACT_SEEDING_MAX:
        return kmeans_plus_plus(x_ND, k, generator)
    sample_size = min(n_items, max(k, seed_sample_per_code * k))
    if sample_size == n_items:
        sample_S = torch.arange(n_items)
    else:
        sample_S = torch.sort(torch.randperm(n_items, generator=generator)[:sample_size]).values
    if sharded:
        # This rank's items are [first, first + n_local) of the global order.
        n_local = torch.tensor([x_ND.shape[0]], device=x_ND.device)
        sizes_W, _ = _all_gather_rows(n_local, group)
        first = int(sizes_W[: dist.get_rank(group)].sum())
        mine_S = sample_S[(sample_S >= first) & (sample_S < first + x_ND.shape[0])] - first
        x_SD, _ = _all_gather_rows(x_ND[mine_S.to(x_ND.device)], group)
    else:
        x_SD = x_ND if sample_size == n_items else x_ND[sample_S.to(x_ND.device)]
    centroids_KD = _kmeans_plus_plus_on_device(x_SD, k, generator, max_chunk_bytes)
    if sharded:
        # Same data and the same ops give the same centres everywhere; the broadcast makes
        # that hold even across differing hardware.
        dist.broadcast(centroids_KD, src=dist.get_global_rank(group, 0), group=group)
    return centroids_KD


def centroid_means(
    x_ND: torch.Tensor, assign_N: torch.Tensor, k: int, *, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Mean of each cluster's items ([K, D]); sums and counts all-reduced over the group's ranks."""
    counts_K = _all_reduce_sum(torch.bincount(assign_N, minlength=k), group).clamp(min=1).unsqueeze(1)
    if not x_ND.is_cuda:
        sums_KD = torch.zeros(k, x_ND.shape[1], dtype=x_ND.dtype, device=x_ND.device).index_add_(0, assign_N, x_ND)
        return _all_reduce_sum(sums_KD, group) / counts_K
    # On CUDA index_add_ accumulates with atomics (run-to-run float noise would break seeded
    # determinism); a one-hot matmul in fixed-size row chunks is deterministic and bounded in memory.
    sums_KD = torch.zeros(k, x_ND.shape[1], dtype=x_ND.dtype, device=x_ND.device)
    chunk = max(1, (1 << 26) // k)
    for start in range(0, x_ND.shape[0], chunk):
        onehot_NK = torch.nn.functional.one_hot(assign_N[start : start + chunk], k).to(x_ND.dtype)
        sums_KD += onehot_NK.T @ x_ND[start : start + chunk]
    return _all_reduce_sum(sums_KD, group) / counts_K


def balanced_kmeans(
    x_ND: torch.Tensor,
    k: int,
    iters: int,
    generator: torch.Generator,
    *,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    seed_sample_per_code: int = SEED_SAMPLE_PER_CODE,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced k-means: (assign_N, centroids_KD), every cluster holds exactly floor/ceil(N / k) items.

    Lloyd iterations with the balanced assignment step; stops early when the assignment
    no longer changes. Centroids returned are the means of the returned assignment.
    `generator` is a CPU torch.Generator (seeding), so results depend only on it.
    max_chunk_bytes bounds the scores held at once (balanced_assign); with a process
    group of W > 1 ranks, x_ND is this rank's slice of the items (see the module docstring).
    """
    _check_points(x_ND)
    sharded = _world_size(group) > 1
    n_items = x_ND.shape[0]
    if sharded:
        n_items = int(_all_reduce_sum(torch.tensor([n_items], device=x_ND.device), group))
    if k < 1:
        raise ValueError(f"k={k}: expected at least one cluster")
    if n_items < k:
        raise ValueError(
            f"{n_items} items cannot fill a balanced codebook of {k} codes (each code needs at least one item): "
            f"lower tokenizer.codebook_size to at most {n_items}"
        )
    if iters < 0:
        raise ValueError(f"iters={iters}: expected >= 0")
    centroids_KD = _seed_centroids(x_ND, n_items, k, generator, seed_sample_per_code, max_chunk_bytes, group)
    assign_N = balanced_assign(x_ND, centroids_KD, max_chunk_bytes=max_chunk_bytes, group=group)
    for _ in range(iters):
        centroids_KD = centroid_means(x_ND, assign_N, k, group=group)
        new_assign_N = balanced_assign(x_ND, centroids_KD, max_chunk_bytes=max_chunk_bytes, group=group)
        changed_1 = torch.tensor([0 if torch.equal(new_assign_N, assign_N) else 1], device=x_ND.device)
        if int(_all_reduce_sum(changed_1, group)) == 0:  # every rank's items stayed put
            break
        assign_N = new_assign_N
    return assign_N, centroid_means(x_ND, assign_N, k, group=group)


def residual_kmeans(
    x_ND: torch.Tensor,
    levels: int,
    codebook_size: int,
    iters: int,
    seed: int,
    device: str | torch.device = "cpu",
    *,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Residual quantisation: level l clusters what levels < l left unexplained.

    Returns codes_NL (int64, on CPU) and one codebook [K, D] per level (on CPU), so that
    x ~= sum_l codebooks[l][codes_NL[:, l]]. With a process group of W > 1 ranks, x_ND is
    this rank's slice of the items, codes_NL its items' codes, and the codebooks are the
    same on every rank.
    """
    _check_points(x_ND)
    if levels < 1:
        raise ValueError(f"levels={levels}: expected >= 1")
    generator = torch.Generator().manual_seed(seed)
    residual_ND = x_ND.detach().to(device=device, dtype=torch.float32).clone()
    codes, codebooks = [], []
    bar = tqdm(range(levels), desc="residual k-means", disable=progress_disabled(), dynamic_ncols=True)
    for level in bar:
        assign_N, centroids_KD = balanced_kmeans(
            residual_ND, codebook_size, iters, generator, max_chunk_bytes=max_chunk_bytes, group=group
        )
        codes.append(assign_N)
        codebooks.append(centroids_KD.cpu())
        residual_ND = residual_ND - centroids_KD[assign_N]
        # Mean over all items (all ranks): a sum and a count, all-reduced.
        sum_sq = residual_ND.pow(2).sum().double()
        stats_2 = _all_reduce_sum(torch.stack([sum_sq, torch.full_like(sum_sq, residual_ND.shape[0])]), group)
        bar.set_postfix(level=level, residual_mse=f"{float(stats_2[0] / stats_2[1]):.4f}")
    return torch.stack(codes, dim=1).cpu(), codebooks
