"""onerec.data.sampler: the training order of every data-parallel rank, step by step."""

import itertools
import math

import pytest
import torch

from onerec.data.sampler import DistributedBatchSampler, ranks_left_empty


def _steps(sampler: DistributedBatchSampler, start: int, count: int) -> list[torch.Tensor]:
    return list(itertools.islice(sampler.batches_from(start), count))


@pytest.mark.parametrize("num_examples, batch_size, world_size", [(50, 8, 1), (50, 8, 2), (53, 4, 3), (7, 8, 4), (1, 1, 1)])
def test_every_example_exactly_once_per_epoch_across_ranks(num_examples, batch_size, world_size):
    samplers = [DistributedBatchSampler(num_examples, batch_size, seed=5, rank=r, world_size=world_size)
                for r in range(world_size)]
    steps = samplers[0].steps_per_epoch
    assert steps == math.ceil(num_examples / (batch_size * world_size))
    for epoch in range(2):
        per_rank = [_steps(s, epoch * steps, steps) for s in samplers]
        union = torch.cat([torch.cat(batches) for batches in per_rank])
        assert sorted(union.tolist()) == list(range(num_examples))
        for step in range(steps):
            # one global batch = the ranks' slices side by side, in rank order
            global_batch = torch.cat([batches[step] for batches in per_rank])
            assert len(global_batch) <= batch_size * world_size
            assert all(len(batches[step]) <= batch_size for batches in per_rank)
        assert all(b.dtype == torch.int64 for batches in per_rank for b in batches)


def test_resume_at_any_step_gives_the_remaining_batches():
    sampler = DistributedBatchSampler(41, 4, seed=3, rank=1, world_size=2)
    uninterrupted = _steps(sampler, 0, 3 * sampler.steps_per_epoch)
    for start in range(len(uninterrupted)):
        # a fresh sampler (a restarted process) needs only the step counter
        resumed = _steps(DistributedBatchSampler(41, 4, seed=3, rank=1, world_size=2), start, len(uninterrupted) - start)
        assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[start:], strict=True))


def _global_steps(num_examples, global_batch, seed, world_size, start, count):
    """Each step's examples over all ranks, in rank order."""
    samplers = [DistributedBatchSampler(num_examples, 1, seed, r, world_size, global_batch=global_batch)
                for r in range(world_size)]
    per_rank = [_steps(s, start, count) for s in samplers]
    return [torch.cat([rank[i] for rank in per_rank]) for i in range(count)]


@pytest.mark.parametrize("saved_world, resumed_world", [(2, 1), (1, 2), (2, 3), (4, 2), (3, 5)])
def test_a_resume_on_another_world_size_takes_the_uninterrupted_global_batches(saved_world, resumed_world):
    """The rule for a world-size change: the global batch stays the run's, so step s is global
    batch s whatever the ranks, and every epoch takes each example once across the resume."""
    num_examples, global_batch, seed, epochs = 53, 12, 5, 3
    steps = DistributedBatchSampler(num_examples, 1, seed, global_batch=global_batch).steps_per_epoch
    assert steps == 5  # 12, 12, 12, 12, 5
    uninterrupted = _global_steps(num_examples, global_batch, seed, saved_world, 0, epochs * steps)
    for resume_at in range(epochs * steps):
        resumed = _global_steps(num_examples, global_batch, seed, resumed_world, resume_at, epochs * steps - resume_at)
        assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[resume_at:], strict=True))
        taken = uninterrupted[:resume_at] + resumed
        for epoch in range(epochs):
            assert sorted(torch.cat(taken[epoch * steps : (epoch + 1) * steps]).tolist()) == list(range(num_examples))


def test_global_batch_defaults_to_batch_size_per_rank_and_splits_ceil_per_rank():
    default = DistributedBatchSampler(50, 8, seed=1, rank=1, world_size=2)
    explicit = DistributedBatchSampler(50, 3, seed=1, rank=1, world_size=2, global_batch=16)
    assert default.global_batch == explicit.global_batch == 16
    assert all(torch.equal(a, b) for a, b in zip(default.epoch_batches(0), explicit.epoch_batches(0), strict=True))
    uneven = [DistributedBatchSampler(50, 1, seed=1, rank=r, world_size=3, global_batch=16) for r in range(3)]
    assert [len(s.epoch_batches(0)[0]) for s in uneven] == [6, 6, 4] and uneven[0].batch_size == 6
    assert not ranks_left_empty(16, 3) and not ranks_left_empty(4, 4) and not ranks_left_empty(10, 4)
    assert ranks_left_empty(9, 4) and ranks_left_empty(3, 4)  # 3, 3, 3, 0 and 1, 1, 1, 0
    with pytest.raises(ValueError, match="global_batch=0"):
        DistributedBatchSampler(50, 8, seed=1, global_batch=0)


def test_epochs_and_seeds_give_different_orders():
    sampler = DistributedBatchSampler(100, 10, seed=1)
    assert not torch.equal(sampler.permutation(0), sampler.permutation(1))
    assert not torch.equal(sampler.permutation(0), DistributedBatchSampler(100, 10, seed=2).permutation(0))


def test_order_is_todays_int64_permutation_sliced_by_rank():
    """The order before the sampler existed: an int64 randperm per epoch, the rank's slice of
    each global batch. Checkpoints and loss curves of earlier runs depend on it."""
    num_examples, batch_size, world_size, seed, epoch = 103, 8, 3, 7, 4
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_examples, generator=generator)
    for rank in range(world_size):
        expected = []
        for start in range(0, num_examples, batch_size * world_size):
            chunk = order[start : start + batch_size * world_size]
            per_rank = math.ceil(len(chunk) / world_size)
            expected.append(chunk[rank * per_rank : (rank + 1) * per_rank])
        got = DistributedBatchSampler(num_examples, batch_size, seed, rank, world_size).epoch_batches(epoch)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("n", [1, 2, 17, 1000, 65_537, 3_000_001])
def test_int32_permutation_equals_the_int64_one(n):
    """Why the sampler may hold its permutation as int32: CPU randperm makes the same draws."""
    wide = torch.randperm(n, generator=torch.Generator().manual_seed(11))
    narrow = torch.randperm(n, generator=torch.Generator().manual_seed(11), dtype=torch.int32)
    assert torch.equal(wide, narrow.long())


def test_permutation_is_int32_when_the_examples_fit():
    assert DistributedBatchSampler(1000, 10, seed=0).permutation(0).dtype == torch.int32


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least one example"):
        DistributedBatchSampler(0, 4, seed=0)
    with pytest.raises(ValueError, match="rank"):
        DistributedBatchSampler(10, 4, seed=0, rank=2, world_size=2)
