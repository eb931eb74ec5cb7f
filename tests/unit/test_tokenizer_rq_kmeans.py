"""Balanced k-means and residual quantisation (OneRec Algorithm 1)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
