"""Where this process sits among the others, and DeepSpeed's expert-parallel process groups.

Imports nothing else of onerec.distributed, so deepspeed.py (the engine) and
expert_parallel.py (the dispatcher) both build on it and deepspeed.py on expert_parallel.py,
with no import going back. DeepSpeed's group registry is imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0



def group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel / expert-data-parallel groups of size ep."""
    return f"ep_size_{ep_size}"


def create_expert_parallel_groups(ep_size: int):
    """DeepSpeed's expert-parallel and expert-data-parallel groups for `ep_size`; (this rank's
    expert-parallel group, its rank in it). Idempotent: existing groups of that name are reused.

    Consecutive ranks form an expert-parallel group ([0, 1], [2, 3] for ep=2 on 4 ranks), the
    ranks at the same position of every group an expert-data-parallel group ([0, 2], [1, 3]).
    """
    from deepspeed.utils import groups

    groups._create_expert_and_data_parallel(ep_size)
    name = group_name(ep_size)
    return groups._get_expert_parallel_group(name), groups._get_expert_parallel_rank(name)


def expert_parallel_group(name: str):
    """The expert-parallel process group of this rank for a group name like 'ep_size_2'."""
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(name)


def expert_data_parallel_rank(name: str) -> int:
    """This rank's position among the ranks that hold the same experts (its expert-data-parallel
    group, [0, 2] and [1, 3] for ep=2 on 4 ranks): 0 on the first copy."""
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_rank(name)
