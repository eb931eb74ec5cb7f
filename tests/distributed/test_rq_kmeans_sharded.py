"""Balanced residual k-means sharded over two real gloo processes.

Each rank holds a contiguous, uneven slice of the items (rank 0 the first 40%); the
assignment proposals are all-gathered and centroid sums and counts all-reduced. On
exact-arithmetic inputs (small-integer coordinates: every score and sum is exact in fp32
whatever the reduction order) the sharded result must be exactly the single-process one:
the balanced assignment, on both the dense and the chunked path, and a whole balanced
k-means level with sampled seeding (the sample spans both shards). On float data,
residual k-means keeps exact global cluster sizes, the same codebook on both ranks, and
the single-process reconstruction error within a few percent.

Shape legend: N items, D dim, K clusters, L levels, n items of one rank.

The workers are this file run as a script (two subprocesses joined by env:// rendezvous);
they write their results with torch.save and the test compares them here.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path

import pytest
import torch

WORLD = 2




def _integer_points(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randint(-3, 4, (n, d), generator=torch.Generator().manual_seed(seed)).float()


def _float_points(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(12, d, generator=g)
    return centres[torch.randint(12, (n,), generator=g)] + torch.randn(n, d, generator=g)


def _shard(x_ND: torch.Tensor, rank: int) -> torch.Tensor:
    split = (2 * x_ND.shape[0]) // 5  # uneven on purpose: ranks hold different counts
    return x_ND[:split] if rank == 0 else x_ND[split:]


@contextlib.contextmanager
def _sampled_seeding():
    """Single-process runs take the seeding a sharded run always takes (sampled, on device)."""
    from onerec.tokenizer import rq_kmeans

    old = rq_kmeans.EXACT_SEEDING_MAX
    rq_kmeans.EXACT_SEEDING_MAX = 0
    try:
        yield
    finally:
        rq_kmeans.EXACT_SEEDING_MAX = old


# Scenarios: (name, data, call); run sharded by the workers and whole by the test.
def _assign_inputs():
    return _integer_points(257, 4, 0), _integer_points(12, 4, 1)


def _kmeans_inputs():
    return _integer_points(2000, 3, 2)  # seeding samples 64 * 10 = 640 of the 2000 items


def _residual_inputs():
    return _float_points(600, 8, 3)


# ------------------------------------------------------------------------------ worker side
def _worker(out_dir: Path) -> None:
    import torch.distributed as dist

    from onerec.tokenizer.rq_kmeans import balanced_assign, balanced_kmeans, residual_kmeans

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://")
    rank, group = dist.get_rank(), dist.group.WORLD
    out = {}
    x, centroids = _assign_inputs()
    out["assign_dense"] = balanced_assign(_shard(x, rank), centroids, group=group)
    out["assign_chunked"] = balanced_assign(_shard(x, rank), centroids, max_chunk_bytes=5 * 12 * 4, group=group)
    x = _kmeans_inputs()
    out["kmeans"] = balanced_kmeans(_shard(x, rank), 10, 0, torch.Generator().manual_seed(5), group=group)
    out["kmeans_iters"] = balanced_kmeans(
        _shard(x, rank), 10, 4, torch.Generator().manual_seed(5), max_chunk_bytes=4096, group=group
    )
    out["residual"] = residual_kmeans(_shard(_residual_inputs(), rank), 2, 8, 5, seed=0, group=group)
    torch.save(out, out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ test side
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from distributed_helpers import free_port, run_ranks  # the test side only, not the workers

    out_dir = tmp_path_factory.mktemp("rq_kmeans")
    env_base = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "ONEREC_NO_PROGRESS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(WORLD),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    # A few seconds on idle cores; the generous limit only catches a hang, not a slow machine.
    return run_ranks(Path(__file__), out_dir, WORLD, env_base, timeout=600, what="sharded k-means")


@pytest.mark.parametrize("name, budget", [("assign_dense", None), ("assign_chunked", 5 * 12 * 4)])
def test_sharded_assignment_is_exactly_the_single_process_one(ranks, name, budget):
    from onerec.tokenizer.rq_kmeans import balanced_assign

    x, centroids = _assign_inputs()
    single = balanced_assign(x, centroids) if budget is None else balanced_assign(x, centroids, max_chunk_bytes=budget)
    assert ranks[0][name].numel() == _shard(x, 0).shape[0]
    assert torch.equal(torch.cat([ranks[0][name], ranks[1][name]]), single)


def test_sharded_balanced_kmeans_level_is_exactly_the_single_process_one(ranks):
    from onerec.tokenizer.rq_kmeans import balanced_kmeans

    with _sampled_seeding():
        single_assign, single_centroids = balanced_kmeans(_kmeans_inputs(), 10, 0, torch.Generator().manual_seed(5))
    (a0, c0), (a1, c1) = ranks[0]["kmeans"], ranks[1]["kmeans"]
    assert torch.equal(c0, c1) and torch.equal(c0, single_centroids)
    assert torch.equal(torch.cat([a0, a1]), single_assign)


def test_sharded_lloyd_iterations_keep_exact_sizes_and_one_codebook(ranks):
    (a0, c0), (a1, c1) = ranks[0]["kmeans_iters"], ranks[1]["kmeans_iters"]
    assert torch.equal(c0, c1)
    sizes = torch.bincount(torch.cat([a0, a1]), minlength=10)
    assert set(sizes.tolist()) == {200}
    x = _kmeans_inputs()
    assign = torch.cat([a0, a1])
    for c in range(10):
        assert torch.allclose(c0[c], x[assign == c].mean(0), atol=1e-5)


def test_sharded_residual_kmeans_matches_single_process_quality(ranks):
    from onerec.tokenizer.rq_kmeans import residual_kmeans

    x = _residual_inputs()
    (codes0, books0), (codes1, books1) = ranks[0]["residual"], ranks[1]["residual"]
    assert all(torch.equal(b0, b1) for b0, b1 in zip(books0, books1))
    codes_NL = torch.cat([codes0, codes1])
    for level in range(2):
        assert set(torch.bincount(codes_NL[:, level], minlength=8).tolist()) == {75}

    def error(codes, books):
        recon = sum(book[codes[:, level]] for level, book in enumerate(books))
        return float((x - recon).pow(2).sum(-1).mean())

    with _sampled_seeding():
        single = residual_kmeans(x, 2, 8, 5, seed=0)
    assert math.isclose(error(codes_NL, books0), error(*single), rel_tol=0.05)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
