"""Expert parallelism: each rank of an expert-parallel group holds E_local = E / ep experts,
and tokens travel to their experts and back by all-to-all.

Shape legend: T local tokens, D model dim, F expert FFN dim, E experts (global), K top-k,
Tk = T * K routed copies sent by this rank, R rows received by this rank (copies routed to
its E_local experts from every rank of the group), ep expert-parallel size, E_local = E / ep.

Global expert e lives on expert-parallel rank e // E_local as local expert e % E_local, so
sorting copies by global expert also sorts them by destination rank:

    send (x_perm_TkD, grouped by global expert):
        | to rank 0: e0 e1 | to rank 1: e2 e3 |          (E = 4, ep = 2, E_local = 2)
    all_to_all_single ->
    recv (grouped by source rank, then local expert):
        | from rank 0: e0 e1 | from rank 1: e0 e1 |
    regroup -> (grouped by local expert, as the Experts module wants):
        | e0: from 0, from 1 | e1: from 0, from 1 |

combine() runs the same steps backwards. The process groups are DeepSpeed's
(deepspeed.utils.groups, named f"ep_size_{ep}", reached through onerec.distributed.groups,
the one module that imports DeepSpeed): expert parameters carry
`allreduce = False` and `group_name`, as deepspeed.moe marks its own, so the DeepSpeed
engine (ZeRO 0, 1 and 2) reduces their gradients over the expert-data-parallel group
and everything else over the whole data-parallel group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from onerec.config import ConfigError
from onerec.distributed.groups import create_expert_parallel_groups, expert_parallel_group, group_name
from onerec.kernels.moe_routing import permute, unpermute
from onerec.model.moe import MoEFeedForward

log = logging.getLogger("onerec.distributed")


# --------------------------------------------------------------------------- all-to-all
class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 with uneven splits; its gradient is the reverse exchange.

    Row r of the output came from some rank's input row; the gradient of that input row is
    the output gradient row r, sent back along the same route: the same call with the two
    split lists swapped. gloo (CPU) and nccl (GPU) both implement all_to_all_single with
    uneven splits.
    """

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        x_ND = x_ND.contiguous()
        out = x_ND.new_empty((sum(output_splits),) + tuple(x_ND.shape[1:]))
        dist.all_to_all_single(out, x_ND, output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_out = grad_out.contiguous()
        grad_in = grad_out.new_empty((sum(ctx.input_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out, ctx.input_splits, ctx.output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Differentiable all_to_all_single: rows [sum(input_splits), ...] -> [sum(output_splits), ...]."""
    return _AllToAll.apply(x_ND, output_splits, input_splits, group)


# --------------------------------------------------------------------------- dispatcher
@dataclass
class AllToAllHandle:
    """What combine() needs to undo dispatch()."""

    sorted_token_ids_Tk: torch.Tensor  # local permutation (copy id t * K + k per sent row)
    num_tokens: int
    send_splits: list[int]  # rows sent to each rank of the group
    recv_splits: list[int]  # rows received from each rank of the group
    regroup_R: torch.Tensor  # received row index for each row of the expert-grouped layout
    ungroup_R: torch.Tensor  # its inverse permutation


class AllToAllDispatcher:
    """The MoE dispatcher seam over an expert-parallel group (see the module docstring).

    dispatch(x_TD, topk_idx_TK) -> (x_local_RD grouped by local expert, tokens_per_local_expert,
    handle); combine(y_local_RD, topk_weight_TK, handle) -> y_TD. Every rank of the group must
    call dispatch/combine the same number of times (they are collectives), which holds because
    all ranks run the same model on equally many batches.
    """

    def __init__(self, num_experts: int, ep_size: int, ep_rank: int, group) -> None:
        assert num_experts % ep_size == 0, "checked by apply_expert_parallel"
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.num_local_experts = num_experts // ep_size
        self.group = group

    def dispatch(
        self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, AllToAllHandle]:
        ep, e_local = self.ep_size, self.num_local_experts
        x_perm_TkD, sorted_token_ids_Tk, tokens_per_expert_E = permute(x_TD, topk_idx_TK, self.num_experts)
        # Counts first (fixed size): recv_counts[s, j] = copies rank s sends to my local expert j.
        send_counts_E = tokens_per_expert_E.to(torch.int64).contiguous()
        recv_counts_E = torch.empty_like(send_counts_E)
        dist.all_to_all_single(recv_counts_E, send_counts_E, group=self.group)
        recv_counts_SJ = recv_counts_E.view(ep, e_local)
        # all_to_all_single needs the row splits on the host: one sync per MoE layer.
        send_splits = send_counts_E.view(ep, e_local).sum(dim=1).tolist()
        recv_splits = recv_counts_SJ.sum(dim=1).tolist()
        x_recv_RD = all_to_all(x_perm_TkD, recv_splits, send_splits, self.group)
        regroup_R = _source_major_to_expert_major(recv_counts_SJ)
        ungroup_R = torch.empty_like(regroup_R)
        ungroup_R[regroup_R] = torch.arange(regroup_R.numel(), device=regroup_R.device)
        x_local_RD = x_recv_RD.index_select(0, regroup_R)
        tokens_per_local_expert = recv_counts_SJ.sum(dim=0)
        handle = AllToAllHandle(sorted_token_ids_Tk, x_TD.shape[0], send_splits, recv_splits, regroup_R, ungroup_R)
        return x_local_RD, tokens_per_local_expert, handle

    def combine(self, y_local_RD: torch.Tensor, topk_weight_TK: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        y_recv_RD = y_local_RD.index_select(0, handle.ungroup_R)
        y_perm_TkD = all_to_all(y_recv_RD, handle.send_splits, handle.recv_splits, self.group)
        return unpermute(y_perm_TkD, handle.sorted_token_ids_Tk, topk_weight_TK, handle.num_tokens)


def _source_major_to_expert_major(counts_SJ: torch.Tensor) -> torch.Tensor:
    """Row order that turns blocks laid out (source s, expert j) into (expert j, source s).

    counts_SJ[s, j] rows sit at start_SJ[s, j] (row-major prefix sums); the result lists
    block (0, 0), (1, 0), ..., (0, 1), (1, 1), ... row by row.
    """
    flat = counts_SJ.reshape(-1)
    start_SJ = (torch.cumsum(flat, 0) - flat).view_as(counts_SJ)
    starts_JS = start_SJ.T.reshape(-1)
    counts_JS = counts_SJ.T.reshape(-1)
    total = int(flat.sum())
    # For output row r in block b: start[b] + (r - first output row of b).
    block_first = torch.cumsum(counts_JS, 0) - counts_JS
    block_of_row = torch.repeat_interleave(torch.arange(counts_JS.numel(), device=flat.device), counts_JS)
    offset_in_block = torch.arange(total, device=flat.device) - block_first[block_of_row]
    return starts_JS[block_of_row] + offset_in_block


# --------------------------------------------------------------------------- applying it
@dataclass(frozen=True)
class ExpertParallelInfo:
    ep_size: int
    ep_rank: int
    group_name: str


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def check_expert_parallel(ep_size: int, num_experts: int, world_size: int) -> None:
    """ConfigError unless ep divides both the number of experts and the world size."""
    if ep_size < 1:
        raise ConfigError(f"parallel.expert_parallel_size={ep_size}: expected >= 1")
    if num_experts % ep_size:
        raise ConfigError(
            f"parallel.expert_parallel_size={ep_size} does not divide model.moe.num_experts={num_experts}: "
            "every rank must hold the same number of experts"
        )
    if world_size % ep_size:
        raise ConfigError(
            f"parallel.expert_parallel_size={ep_size} does not divide the world size ({world_size} processes): "
            "launch a multiple of it, or lower parallel.expert_parallel_size"
        )


def apply_expert_parallel(model: nn.Module, ep_size: int) -> Optional[ExpertParallelInfo]:
    """Shard every MoE layer's experts over groups of `ep_size` ranks; a no-op for ep_size == 1.

    Call it after building the full model on every rank from the same seed (so every rank
    holds identical copies of all E experts: ep=1 and ep>1 are then the same function) and
    before the DeepSpeed engine is built. Each rank keeps its E / ep slice of the expert
    weights, marked the way deepspeed.moe marks expert parameters, and gets an all-to-all
    dispatcher over DeepSpeed's expert-parallel group.
    """
    layers = moe_layers(model)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if ep_size == 1:
        check_expert_parallel(ep_size, 1, world_size)
        return None
    if not layers:
        raise ConfigError(
            f"parallel.expert_parallel_size={ep_size} needs MoE layers: set model.moe.enabled=true "
            "or parallel.expert_parallel_size=1"
        )
    if not dist.is_initialized():
        raise RuntimeError("apply_expert_parallel needs the process group: call init_distributed first")
    num_experts = layers[0].router.num_experts
    check_expert_parallel(ep_size, num_experts, world_size)

    name = group_name(ep_size)
    group, ep_rank = create_expert_parallel_groups(ep_size)
    e_local = num_experts // ep_size
    first = ep_rank * e_local
    for layer in layers:
        experts = layer.experts
        for attr in ("w1_EFD", "w2_EDF"):
            full = getattr(experts, attr)
            local = nn.Parameter(full.detach()[first : first + e_local].clone(), requires_grad=full.requires_grad)
            # What deepspeed.moe sets on its experts: skip the data-parallel all-reduce and
            # reduce over the expert-data-parallel group of this name instead.
            local.allreduce = False
            local.group_name = name
            setattr(experts, attr, local)
        layer.dispatcher = AllToAllDispatcher(num_experts, ep_size, ep_rank, group)
    log.info(
        "expert parallel: ep=%d, rank %d holds experts %d..%d of %d in %d MoE layers",
        ep_size, ep_rank, first, first + e_local - 1, num_experts, len(layers),
    )
    return ExpertParallelInfo(ep_size, ep_rank, name)


def is_expert_param(param: torch.Tensor) -> bool:
    return getattr(param, "allreduce", True) is False


def has_expert_parallel_params(model: nn.Module) -> bool:
    return any(is_expert_param(p) for p in model.parameters())


# --------------------------------------------------------------------------- full weights
def expert_parallel_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full model state dict (all E experts) from an expert-parallel model; a collective.

    Every rank must call it; every rank gets the full dict (all-gather over the expert-parallel
    group: each rank's E_local rows are concatenated in expert order). For ep == 1 it is
    simply model.state_dict(). This is what a checkpoint or export of an EP model must save.
    """
    params = {name: p for name, p in model.named_parameters()}
    state = {}
    for key, value in model.state_dict().items():
        param = params.get(key)
        if param is not None and is_expert_param(param):
            group = expert_parallel_group(param.group_name)
            parts = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, value.detach().contiguous(), group=group)
            value = torch.cat(parts, dim=0)
        state[key] = value.detach().clone()
    return state


def load_expert_parallel_state_dict(model: nn.Module, full_state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (all E experts) into an expert-parallel model: each rank takes its slice."""
    params = {name: p for name, p in model.named_parameters()}
    local_state = {}
    for key, value in full_state.items():
        param = params.get(key)
        if param is not None and is_expert_param(param):
            ep_rank = dist.get_rank(expert_parallel_group(param.group_name))
            e_local = param.shape[0]
            value = value[ep_rank * e_local : (ep_rank + 1) * e_local]
        local_state[key] = value
    model.load_state_dict(local_state, strict=True)


# --------------------------------------------------------------------------- clipping
def expert_parallel_grad_clipper(model: nn.Module, max_norm: float):
    """An optimizer pre-step hook that clips by the exact global gradient norm of an EP model.

    DeepSpeed's ZeRO-0 clipping averages each rank's local norm (dense + its own experts)
    over the data-parallel group, which is not the global norm once experts are sharded;
    the ZeRO 1/2 optimizer computes the exact one. Under ZeRO 0 with ep > 1 the engine's
    clipping is therefore turned off and this hook does it: squared norms of the dense
    gradients (already identical on every rank after the all-reduce) plus the expert ones
    summed over the expert-parallel group (each rank holds different experts; within the
    expert-data-parallel group they are identical after the reduce).
    """
    params = [p for p in model.parameters() if p.requires_grad]

    def hook(optimizer, args, kwargs):
        grads = [p for p in params if p.grad is not None]
        if not grads:
            return
        dense = [p.grad.detach().float().pow(2).sum() for p in grads if not is_expert_param(p)]
        by_group: dict[str, list[torch.Tensor]] = {}
        for p in grads:
            if is_expert_param(p):
                by_group.setdefault(p.group_name, []).append(p.grad.detach().float().pow(2).sum())
        total = torch.stack(dense).sum() if dense else torch.zeros((), device=grads[0].device)
        for name, squares in by_group.items():
            expert_sq = torch.stack(squares).sum()
            dist.all_reduce(expert_sq, group=expert_parallel_group(name))
            total = total + expert_sq
        coef = (max_norm / (total.sqrt() + 1e-6)).clamp(max=1.0)
        for p in grads:
            p.grad.detach().mul_(coef.to(p.grad.dtype))

    return hook
