"""Optimizer state saved as fragments of whole parameters, by name, so that a checkpoint
written by N ranks loads on M ranks, under any ZeRO stage and expert-parallel size.

Shape legend: n elements of a parameter (its full, unsharded size), f elements of one fragment.

Where a rank's optimizer state sits depends on the layout of the job that wrote it:

    ZeRO 0          every rank holds the state of every parameter it holds, whole (torch's
                    AdamW keeps exp_avg, exp_avg_sq and step per parameter)
    ZeRO 1/2        the state of one flat fp32 buffer per param group, cut into one equal
                    partition per rank of the group's data-parallel group; a parameter may
                    straddle two partitions
    experts (ep>1)  an expert parameter on a rank is rows [ep_rank * E_local, ...) of the
                    full [E, ...] tensor; under ZeRO its groups are partitioned over the
                    expert-data-parallel group instead

None of that is in the file. Each rank saves, for every parameter (by its name in
model.named_parameters(), the keys of model.safetensors), the contiguous ranges of the
*flattened full parameter* whose state it holds:

    {"format": FORMAT,
     "params": {name: {"shape": [full shape],
                       "fragments": [{"start": s, "numel": f,
                                      "state": {"exp_avg": [f], "exp_avg_sq": [f], "step": scalar}}]}}}

ZeRO 1/2 fragments come from DeepSpeed's own map of each parameter onto its flat fp32
partition (`param._hp_mapping`: lp_fragment_address inside the parameter, hp_fragment_address
inside the partition; the map behind DeepSpeed's universal checkpoint and its
safe_get_full_optimizer_state); an expert parameter's fragment is moved by the offset of its
rows in the full tensor. Identical copies are saved once: under ZeRO 0 only the first copy
(rank 0 for dense parameters, the first rank of each expert-data-parallel group for experts)
writes; under ZeRO 1/2 every element's state lives on exactly one rank. The fragments of all
ranks therefore tile each parameter exactly once, and saving needs no communication.

Loading is the reverse on the new layout: every rank reads all fragments (from every saved
rank's file), cuts out the elements its own parameters or partitions hold, builds the state
in torch's format for the optimizer it has (per parameter, or per flat partition) and hands
it to optimizer.load_state_dict. Element-wise state ([f]) is copied element by element;
scalar state (AdamW's step) is the same for every fragment of a parameter and is taken from
any. Nothing is computed, so the loaded values are the saved ones bit for bit, on any layout.
Files hold tensors and plain values only (torch.load(weights_only=True)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from onerec.checkpoint import CheckpointError
from onerec.distributed.expert_parallel import is_expert_param
from onerec.distributed.groups import expert_data_parallel_rank, expert_parallel_group

FORMAT = "onerec.optimizer_fragments.v1"


def is_fragments(saved: Any) -> bool:
    """Whether `saved` is optimizer state in this module's format (else: torch's own state_dict,
    as checkpoints written before it hold)."""
    return isinstance(saved, dict) and saved.get("format") == FORMAT


def zero_partitioned(engine_optimizer: Any) -> Optional[Any]:
    """DeepSpeed's ZeRO 1/2 optimizer when the engine has one (it partitions the state), else None."""
    if hasattr(engine_optimizer, "single_partition_of_fp32_groups") and hasattr(engine_optimizer, "bit16_groups"):
        return engine_optimizer
    return None


@dataclass(frozen=True)
class _Placement:
    """Where this rank's tensor of one parameter sits in the full parameter."""

    name: str
    param: nn.Parameter
    full_shape: tuple[int, ...]
    offset: int  # first element of this rank's tensor in the flattened full parameter
    first_copy: bool  # this rank holds the first of the identical copies of that tensor


def _placements(model: nn.Module) -> list[_Placement]:
    rank = dist.get_rank() if dist.is_initialized() else 0
    placements = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # the trainer's optimizer holds trainable parameters only
        if is_expert_param(param):
            group = expert_parallel_group(param.group_name)
            ep, ep_rank = dist.get_world_size(group), dist.get_rank(group)
            placements.append(_Placement(
                name, param, (param.shape[0] * ep, *param.shape[1:]), ep_rank * param.numel(),
                expert_data_parallel_rank(param.group_name) == 0,
            ))
        else:
            placements.append(_Placement(name, param, tuple(param.shape), 0, rank == 0))
    return placements


def _fragment_state(
    state: dict[str, Any], numel_total: int, start: int, numel: int, what: str
) -> dict[str, torch.Tensor]:
    """Elements [start, start + numel) of each element-wise tensor of `state` (stored 1-D),
    scalars whole (0-D): AdamW's step, and any 0-D value that is not one per element."""
    out = {}
    for key, value in state.items():
        if torch.is_tensor(value) and (key == "step" or (value.dim() == 0 and numel_total != 1)):
            out[key] = value.detach().clone()
        elif torch.is_tensor(value) and value.numel() == numel_total:
            out[key] = value.detach().reshape(-1).narrow(0, start, numel)
        else:
            raise NotImplementedError(
                f"optimizer state {key!r} of {what} is neither a scalar nor one value per element: "
                "only element-wise optimizers (AdamW) can be saved by parameter"
            )
    return out


def optimizer_fragments(
    model: nn.Module, optimizer: torch.optim.Optimizer, zero_optimizer: Optional[Any] = None
) -> dict[str, Any]:
    """This rank's share of the optimizer state, by parameter name (see the module docstring).

    `optimizer` is the torch optimizer the engine steps; `zero_optimizer` DeepSpeed's ZeRO 1/2
    wrapper around it (zero_partitioned(engine.optimizer)), or None under ZeRO 0. No
    communication. The tensors are views of the live state: save them before the next step.
    """
    params: dict[str, dict[str, Any]] = {}

    def add(placement: _Placement, start: int, numel: int, state: dict[str, torch.Tensor]) -> None:
        entry = params.setdefault(placement.name, {"shape": list(placement.full_shape), "fragments": []})
        entry["fragments"].append({"start": int(start), "numel": int(numel), "state": state})

    placements = _placements(model)
    if zero_optimizer is None:
        for placement in placements:
            state = optimizer.state.get(placement.param)
            if placement.first_copy and state:
                numel = placement.param.numel()
                add(placement, placement.offset, numel, _fragment_state(state, numel, 0, numel, placement.name))
        return {"format": FORMAT, "params": params}

    group_of = {id(p): i for i, group in enumerate(zero_optimizer.bit16_groups) for p in group}
    for placement in placements:
        mapping = getattr(placement.param, "_hp_mapping", None)
        if mapping is None:  # no element of this parameter is in this rank's partition
            continue
        flat = zero_optimizer.single_partition_of_fp32_groups[group_of[id(placement.param)]]
        state = optimizer.state.get(flat)
        if not state:  # no step yet
            continue
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        add(placement, placement.offset + lp.start, hp.numel,
            _fragment_state(state, flat.numel(), hp.start, hp.numel, placement.name))
    return {"format": FORMAT, "params": params}


# ------------------------------------------------------------------------------ loading
class _Saved:
    """Every saved fragment of one parameter, ordered by start."""

    def __init__(self, name: str, shape: list[int], fragments: list[dict], what: str) -> None:
        self.name, self.shape, self.what = name, [int(s) for s in shape], what
        self.fragments = sorted(fragments, key=lambda f: f["start"])
        first = self.fragments[0]["state"]
        # Element-wise state is stored 1-D, scalars 0-D.
        self.keys = sorted(first)
        self.elementwise = {key: first[key].dim() == 1 for key in self.keys}

    def read(self, key: str, start: int, numel: int) -> torch.Tensor:
        """Elements [start, start + numel) of the flattened full state `key`, as a new tensor."""
        pieces, cursor, end = [], start, start + numel
        for fragment in self.fragments:
            f_start = fragment["start"]
            f_end = f_start + fragment["numel"]
            if f_end <= cursor:
                continue
            if f_start > cursor:
                break
            take = min(f_end, end) - cursor
            try:
                pieces.append(fragment["state"][key].narrow(0, cursor - f_start, take))
            except KeyError:
                raise CheckpointError(
                    f"{self.what}: optimizer state of {self.name} lacks {key!r} in one fragment"
                ) from None
            cursor += take
            if cursor == end:
                break
        if cursor != end:
            raise CheckpointError(
                f"{self.what}: optimizer state of {self.name} does not cover elements {cursor}..{end - 1} "
                "(a rank's optimizer file is missing from the checkpoint)"
            )
        # cat copies: nothing of the (possibly memory-mapped) file stays in the optimizer.
        return torch.cat(pieces)

    def scalar(self, key: str) -> torch.Tensor:
        return self.fragments[0]["state"][key].detach().clone()


def _index(sources: Iterable[dict], what: str) -> dict[str, _Saved]:
    collected: dict[str, tuple[list[int], list[dict]]] = {}
    for source in sources:
        if not is_fragments(source):
            raise CheckpointError(f"{what}: optimizer state in an unknown format")
        for name, entry in source["params"].items():
            shape, fragments = collected.setdefault(name, (entry["shape"], []))
            if list(entry["shape"]) != list(shape):
                raise CheckpointError(
                    f"{what}: optimizer state of {name} saved with shapes {shape} and {entry['shape']}"
                )
            fragments.extend(entry["fragments"])
    return {name: _Saved(name, shape, fragments, what) for name, (shape, fragments) in collected.items() if fragments}


def _torch_indices(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """id(tensor) -> its index in optimizer.state_dict()["state"], numbered as torch numbers them."""
    indices: dict[int, int] = {}
    start = 0
    for group in optimizer.param_groups:
        for index, param in enumerate(group["params"], start):
            indices.setdefault(id(param), index)
        start += len(group["params"])
    return indices


def load_optimizer_fragments(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    zero_optimizer: Optional[Any],
    sources: Iterable[dict],
    what: str,
) -> None:
    """Give this rank's optimizer the state it holds on the current layout, cut out of every
    saved rank's fragments (`sources`: their optimizer_fragments() dicts); see the module doc.

    Parameters without saved state start without state, as in a fresh optimizer. Raises
    CheckpointError (naming `what`) for a shape that does not match, state that does not
    cover a parameter, or non-finite values. Call it after the weights are loaded and, under
    ZeRO, the fp32 partitions refreshed from them.
    """
    saved = _index(sources, what)
    placements = _placements(model)
    for placement in placements:
        entry = saved.get(placement.name)
        if entry is not None and tuple(entry.shape) != placement.full_shape:
            raise CheckpointError(
                f"{what}: optimizer state of {placement.name} has shape {tuple(entry.shape)}, "
                f"the model's parameter {placement.full_shape}"
            )

    new_state: dict[int, tuple[str, dict[str, torch.Tensor]]] = {}  # id(optimizer tensor) -> (its names, state)
    if zero_optimizer is None:
        for placement in placements:
            entry = saved.get(placement.name)
            if entry is None:
                continue
            numel = placement.param.numel()
            new_state[id(placement.param)] = (placement.name, {
                key: entry.read(key, placement.offset, numel).view(placement.param.shape)
                if entry.elementwise[key] else entry.scalar(key)
                for key in entry.keys
            })
    else:
        by_id = {id(p.param): p for p in placements}
        for i, flat in enumerate(zero_optimizer.single_partition_of_fp32_groups):
            members = [by_id[id(p)] for p in zero_optimizer.bit16_groups[i] if id(p) in by_id]
            entries = [(p, saved[p.name]) for p in members if p.name in saved]
            if not entries:
                continue
            # Every rank builds the same keys and step for the group, also one whose partition
            # holds only padding.
            keys, elementwise = entries[0][1].keys, entries[0][1].elementwise
            state: dict[str, torch.Tensor] = {}
            for key in keys:
                if not elementwise[key]:
                    state[key] = entries[0][1].scalar(key)
                    continue
                buffer = torch.zeros_like(flat)  # the partition's padding keeps zero state
                for placement, entry in entries:
                    mapping = getattr(placement.param, "_hp_mapping", None)
                    if mapping is None:
                        continue
                    lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                    buffer.narrow(0, hp.start, hp.numel).copy_(entry.read(key, placement.offset + lp.start, hp.numel))
                state[key] = buffer
            new_state[id(flat)] = (", ".join(p.name for p, _ in entries), state)

    for names, state in new_state.values():
        for key, value in state.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{what}: non-finite optimizer state {key!r} of {names}")

    indices = _torch_indices(optimizer)
    state_dict = optimizer.state_dict()  # this optimizer's own groups and hyperparameters
    state_dict["state"] = {indices[key]: state for key, (_, state) in new_state.items()}
    optimizer.load_state_dict(state_dict)
    if zero_optimizer is not None and hasattr(zero_optimizer, "_hp_optimizer_states_linked"):
        # DeepSpeed links views of the state into its parameter map after the first step;
        # those views point at the replaced tensors, so let it link them again.
        zero_optimizer._hp_optimizer_states_linked = False
