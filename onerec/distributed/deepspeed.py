"""DeepSpeed's side of training: process-group set-up, the training engine, and the engine
wiring of expert parallelism (its process groups are in groups.py; device choice in
onerec/device.py). Modules that import DeepSpeed do so inside functions, so importing
onerec never loads it.

    groups.py  <-  expert_parallel.py  <-  deepspeed.py      (no import goes back up)

Every stage trains through a DeepSpeed engine, one process or many, CPU (gloo) or GPU
(nccl). Mixed precision is torch autocast around the forward pass with fp32 master
weights in a plain torch optimizer, so checkpoints stay ordinary tensors on any device.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from onerec.config import TrainConfig
from onerec.device import resolve_device
from onerec.distributed.expert_parallel import expert_parallel_grad_clipper, has_expert_parallel_params, is_expert_param, moe_layers
from onerec.distributed.groups import DistInfo, group_name

log = logging.getLogger("onerec.distributed")


def init_distributed(requested_device: str = "auto") -> DistInfo:
    """Join (or, for a plain `python` run, create) the process group; idempotent.

    Launchers (torchrun, the deepspeed launcher, srun + torchrun) set RANK/WORLD_SIZE/
    MASTER_ADDR; a single process gets a private one-rank group on an in-memory store (no
    port to pick, so two runs on one machine can never race for one).
    """
    device = resolve_device(requested_device)
    if device.type == "cpu":
        # Must be set before deepspeed is imported: it picks its accelerator at import.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # A world of one: a plain process, or one that inherited a plain process's variables.
    single_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if single_process:
        for name in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
            os.environ.setdefault(name, "1" if "SIZE" in name else "0")
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if single_process and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    # Joins the launcher's group, or wraps the one-rank group above; a no-op once done.
    deepspeed.init_distributed(dist_backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        device=device,
    )


def deepspeed_config(
    cfg: TrainConfig, micro_batch_size: int, world_size: int, expert_parallel: bool = False
) -> dict[str, Any]:
    """The DeepSpeed JSON config derived from TrainConfig (nothing else configures the engine).

    With sharded experts under ZeRO 0 the engine's clipping is off: build_engine clips by the
    exact global norm instead (see expert_parallel.expert_parallel_grad_clipper).
    """
    engine_clips = not (expert_parallel and cfg.zero_stage == 0)
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "train_batch_size": micro_batch_size * world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip if engine_clips else 0.0,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_engine(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    micro_batch_size: int,
    world_size: int,
):
    """Wrap model + optimizer + scheduler in a DeepSpeed engine (gradient all-reduce, clipping, ZeRO).

    A model whose experts were sharded by apply_expert_parallel gets, before the engine is
    built: expert/dense optimizer param groups, the MoE marker DeepSpeed keys its expert
    gradient reduction on, and (ZeRO 0) exact global-norm clipping.
    """
    import deepspeed


    expert_parallel = has_expert_parallel_params(model)
    engine_module = model
    if expert_parallel:
        split_moe_param_groups(optimizer, scheduler)
        engine_module = expert_parallel_engine_module(model)
        if cfg.zero_stage == 0 and cfg.grad_clip > 0:
            optimizer.register_step_pre_hook(expert_parallel_grad_clipper(model, cfg.grad_clip))
    engine, _, _, _ = deepspeed.initialize(
        model=engine_module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, micro_batch_size, world_size, expert_parallel),
    )
    return engine


# ----------------------------------------------------------------------------- expert parallelism (groups.py)
def split_moe_param_groups(optimizer: torch.optim.Optimizer, scheduler=None) -> None:
    """Split the optimizer's groups into dense and expert groups, in place, as DeepSpeed needs.

    DeepSpeed's ZeRO 1/2 optimizer partitions each group over one process group: expert
    groups (marked `moe: True`, named by the parameters' group_name) over the
    expert-data-parallel group, the rest over the data-parallel group.
    deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer builds exactly
    those groups. The optimizer (and an LR scheduler keyed on its groups) already exists
    when the engine is built, so the groups are replaced in place and the scheduler's
    per-group lists are extended to match (each new group inherits its parent's settings,
    initial_lr included).
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups = optimizer.param_groups
    for index, group in enumerate(groups):
        group.setdefault("name", f"group{index}")
    new_groups = split_params_into_different_moe_groups_for_optimizer(list(groups))
    new_groups = [g for g in new_groups if g["params"]]
    optimizer.param_groups[:] = new_groups
    if scheduler is None:
        return
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [g.get("initial_lr", g["lr"]) for g in new_groups]
    if hasattr(scheduler, "lr_lambdas"):
        if len(set(map(id, scheduler.lr_lambdas))) != 1:
            raise NotImplementedError("expert parallelism supports an LR schedule with one lambda for all groups")
        scheduler.lr_lambdas = [scheduler.lr_lambdas[0]] * len(new_groups)
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [g["lr"] for g in new_groups]


def expert_parallel_engine_module(model: nn.Module) -> nn.Module:
    """Wrap `model` so the DeepSpeed engine treats it as an MoE model.

    DeepSpeed 0.19 turns on its expert-aware paths (expert gradient reduction over the
    expert-data-parallel group in ZeRO 0, expert param groups in ZeRO 1/2, expert-group
    broadcasts at start-up) only when the module tree contains a deepspeed.moe.layer.MoE.
    This wrapper is one, without DeepSpeed's own gate and experts (MoE.__init__ is skipped):
    it only forwards to the wrapped model, and owns no state of its own, so the wrapped
    model's state_dict keys are unchanged for everything that holds the model directly.
    """
    from deepspeed.moe.layer import MoE


    class ExpertParallelModel(MoE):
        def __init__(self, inner: nn.Module, num_experts: int, ep_size: int) -> None:
            nn.Module.__init__(self)
            self.model = inner
            self.num_experts = num_experts
            self.ep_size = ep_size
            self.expert_group_name = group_name(ep_size)

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """Groups were created by apply_expert_parallel; nothing to do here."""

        def forward(self, *args, **kwargs):
            return self.model(*args, **kwargs)

    layers = moe_layers(model)
    experts = [p for p in model.parameters() if is_expert_param(p)]
    assert layers and experts, "call apply_expert_parallel first"
    num_experts = layers[0].router.num_experts
    ep_size = int(experts[0].group_name.rsplit("_", 1)[1])
    return ExpertParallelModel(model, num_experts, ep_size)
