"""Balanced k-means and residual quantisation (OneRec Algorithm 1).

Shape legend: N items, D dim, K clusters, U items still unassigned, S seeding sample.
"""

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onerec.tokenizer import rq_kmeans
from onerec.tokenizer.rq_kmeans import balanced_assign, balanced_kmeans, residual_kmeans


def _points(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 150), k=st.integers(1, 40), d=st.integers(1, 8), seed=st.integers(0, 1000))
def test_cluster_sizes_are_exactly_floor_or_ceil(n, k, d, seed):
    k = min(k, n)
    x = _points(n, d, seed)
    assign, centroids = balanced_kmeans(x, k, iters=4, generator=torch.Generator().manual_seed(seed))
    sizes = torch.bincount(assign, minlength=k)
    assert assign.shape == (n,) and assign.dtype == torch.int64
    assert int(assign.min()) >= 0 and int(assign.max()) < k
    assert set(sizes.tolist()) <= {n // k, math.ceil(n / k)}
    assert int((sizes == math.ceil(n / k)).sum()) == (n % k if n % k else k)  # exactly N mod K big clusters
    assert centroids.shape == (k, d)
    # Centroids are the means of the returned assignment.
    for c in range(k):
        assert torch.allclose(centroids[c], x[assign == c].mean(0), atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 80), k=st.integers(2, 12), seed=st.integers(0, 1000))
def test_balanced_assign_holds_sizes_even_with_duplicate_points_and_centroids(n, k, seed):
    k = min(k, n)
    x = _points(n, 3, seed).round()  # many duplicate rows
    centroids = x[:1].repeat(k, 1)  # all centroids identical: every distance ties
    assign = balanced_assign(x, centroids)
    sizes = torch.bincount(assign, minlength=k)
    assert set(sizes.tolist()) <= {n // k, math.ceil(n / k)}


def test_balanced_assign_prefers_each_items_nearest_cluster_when_sizes_allow():
    x = torch.tensor([[0.0], [0.1], [10.0], [10.1], [20.0], [20.1]])
    centroids = torch.tensor([[20.0], [0.0], [10.0]])
    assert balanced_assign(x, centroids).tolist() == [1, 1, 2, 2, 0, 0]


def test_balanced_assign_moves_the_farthest_item_when_a_cluster_is_over_full():
    # Three items want centroid 0 (capacity 2 for N=4, K=2): the farthest of them, 2.0, moves.
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    centroids = torch.tensor([[0.0], [10.0]])
    assert balanced_assign(x, centroids).tolist() == [0, 0, 1, 1]


def test_finds_well_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0], [0.0, -10.0]])
    x = torch.cat([c + 0.1 * torch.randn(15, 2, generator=g) for c in centers])
    assign, _ = balanced_kmeans(x, 4, iters=10, generator=torch.Generator().manual_seed(3))
    blocks = assign.view(4, 15)
    assert all(len(set(block.tolist())) == 1 for block in blocks)  # each true cluster gets one code
    assert len(set(assign.tolist())) == 4


def test_same_generator_seed_gives_the_same_result():
    x = _points(200, 5, 0)
    a1, c1 = balanced_kmeans(x, 7, 5, torch.Generator().manual_seed(11))
    a2, c2 = balanced_kmeans(x, 7, 5, torch.Generator().manual_seed(11))
    assert torch.equal(a1, a2) and torch.equal(c1, c2)


def test_refuses_a_codebook_larger_than_the_catalogue():
    with pytest.raises(ValueError, match="codebook_size to at most 5"):
        balanced_kmeans(torch.randn(5, 3), 8, 3, torch.Generator())


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.randn(4), r"\[N, D\]"),
        (torch.tensor([[float("nan"), 0.0], [1.0, 1.0]]), "NaN"),
        (torch.ones(4, 2, dtype=torch.long), "floating-point"),
    ],
)
def test_rejects_bad_vectors(bad, match):
    with pytest.raises(ValueError, match=match):
        residual_kmeans(bad, levels=1, codebook_size=2, iters=1, seed=0)


def test_residual_codes_shape_dtype_range_and_balance():
    x = _points(300, 12, 1)
    codes, books = residual_kmeans(x, levels=3, codebook_size=16, iters=5, seed=0)
    assert codes.shape == (300, 3) and codes.dtype == torch.int64 and codes.device.type == "cpu"
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    assert len(books) == 3 and all(b.shape == (16, 12) for b in books)
    for level in range(3):
        sizes = torch.bincount(codes[:, level], minlength=16)
        assert set(sizes.tolist()) <= {18, 19}  # 300 / 16 = 18.75


def test_reconstruction_error_decreases_with_every_level():
    x = _points(400, 16, 0)
    codes, books = residual_kmeans(x, levels=4, codebook_size=8, iters=8, seed=0)
    errors, recon = [(x**2).sum(-1).mean().item()], torch.zeros_like(x)
    for level in range(4):
        recon = recon + books[level][codes[:, level]]
        errors.append((x - recon).pow(2).sum(-1).mean().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_residual_kmeans_is_deterministic_given_the_seed_and_varies_with_it():
    x = _points(120, 6, 2)
    c1, _ = residual_kmeans(x, 2, 6, 5, seed=4)
    c2, _ = residual_kmeans(x, 2, 6, 5, seed=4)
    c3, _ = residual_kmeans(x, 2, 6, 5, seed=5)
    assert torch.equal(c1, c2)
    assert not torch.equal(c1, c3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_with_the_same_balance():
    x = _points(500, 32, 0)
    codes, books = residual_kmeans(x, 2, 16, 5, seed=0, device="cuda")
    assert codes.device.type == "cpu" and books[0].device.type == "cpu"
    for level in range(2):
        assert set(torch.bincount(codes[:, level], minlength=16).tolist()) <= {31, 32}


# ----------------------------------------------------------------------- chunked assignment
def _reference_balanced_assign(x_ND: torch.Tensor, centroids_KD: torch.Tensor) -> torch.Tensor:
    """The unchunked balanced assignment as it was before chunking (the whole [N, K] score
    matrix, gathered rows per round): the oracle the chunked one must reproduce."""
    N, K = x_ND.shape[0], centroids_KD.shape[0]
    score_NK = torch.addmm(centroids_KD.pow(2).sum(1), x_ND, centroids_KD.T, alpha=-2.0)
    norm_N = x_ND.pow(2).sum(1)
    base, extra = divmod(N, K)
    room_K = torch.full((K,), base, dtype=torch.long)
    if extra:
        demand_K = torch.bincount(score_NK.argmin(1), minlength=K)
        room_K[torch.sort(demand_K, descending=True, stable=True).indices[:extra]] += 1
    assign_N = torch.full((N,), -1, dtype=torch.long)
    open_U = torch.arange(N)
    for _ in range(K + 1):
        if open_U.numel() == 0:
            break
        if open_U.numel() == N:
            best_U, choice_U = score_NK.min(1)
        else:
            best_U, choice_U = score_NK[open_U].masked_fill_((room_K == 0).unsqueeze(0), float("inf")).min(1)
        best_d_U = best_U + norm_N[open_U]
        by_dist = torch.sort(best_d_U, stable=True).indices
        order = by_dist[torch.sort(choice_U[by_dist], stable=True).indices]
        cluster_sorted = choice_U[order]
        counts_K = torch.bincount(cluster_sorted, minlength=K)
        rank = torch.arange(order.numel()) - (torch.cumsum(counts_K, 0) - counts_K)[cluster_sorted]
        winners = order[rank < room_K[cluster_sorted]]
        assign_N[open_U[winners]] = choice_U[winners]
        room_K -= torch.bincount(choice_U[winners], minlength=K)
        keep_U = torch.ones(open_U.numel(), dtype=torch.bool)
        keep_U[winners] = False
        open_U = open_U[keep_U]
    return assign_N


@contextlib.contextmanager
def _sampled_seeding():
    """Force the large-problem seeding (sampled, on the device) at any size."""
    old = rq_kmeans.EXACT_SEEDING_MAX
    rq_kmeans.EXACT_SEEDING_MAX = 0
    try:
        yield
    finally:
        rq_kmeans.EXACT_SEEDING_MAX = old


def _integer_points(n: int, d: int, seed: int, spread: int = 3) -> torch.Tensor:
    """Small-integer coordinates: every score is exact in fp32 whatever the GEMM's summation
    order, so chunked and unchunked scores are bit-equal and any difference is the greedy's.
    Such points also tie a lot, which exercises every tie-break."""
    return torch.randint(-spread, spread + 1, (n, d), generator=torch.Generator().manual_seed(seed)).float()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 48), d=st.integers(1, 16), seed=st.integers(0, 10_000))
def test_assignment_equals_the_unchunked_one_where_the_score_matrix_fits(n, k, d, seed):
    # Float inputs, default budget: the shipped sizes' path, which must be bit-identical.
    k = min(k, n)
    x = _points(n, d, seed)
    centroids = x[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]] + 0.1
    assert torch.equal(balanced_assign(x, centroids), _reference_balanced_assign(x, centroids))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300), k=st.integers(1, 48), d=st.integers(1, 8), seed=st.integers(0, 10_000),
    rows=st.integers(1, 64),
)
def test_chunked_assignment_equals_the_unchunked_one(n, k, d, seed, rows):
    # Budgets of 1..64 score rows force the chunked path (scores recomputed per round, in
    # chunks that split the rows anywhere); on exact-arithmetic inputs it must give exactly
    # the unchunked greedy's assignment, ties included.
    k = min(k, n)
    x = _integer_points(n, d, seed)
    centroids = _integer_points(k, d, seed + 1)
    chunked = balanced_assign(x, centroids, max_chunk_bytes=rows * k * 4)
    assert torch.equal(chunked, _reference_balanced_assign(x, centroids))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 400), k=st.integers(1, 60), d=st.integers(1, 12), seed=st.integers(0, 10_000),
    budget=st.integers(1, 20_000),
)
def test_chunked_assignment_sizes_are_exactly_floor_or_ceil(n, k, d, seed, budget):
    k = min(k, n)
    x = _points(n, d, seed) * 10.0 ** (seed % 5 - 2)  # scales 0.01..100: rounding differs everywhere
    centroids = _points(k, d, seed + 1) * 10.0 ** (seed % 5 - 2)
    sizes = torch.bincount(balanced_assign(x, centroids, max_chunk_bytes=budget), minlength=k)
    assert set(sizes.tolist()) <= {n // k, math.ceil(n / k)}
    assert int((sizes == math.ceil(n / k)).sum()) == (n % k if n % k else k)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 150), k=st.integers(2, 30), seed=st.integers(0, 1000), budget=st.integers(1, 4096))
def test_balanced_kmeans_on_the_scalable_path_keeps_exact_sizes(n, k, seed, budget):
    k = min(k, n)
    x = _points(n, 4, seed)
    with _sampled_seeding():
        assign, centroids = balanced_kmeans(x, k, 3, torch.Generator().manual_seed(seed), max_chunk_bytes=budget)
    sizes = torch.bincount(assign, minlength=k)
    assert set(sizes.tolist()) <= {n // k, math.ceil(n / k)}
    for c in range(k):
        assert torch.allclose(centroids[c], x[assign == c].mean(0), atol=1e-5)


def _peak_allocated_bytes(fn) -> int:
    """Peak of the bytes torch's CPU allocator held during fn(), above what it held before.

    Read from the profiler's allocation events (each carries its size, + or -), so it
    counts every tensor fn() creates, including temporaries freed before it returns.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            sizes.append((event.start_time_ns, event.extra_fields.alloc_size))
    held = peak = 0
    for _, size in sorted(sizes):
        held += size
        peak = max(peak, held)
    return peak


def test_peak_memory_of_one_assignment_is_bounded_by_the_chunk():
    # [N, K] = 20000 x 512 fp32 is 41 MB; with an 8 MB budget one assignment may hold the
    # 8 MB chunk plus O(N) bookkeeping (per-item distance, choice, sort orders), not [N, K].
    n, k, budget = 20_000, 512, 8 * 2**20
    x = _points(n, 16, 0)
    centroids = _points(k, 16, 1)
    bound = budget + 160 * n  # 160 bytes per item: ~20 int64/fp32 vectors of length N
    peak = _peak_allocated_bytes(lambda: balanced_assign(x, centroids, max_chunk_bytes=budget))
    assert peak <= bound, f"peak {peak / 2**20:.1f} MB > bound {bound / 2**20:.1f} MB"
    # The unchunked algorithm holds the whole score matrix (and a gathered copy): it fails the bound.
    reference_peak = _peak_allocated_bytes(lambda: _reference_balanced_assign(x, centroids))
    assert reference_peak > n * k * 4 > bound
    assert torch.equal(
        torch.bincount(balanced_assign(x, centroids, max_chunk_bytes=budget), minlength=k).sort().values,
        torch.bincount(_reference_balanced_assign(x, centroids), minlength=k).sort().values,
    )


# ------------------------------------------------------------------------------- seeding
def test_small_problems_keep_the_exact_sequential_seeding():
    # The shipped data sets are far below EXACT_SEEDING_MAX: the original k-means++ runs
    # and consumes the generator exactly as before.
    x = _points(500, 8, 0)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    seeded = rq_kmeans._seed_centroids(x, 500, 16, g1, 64, rq_kmeans.DEFAULT_CHUNK_BYTES, None)
    assert torch.equal(seeded, rq_kmeans.kmeans_plus_plus(x, 16, g2))


@pytest.mark.parametrize("k", [1, 2, 40, 65, 200, 300])
def test_device_seeding_picks_distinct_sample_points_deterministically(k):
    x = _points(300, 5, 3)
    c1 = rq_kmeans._kmeans_plus_plus_on_device(x, k, torch.Generator().manual_seed(1))
    c2 = rq_kmeans._kmeans_plus_plus_on_device(x, k, torch.Generator().manual_seed(1))
    assert torch.equal(c1, c2) and c1.shape == (k, 5)
    rows = {tuple(row.tolist()) for row in c1}
    assert len(rows) == k and rows <= {tuple(row.tolist()) for row in x}  # k distinct points of x


def test_device_seeding_with_duplicate_points_still_gives_k_distinct_indices():
    # 10 distinct points, each 5 times: after 10 centres every remaining D^2 is 0, and the
    # draw must still pick points that are not centres yet (the uniform fallback).
    x = _points(10, 3, 0).repeat(5, 1)
    centres = rq_kmeans._kmeans_plus_plus_on_device(x, 30, torch.Generator().manual_seed(0))
    assert len({tuple(row.tolist()) for row in centres}) == 10  # every distinct point is a centre


def test_device_seeding_reads_nothing_back_to_the_host(monkeypatch):
    # No per-centre .item()/int()/bool()/.cpu(): every draw stays a device tensor.
    def refuse(*args, **kwargs):
        raise AssertionError("host read-back during seeding")

    x = _points(2000, 8, 0)
    for name in ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    centres = rq_kmeans._kmeans_plus_plus_on_device(x, 200, torch.Generator().manual_seed(0), max_chunk_bytes=4096)
    monkeypatch.undo()
    assert centres.shape == (200, 8)


def test_sampled_seeding_spreads_centres_over_separated_clusters():
    # 8 tight, far-apart clusters of 400 points, k = 8, one centre per round: D^2 sampling
    # all but guarantees one centre per cluster, and Lloyd then recovers them exactly.
    g = torch.Generator().manual_seed(0)
    centers = 50.0 * torch.randn(8, 6, generator=g)
    x = (centers.repeat_interleave(400, 0) + 0.1 * torch.randn(3200, 6, generator=g))
    hits = 0
    for seed in range(10):
        seeds = rq_kmeans._seed_centroids(x, 3200, 8, torch.Generator().manual_seed(seed), 64, 2**20, None)
        nearest = torch.cdist(seeds, centers).argmin(1)
        hits += len(set(nearest.tolist())) == 8
    assert hits >= 8
    with _sampled_seeding():
        assign, _ = balanced_kmeans(x, 8, 10, torch.Generator().manual_seed(0), max_chunk_bytes=2**16)
    assert all(len(set(block.tolist())) == 1 for block in assign.view(8, 400))


def test_residual_kmeans_chunked_matches_unchunked_quality():
    # Same data, the scalable path forced (16 KB chunks, sampled seeding) vs the exact one:
    # deterministic, exact sizes at every level, reconstruction error within a few percent.
    x = _points(1200, 8, 5)

    def error(codes, books):
        recon = sum(book[codes[:, level]] for level, book in enumerate(books))
        return float((x - recon).pow(2).sum(-1).mean())

    exact = residual_kmeans(x, 3, 16, 10, seed=0)
    with _sampled_seeding():
        chunked = residual_kmeans(x, 3, 16, 10, seed=0, max_chunk_bytes=2**14)
        again = residual_kmeans(x, 3, 16, 10, seed=0, max_chunk_bytes=2**14)
    assert torch.equal(chunked[0], again[0])  # seeded: the same codes every time
    for level in range(3):
        assert set(torch.bincount(chunked[0][:, level], minlength=16).tolist()) == {75}
    assert error(*chunked) <= 1.05 * error(*exact)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chunked_path_runs_on_cuda_and_matches_on_exact_inputs():
    x = _integer_points(3000, 8, 0)
    centroids = _integer_points(64, 8, 1)
    on_gpu = balanced_assign(x.cuda(), centroids.cuda(), max_chunk_bytes=64 * 64 * 4)
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), _reference_balanced_assign(x, centroids))
    centres = rq_kmeans._kmeans_plus_plus_on_device(x.cuda(), 64, torch.Generator().manual_seed(0))
    assert centres.device.type == "cuda"
    codes, _ = residual_kmeans(_points(5000, 16, 0), 2, 64, 3, seed=0, device="cuda", max_chunk_bytes=2**16)
    for level in range(2):
        assert set(torch.bincount(codes[:, level], minlength=64).tolist()) <= {78, 79}
