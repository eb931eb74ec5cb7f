"""Which training examples each data-parallel rank takes at each step.

Shape legend: N examples, B examples of one rank at one step (the last global batch of an
epoch may leave a rank fewer, or none).

The order is a pure function of (seed, epoch): epoch e is `torch.randperm(N)` drawn from a
generator seeded with seed * 100_003 + e, cut into global batches of batch_size x world_size
examples, and rank r takes the r-th slice of each:

    permutation of epoch e:   [ global batch 0 | global batch 1 | ... | last (maybe short) ]
    one global batch:         [ rank 0 | rank 1 | ... | rank W-1 ]   ceil(len / W) each

Step s is global batch s mod steps_per_epoch of epoch s // steps_per_epoch, so a resumed run
needs only the step counter to continue the same order, on any rank.

Memory: the current epoch's permutation, N x 4 bytes when N fits in int32, plus one batch.
CPU `randperm` draws the same Fisher-Yates swaps whatever the output dtype and only stores
the result narrower (aten/src/ATen/native/TensorFactories.cpp, `randperm_cpu`), so the int32
permutation holds exactly the numbers of the int64 one (tests/unit/test_data_sampler.py checks
it): the order, and with it every loss of a run, is the one an int64 permutation gives.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

INT32_MAX = 2**31 - 1


class DistributedBatchSampler:
    """Example indices [B] (int64) of one data-parallel rank, step by step; see the module doc."""

    def __init__(self, num_examples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if num_examples < 1:
            raise ValueError(f"a sampler needs at least one example, got num_examples={num_examples}")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size={batch_size}, rank={rank}, world_size={world_size}: expected "
                             "batch_size >= 1 and 0 <= rank < world_size")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = math.ceil(num_examples / self.global_batch)

    def permutation(self, epoch: int) -> torch.Tensor:
        """[N] every example index once, in epoch `epoch`'s order (int32 when N fits)."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        dtype = torch.int32 if self.num_examples <= INT32_MAX else torch.int64
        return torch.randperm(self.num_examples, generator=generator, dtype=dtype)

    def _rank_slice(self, order: torch.Tensor, step_in_epoch: int) -> torch.Tensor:
        """This rank's share [B] of global batch `step_in_epoch`, widened to int64 (O(batch))."""
        chunk = order[step_in_epoch * self.global_batch : (step_in_epoch + 1) * self.global_batch]
        per_rank = math.ceil(len(chunk) / self.world_size)
        return chunk[self.rank * per_rank : (self.rank + 1) * per_rank].to(torch.int64)

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """Every step's indices of `epoch` at once (tests and inspection; training iterates)."""
        order = self.permutation(epoch)
        return [self._rank_slice(order, step) for step in range(self.steps_per_epoch)]

    def batches_from(self, step: int) -> Iterator[torch.Tensor]:
        """Indices [B] for step `step`, `step + 1`, ... without end: the order of an
        uninterrupted run from step 0, whichever step it starts at."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        while True:
            order = self.permutation(epoch)  # the only O(N) buffer, replaced once per epoch
            for step_in_epoch in range(offset, self.steps_per_epoch):
                yield self._rank_slice(order, step_in_epoch)
            del order  # before the next epoch's is drawn: never two alive at once
            epoch, offset = epoch + 1, 0
