"""Recall/NDCG@K for one held-out item per user, on hand-made rankings."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onerec.inference.metrics import MetricAccumulator, hit_ranks, ranking_metrics

RANKED = torch.tensor(
    [
        [3, 1, 2, 0, 4, 5],  # target 1 at rank 1
        [0, 1, 2, 3, 4, 5],  # target 0 at rank 0
        [9, 8, 7, 6, 5, 4],  # target 4 at rank 5: outside K = 5
        [2, -1, -1, -1, -1, -1],  # dead beams (-1) never hit; target 7 absent
    ]
)
TARGET = torch.tensor([1, 0, 4, 7])


def test_hit_ranks():
    assert hit_ranks(RANKED, TARGET).tolist() == [1, 0, 5, 6]


def test_hand_made_metrics_are_exact():
    metrics = ranking_metrics(RANKED, TARGET, ks=[5, 1, 6])
    assert list(metrics) == ["recall@1", "ndcg@1", "recall@5", "ndcg@5", "recall@6", "ndcg@6"]
    assert metrics["recall@1"] == 0.25
    assert metrics["ndcg@1"] == 0.25
    assert metrics["recall@5"] == 0.5
    assert metrics["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1.0) / 4, abs=1e-12)
    assert metrics["recall@6"] == 0.75
    assert metrics["ndcg@6"] == pytest.approx((1 / math.log2(3) + 1.0 + 1 / math.log2(7)) / 4, abs=1e-12)


def test_accumulator_over_batches_equals_one_pass_and_state_sums_like_an_all_reduce():
    whole = ranking_metrics(RANKED, TARGET, ks=[1, 5])
    acc = MetricAccumulator([1, 5])
    acc.update(RANKED[:1], TARGET[:1])
    acc.update(RANKED[1:], TARGET[1:])
    assert acc.compute() == whole
    assert acc.state().dtype == torch.float64
    # exact integer counts: users hit at rank 0, 1, ..., 4, then the number of users
    assert acc.state().tolist() == [1, 1, 0, 0, 0, 4]

    # two "ranks" with half the users each; summing their states gives the global metrics
    rank0, rank1 = MetricAccumulator([1, 5]), MetricAccumulator([1, 5])
    rank0.update(RANKED[:2], TARGET[:2])
    rank1.update(RANKED[2:], TARGET[2:])
    reduced = MetricAccumulator([1, 5])
    reduced.load_state(rank0.state() + rank1.state())
    assert reduced.compute() == whole


def test_empty_accumulator_and_bad_inputs():
    assert MetricAccumulator([5]).compute() == {"recall@5": 0.0, "ndcg@5": 0.0}
    with pytest.raises(ValueError, match="K=10"):
        ranking_metrics(RANKED, TARGET, ks=[10])
    with pytest.raises(ValueError, match="targets"):
        ranking_metrics(RANKED, torch.tensor([1, 0, 4, -1]), ks=[5])
    with pytest.raises(ValueError, match="expected ranked items"):
        ranking_metrics(RANKED, TARGET[:2], ks=[5])
    with pytest.raises(ValueError, match="ks="):
        MetricAccumulator([])
    with pytest.raises(ValueError, match="state of shape"):
        MetricAccumulator([5]).load_state(torch.zeros(5))


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 8), K=st.integers(1, 8), seed=st.integers(0, 1000))
def test_metric_bounds_and_monotonicity(B, K, seed):
    g = torch.Generator().manual_seed(seed)
    ranked = torch.stack([torch.randperm(12, generator=g)[:K] for _ in range(B)])
    target = torch.randint(0, 12, (B,), generator=g)
    ks = list(range(1, K + 1))
    m = ranking_metrics(ranked, target, ks)
    for k in ks:
        assert 0.0 <= m[f"ndcg@{k}"] <= m[f"recall@{k}"] <= 1.0
        if k > 1:
            assert m[f"recall@{k}"] >= m[f"recall@{k - 1}"] and m[f"ndcg@{k}"] >= m[f"ndcg@{k - 1}"]
    # recall@K by brute force
    assert m[f"recall@{K}"] == pytest.approx(sum(int(t) in r for t, r in zip(target.tolist(), ranked.tolist())) / B)
