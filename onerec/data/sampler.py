"""Which training examples each data-parallel rank takes at each step.

Shape legend: N examples, B examples of one rank at one step (the last global batch of an
epoch may leave a rank fewer, or none).

The order is a pure function of (seed, epoch) and the global batch G: epoch e is
`torch.randperm(N)` drawn from a generator seeded with seed * 100_003 + e, cut into global
batches of G examples, and rank r takes the r-th slice of each:

    permutation of epoch e:   [ global batch 0 | global batch 1 | ... | last (maybe short) ]
    one global batch:         [ rank 0 | rank 1 | ... | rank W-1 ]   ceil(len / W) each

G is batch_size x world_size by default. Step s is global batch s mod steps_per_epoch of epoch
s // steps_per_epoch, so a resumed run needs only the step counter to continue the same order,
on any rank.

Another number of ranks. steps_per_epoch = ceil(N / G) and the global batch of every step
depend on G only, never on W: passing `global_batch=G` keeps them when W changes, so a run
resumed on another number of ranks (the trainer passes the checkpoint's G) consumes exactly
the global batches the uninterrupted run would have, each split into W new slices. Within an
epoch no example is skipped or repeated, whatever step the world size changed at. When W does
not divide G, ranks take ceil(G / W) each in rank order and the last ones fewer, as in the
short last batch of an epoch (`ranks_left_empty` says whether some rank would get none).

Memory: the current epoch's permutation, N x 4 bytes when N fits in int32, plus one batch.
CPU `randperm` draws the same Fisher-Yates swaps whatever the output dtype and only stores
the result narrower (aten/src/ATen/native/TensorFactories.cpp, `randperm_cpu`), so the int32
permutation holds exactly the numbers of the int64 one (tests/unit/test_data_sampler.py checks
it): the order, and with it every loss of a run, is the one an int64 permutation gives.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch

INT32_MAX = 2**31 - 1


def ranks_left_empty(global_batch: int, world_size: int) -> bool:
    """Whether a full global batch split ceil(G / W) per rank leaves some rank no example."""
    return (world_size - 1) * math.ceil(global_batch / world_size) >= global_batch


class DistributedBatchSampler:
    """Example indices [B] (int64) of one data-parallel rank, step by step; see the module doc."""

    def __init__(
        self, num_examples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
        *, global_batch: Optional[int] = None,
    ) -> None:
        """`batch_size` examples per rank (G = batch_size x world_size), unless `global_batch`
        sets G itself (then each rank takes ceil(G / world_size) of it, and batch_size is ignored)."""
        if num_examples < 1:
            raise ValueError(f"a sampler needs at least one example, got num_examples={num_examples}")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size={batch_size}, rank={rank}, world_size={world_size}: expected "
                             "batch_size >= 1 and 0 <= rank < world_size")
        if global_batch is not None and global_batch < 1:
            raise ValueError(f"global_batch={global_batch}: expected >= 1")
        self.num_examples = num_examples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_batch = batch_size * world_size if global_batch is None else global_batch
        self.batch_size = math.ceil(self.global_batch / world_size)  # the largest slice of a rank
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
