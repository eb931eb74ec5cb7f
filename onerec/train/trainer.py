"""The shared training loop: DeepSpeed engine, warmup + cosine schedule, periodic
validation with early stopping, best-weights copy, atomic resumable checkpoints.

Data order is a pure function of (seed, epoch) and the run's global batch: each epoch is a
seeded permutation of example indices, split into global batches, each rank taking its slice
(the sampler, onerec.data.sampler.DistributedBatchSampler). A checkpoint therefore only needs
the step counter to find its place again, plus each rank's torch RNG state for dropout; a CPU
run resumed on the same number of ranks reproduces the uninterrupted run's losses exactly,
also when torchrun restarts a whole multi-process job after one of its ranks died.

A step whose loss (checked before backward) or gradient norm (checked before the optimizer
step) is NaN/inf is skipped on every rank: no update, gradients dropped, the batch consumed
and the step counted, so data order and LR schedule stay a function of the step. More than
`train.max_nonfinite_steps` such steps in a row stop the run with NonFiniteLossError; the
weights never take a non-finite update, so no checkpoint is written from a poisoned state.

Checkpoints and best weights always hold the full model. The optimizer state is saved by
parameter name, as fragments of the whole parameters (onerec/distributed/optimizer_state.py):
rank 0 saves all of it when every rank holds the same (ZeRO 0 without expert parallelism),
else each rank saves the share it holds (its ZeRO 1/2 partitions, its experts) in its own file
beside the shared train state. Under ZeRO the fp32 master copy is refreshed from the loaded
weights before the optimizer state is restored, as DeepSpeed's own loader does.

Resuming on another number of ranks. A checkpoint written by N ranks resumes on M ranks,
under any ZeRO stage and any expert-parallel size the new job can run (ep must divide M: a
2-rank ep=2 run resumes on one rank with parallel.expert_parallel_size=1).
- Weights: whole in the checkpoint; each rank keeps its experts' rows.
- Optimizer: every rank reads every saved fragment and copies out the elements its layout
  holds (its partition of each flat ZeRO group, or its parameters whole), so it gets the
  saved AdamW exp_avg, exp_avg_sq and step bit for bit. The scheduler's position is restored
  and each param group's LR set from it (expert parallelism splits the groups, so a saved
  per-group list may not fit: the schedule is base LR x lambda(step) for every group).
- Data position, LR schedule, step counter: the global batch G (examples per optimizer step,
  over all ranks) belongs to the run: train.batch_size x the ranks it started on, recorded in
  the train state. A resume keeps G whatever train.batch_size x M would give (it warns), so
  each of the M ranks takes G / M examples per step (ceil(G / M) in rank order, the last rank
  fewer, when M does not divide G; a split that leaves a rank none is refused). Steps per
  epoch, total steps and the LR schedule (a function of the step) are then unchanged, and step
  s consumes the uninterrupted run's global batch s: within the epoch no example is skipped or
  repeated. The price: on fewer ranks each rank's batch grows (there is no gradient
  accumulation); if G / M does not fit in memory, resume on more ranks.
- RNG (dropout): on the same number of ranks each rank gets its own saved state back. On
  another number no saved stream belongs to a rank any more (its share of each batch
  changed), so every rank seeds torch's RNG from (seed, rank, step) (resume_rng_seed).
- Exact or within tolerance: on the same number of ranks a CPU resume is bit for bit. On
  another number the weights, optimizer state, LR and global batches are the same, but the
  gradient is the mean of M per-rank gradients instead of N, reduced in another order (and
  ZeRO partitions and the expert all-to-all cut differently), so with dropout off the
  continued losses match the uninterrupted run's within float rounding, amplified a little
  by Adam over the steps (tests/distributed/test_resume_world_size.py); with dropout on the
  masks differ too, and they match only within dropout noise, never bit for bit. A loss that is
  not a mean over examples makes the per-rank average itself depend on the split: pretraining's
  next-token loss averages over a rank's real target codes (padded sessions count less) and
  the MoE balance loss is computed over a rank's tokens, so there the resumed run optimises a
  slightly different (equally valid) objective, as any data-parallel run on another number of
  ranks does.

Why this mechanism. torch.distributed.checkpoint reshards DTensor (FSDP) state, but DeepSpeed's
ZeRO 1/2 partitions are flat buffers and the experts are sharded by hand, so it would need a
planner built on the same fragment maps, and its metadata file is a pickle, which this
loader never unpickles. DeepSpeed's universal checkpoint converts engine.save_checkpoint files
offline (ds_to_universal, which loads them with weights_only=False) and would replace this
project's atomic, verified checkpoint format. Gathering the whole state on rank 0 would cost
collectives at every save and the whole optimizer state in one host's memory, which ZeRO
exists to avoid; fragments cost no communication to save, and loading memory-maps the
per-rank files, each rank copying out only its share.

Runs. Every training run has an id (TrainState.run_id): a fresh uuid4 hex when it starts
from scratch, the checkpoint's when it resumes (a checkpoint written before runs had ids
continues under a new one). Checkpoints and best weights record it, so a run directory that
holds another run's files (a copied run directory, a run started over) never mixes them up:

    <stage_dir>/checkpoints/step_*                   this run's checkpoints (onerec.checkpoint)
    <stage_dir>/best/model.safetensors               best weights; their manifest holds run_id, step
    <stage_dir>/checkpoints.superseded-<run id>/     another run's checkpoints and best/, moved
                                                     aside (never deleted) when a fresh run starts

A fresh run moves every other run's checkpoints, and a best/ it did not write, aside before
its first step and logs which. `FitResult.best_weights` is best/ only when this run wrote it
(in this process, or in an earlier attempt that a resume continues), else None: a previous
run's best weights are never reported, and so never exported, as this run's.

Signals. While fit() runs, SIGUSR1 (Slurm's warning before the time limit) or SIGTERM
(preemption, scancel) stops training at the end of the current step: the ranks agree on the
step, write a checkpoint of it and exit with code 75, so that the job is requeued and resumes
there (onerec/train/preemption.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from tqdm.auto import tqdm

from onerec.checkpoint import (
    begin_checkpoint,
    check_finite,
    finish_checkpoint,
    load_checkpoint,
    load_rank_state,
    read_manifest,
    read_rank_states,
    resolve_resume,
    saved_rank_files,
    save_weights,
    set_aside,
    set_aside_other_runs,
    staging_dir,
    weights_provenance,
    write_rank_state,
)
from onerec.config import ConfigError, TrainConfig
from onerec.data.sampler import DistributedBatchSampler, ranks_left_empty
from onerec.device import autocast_dtype
from onerec.distributed.deepspeed import build_engine
from onerec.distributed.groups import DistInfo
from onerec.distributed.expert_parallel import (
    expert_parallel_state_dict,
    has_expert_parallel_params,
    load_expert_parallel_state_dict,
)
from onerec.distributed.optimizer_state import (
    is_fragments,
    load_optimizer_fragments,
    optimizer_fragments,
    zero_partitioned,
)
from onerec.logging import RunLogger, progress_disabled
from onerec.provenance import NEUTRAL_DEFAULTS, SWITCHED_SECTIONS
from onerec.train.preemption import StopSignals, TrainingInterrupted

log = logging.getLogger("onerec.train")

BEST_WEIGHTS = "best/model.safetensors"

# (engine, example indices) -> (loss to optimise, scalars to log)
StepFn = Callable[[Any, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
# () -> validation metrics (every rank calls it; it returns the same numbers everywhere)
EvalFn = Callable[[], dict[str, float]]

# Called with the step number once a step is complete (update, logging, evaluation and
# checkpoint); tests use it to
# inject faults, e.g. a rank that SIGKILLs itself mid-run (tests/distributed).
AfterStepFn = Callable[[int], None]


class NonFiniteLossError(FloatingPointError):
    """Too many steps in a row with a NaN/inf loss or gradient: skipping them will not help."""


@dataclass
class TrainState:
    """The loop's own counters: everything besides weights, optimizer, scheduler and RNG that
    a checkpoint must hold for a resumed run to continue exactly where it stopped."""

    step: int = 0
    # Which training run this is: "" until fit() starts a fresh run (a uuid4 hex) or restores
    # a checkpoint (its run id); checkpoints and best weights are stamped with it.
    run_id: str = ""
    best_metric: float = -math.inf
    best_step: int = -1
    evals_without_improvement: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "TrainState":
        """Read from a checkpoint's train state; counters added since it was written start at 0."""
        defaults = cls()
        return cls(**{f.name: type(getattr(defaults, f.name))(saved.get(f.name, getattr(defaults, f.name)))
                      for f in fields(cls)})


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def resume_rng_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of `rank` in a run resumed at `step` on another number of ranks than wrote
    the checkpoint: a function of (seed, rank, step) only, different for every rank."""
    digest = hashlib.sha256(f"onerec-resume-rng:{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def epoch_batches(
    num_examples: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int
) -> list[torch.Tensor]:
    """This rank's example indices for each step of `epoch` (the last global batch may be short)."""
    return DistributedBatchSampler(num_examples, batch_size, seed, rank, world_size).epoch_batches(epoch)


@dataclass
class FitResult:
    steps: int
    best_step: int
    best_metric: float
    stopped_early: bool
    best_weights: Optional[Path]


# Settings that may differ between a checkpoint and the run that resumes it: where and how
# often things are written, how long to train, how many ranks (the global batch is kept,
# see above). Any other difference means another training run.
RESUMABLE_CHANGES = (
    "run.device", "run.out_dir", "data.cache_dir", "train.resume", "train.log_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.max_steps", "train.max_epochs", "train.batch_size", "train.max_nonfinite_steps",
    "logging.", "parallel.", "eval.", "align.checkpoint_every",
)


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix: config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        out.update(_flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
    return out


def config_changes(saved: dict, current: dict) -> list[str]:
    """The settings (dotted keys) whose values differ between a checkpoint's config and the
    current one, beyond RESUMABLE_CHANGES. A checkpoint without a config (old, or a caller
    that passes none) has nothing to compare: []. A key added since the checkpoint was written
    counts there as its provenance.NEUTRAL_DEFAULTS value (what the code computed before it),
    and a section of provenance.SWITCHED_SECTIONS counts only where it is switched on."""
    if not saved or not current:
        return []
    before, after = _flatten(saved), _flatten(json.loads(json.dumps(current, default=str)))  # as the manifest holds it
    for key, neutral in NEUTRAL_DEFAULTS.items():
        if key in after and key not in before:
            before[key] = neutral
    for section, switch in SWITCHED_SECTIONS.items():
        if not before.get(f"{section}.{switch}") and not after.get(f"{section}.{switch}"):
            for flat in (before, after):
                for key in [k for k in flat if k.startswith(f"{section}.")]:
                    del flat[key]
    return sorted(key for key in before.keys() | after.keys()
                  if before.get(key) != after.get(key) and not key.startswith(RESUMABLE_CHANGES))


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        model: torch.nn.Module,
        num_examples: int,
        step_fn: StepFn,
        stage_dir: Path,
        dist_info: DistInfo,
        run_logger: RunLogger,
        config_dict: dict,
        seed: int,
        eval_fn: Optional[EvalFn] = None,
        select_metric: str = "ndcg@10",
        after_step: Optional[AfterStepFn] = None,
    ) -> None:
        if num_examples == 0:
            raise ValueError("no training examples: check the data split and data.min_user_interactions")
        self.cfg = cfg
        self.model = model
        self.num_examples = num_examples
        self.step_fn = step_fn
        self.eval_fn = eval_fn
        self.select_metric = select_metric
        self.stage_dir = stage_dir
        self.dist = dist_info
        self.logger = run_logger
        self.config_dict = config_dict
        self.seed = seed
        # The run's global batch: train.batch_size per rank at the start; a resume keeps the
        # checkpoint's (_use_global_batch), on however many ranks it runs.
        self._set_global_batch(cfg.batch_size * dist_info.world_size)
        self.autocast = autocast_dtype(cfg.precision, dist_info.device)

        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.98),
            foreach=dist_info.device.type == "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        )
        self.engine = build_engine(
            model, self.optimizer, self.scheduler, cfg, cfg.batch_size, dist_info.world_size
        )
        self.expert_parallel = has_expert_parallel_params(model)
        # Ranks hold different optimizer state: ZeRO partitions it, expert parallelism gives
        # each rank different experts. Then every rank checkpoints its own share (by parameter
        # name, onerec/distributed/optimizer_state.py), else rank 0 the whole of it.
        self.optimizer_per_rank = cfg.zero_stage > 0 or self.expert_parallel
        self.zero_optimizer = zero_partitioned(self.engine.optimizer)  # DeepSpeed's ZeRO 1/2 optimizer, or None

        self.state = TrainState()
        # Set when a resumed checkpoint predates run ids: best weights of that era carry no
        # run id either, and belong to the run being continued.
        self._continues_unstamped_run = False
        self.after_step = after_step
        self._stop_signals = StopSignals()  # SIGUSR1/SIGTERM handlers, installed only in fit()

    # ----------------------------------------------------------------- batches
    def _set_global_batch(self, global_batch: int) -> None:
        """Data order, steps per epoch and total steps for `global_batch` examples per step."""
        self.sampler = DistributedBatchSampler(
            self.num_examples, self.cfg.batch_size, self.seed, self.dist.rank, self.dist.world_size,
            global_batch=global_batch,
        )
        self.steps_per_epoch = self.sampler.steps_per_epoch
        by_epochs = self.cfg.max_epochs * self.steps_per_epoch
        self.total_steps = min(by_epochs, self.cfg.max_steps) if self.cfg.max_steps > 0 else by_epochs

    def _use_global_batch(self, global_batch: int, saved_world_size: int) -> None:
        """Continue with the checkpoint's global batch (see the module docstring): the same
        global batches step by step, the same steps per epoch, total steps and LR schedule."""
        world = self.dist.world_size
        if ranks_left_empty(global_batch, world):
            raise ConfigError(
                f"the checkpoint's global batch of {global_batch} examples per step cannot be split over "
                f"{world} ranks (ceil({global_batch} / {world}) per rank leaves the last with none); resume on a "
                f"number of ranks that divides {global_batch}, or start over with train.resume=none"
            )
        if global_batch != self.sampler.global_batch:
            log.warning(
                "resuming a run with %d examples per step (train.batch_size=%d on %d ranks would be %d): the "
                "global batch stays the run's, %s per rank on these %d ranks",
                global_batch, self.cfg.batch_size, world, self.sampler.global_batch,
                global_batch // world if global_batch % world == 0 else f"up to {math.ceil(global_batch / world)}",
                world,
            )
            self._set_global_batch(global_batch)
            schedule = warmup_cosine(self.total_steps, self.cfg.warmup_steps, self.cfg.min_lr_ratio)
            self.scheduler.lr_lambdas = [schedule] * len(self.scheduler.lr_lambdas)
        if global_batch % world:
            log.warning(
                "%d ranks do not divide the global batch of %d: ranks take %d examples each in rank order and "
                "the last fewer, so the averaged gradient weighs examples slightly unevenly",
                world, global_batch, math.ceil(global_batch / world),
            )
        if saved_world_size != world:
            log.info("the checkpoint was written by %d ranks; continuing on %d with the same global batches",
                     saved_world_size, world)

    # ----------------------------------------------------------------- state
    def _gather_rng(self, state_X: torch.Tensor) -> torch.Tensor:
        """Every rank's RNG state, stacked [world_size, X] (a collective: all ranks call it).

        Ranks draw different amounts of dropout noise when their batches differ in size, so
        after a restart each rank needs its own state back, not rank 0's.
        """
        if self.dist.world_size == 1:
            return state_X.unsqueeze(0)
        local_X = state_X.to(self.dist.device)
        gathered = [torch.empty_like(local_X) for _ in range(self.dist.world_size)]
        torch.distributed.all_gather(gathered, local_X)
        return torch.stack(gathered).cpu()

    def _optimizer_fragments(self) -> dict[str, Any]:
        """This rank's share of the optimizer state, by parameter name (no communication)."""
        return optimizer_fragments(self.model, self.optimizer, self.zero_optimizer)

    def _train_state(self) -> dict[str, Any]:
        state = {
            **self.state.to_dict(),
            "world_size": self.dist.world_size,
            "global_batch_size": self.sampler.global_batch,
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "torch_rng_per_rank": self._gather_rng(torch.get_rng_state()),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state()
            state["cuda_rng_per_rank"] = self._gather_rng(torch.cuda.get_rng_state())
        if not self.optimizer_per_rank:  # every rank holds the same: rank 0's is the whole state
            state["optimizer"] = self._optimizer_fragments()
        return state

    def _full_weights(self) -> dict[str, torch.Tensor]:
        """A copy of the whole model's weights (a collective under expert parallelism).

        Copied because under ZeRO the parameters are views into one flat buffer, which
        safetensors refuses to save as separate tensors.
        """
        if self.expert_parallel:
            return expert_parallel_state_dict(self.model)
        return {name: value.detach().clone() for name, value in self.model.state_dict().items()}

    def _saved_world_size(self, path: Path, state: dict[str, Any]) -> int:
        """The number of ranks that wrote the checkpoint (older ones say it in other ways)."""
        if "world_size" in state:
            return int(state["world_size"])
        if saved_rank_files(path):
            return saved_rank_files(path)
        per_rank = state.get("torch_rng_per_rank")
        return int(per_rank.shape[0]) if per_rank is not None else self.dist.world_size

    def _restore_optimizer(self, path: Path, state: dict[str, Any]) -> None:
        """Optimizer state by parameter name, cut for this job's layout; or, from a checkpoint
        written before that, torch's state_dict of the same layout."""
        if "optimizer" in state:  # the whole state, from rank 0
            sources = [state["optimizer"]]
        else:  # a share per rank: every rank reads all of them
            sources = [rank_state["optimizer"] for rank_state in read_rank_states(path)]
        if sources and all(is_fragments(source) for source in sources):
            load_optimizer_fragments(self.model, self.optimizer, self.zero_optimizer, sources, str(path))
        elif "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            self.optimizer.load_state_dict(load_rank_state(path, self.dist.rank, self.dist.world_size)["optimizer"])

    def _restore_schedule(self, saved: dict[str, Any]) -> None:
        """The scheduler's position, and each param group's learning rate at it.

        The schedule is a function of the step: base LR x lambda(step). Its saved per-group
        lists follow the optimizer's groups, which expert parallelism splits (expert and dense
        groups), so they are taken from this job's groups when their number differs.
        """
        saved = dict(saved)
        groups = len(self.scheduler.base_lrs)
        if len(saved.get("base_lrs", [])) != groups:
            # The trainer gives every group the same base LR (train.lr); keep the saved one.
            same = len(set(saved.get("base_lrs", []))) == 1
            saved["base_lrs"] = [saved["base_lrs"][0]] * groups if same else list(self.scheduler.base_lrs)
            saved["_last_lr"] = [base * schedule(saved["last_epoch"])
                                 for base, schedule in zip(saved["base_lrs"], self.scheduler.lr_lambdas)]
        saved["lr_lambdas"] = [None] * len(self.scheduler.lr_lambdas)  # this job's lambdas (closures: never saved)
        self.scheduler.load_state_dict(saved)
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr

    def _restore_rng(self, state: dict[str, Any], saved_world_size: int) -> None:
        """Each rank's RNG state (dropout) as it was, on the same number of ranks.

        On another number of ranks no rank's saved stream belongs to it any more (its share of
        each global batch changed), so every rank seeds its RNG from (seed, rank, step): runs
        resumed alike draw alike, and ranks draw different dropout masks. A checkpoint written
        before per-rank states were kept gives every rank rank 0's.
        """
        if saved_world_size != self.dist.world_size and "torch_rng_per_rank" in state:
            torch.manual_seed(resume_rng_seed(self.seed, self.dist.rank, int(state["step"])))  # CPU and every GPU
            if self.dist.is_main:
                log.info("RNG: the checkpoint holds %d ranks' states, this job has %d ranks: each seeds its own "
                         "from (seed, rank, step); with dropout the losses then match the uninterrupted run's "
                         "within noise, not bit for bit", saved_world_size, self.dist.world_size)
            return
        torch.set_rng_state(self._rank_rng(state, "torch_rng"))
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(self._rank_rng(state, "cuda_rng"))

    def _rank_rng(self, state: dict[str, Any], key: str) -> torch.Tensor:
        """This rank's saved RNG state; rank 0's for a checkpoint without per-rank states."""
        per_rank = state.get(f"{key}_per_rank")
        if per_rank is not None and per_rank.shape[0] == self.dist.world_size:
            return per_rank[self.dist.rank].clone()
        return state[key]

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path, self.model, load_expert_parallel_state_dict if self.expert_parallel else None)
        # ZeRO 1/2 step a flat fp32 copy of this rank's partition and copy it back into the
        # model: it must start from the loaded weights, not the freshly initialised ones.
        refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()
        saved_world_size = self._saved_world_size(path, state)
        # A checkpoint without it was written with train.batch_size per rank, like this job.
        self._use_global_batch(int(state.get("global_batch_size", self.cfg.batch_size * saved_world_size)),
                               saved_world_size)
        self._restore_optimizer(path, state)
        self._restore_schedule(state["scheduler"])
        self._restore_rng(state, saved_world_size)
        self.state = TrainState.from_dict(state)
        log.info("resumed from %s at step %d", path, self.state.step)

    def _barrier(self) -> None:
        if self.dist.world_size > 1:
            torch.distributed.barrier()

    def _checkpoint(self) -> None:
        """Stage, fill and seal checkpoint `step`; every rank calls it (see onerec.checkpoint)."""
        directory = self.stage_dir / "checkpoints"
        train_state = self._train_state()  # collective: it gathers the per-rank RNG states
        weights = self._full_weights()  # collective under expert parallelism
        # Every rank holds the same full weights, so all refuse a poisoned state together.
        check_finite(weights, f"checkpoint step {self.state.step} to {directory}")
        if self.dist.is_main:
            begin_checkpoint(directory, self.state.step)
        self._barrier()
        staging = staging_dir(directory, self.state.step)
        if self.optimizer_per_rank:
            write_rank_state(staging, self.dist.rank, {"optimizer": self._optimizer_fragments()})
        self._barrier()
        if self.dist.is_main:
            finish_checkpoint(
                staging,
                self.state.step,
                weights,
                train_state,
                self.config_dict,
                keep=self.cfg.keep_checkpoints,
                rank_files=self.dist.world_size if self.optimizer_per_rank else 0,
                run_id=self.state.run_id,
            )
        self._barrier()

    # ------------------------------------------------------- non-finite steps
    def _all_ranks_agree(self, ok: bool) -> bool:
        """True only if `ok` holds on every rank: one rank skipping a step alone would
        leave the others waiting forever in the gradient all-reduce."""
        if self.dist.world_size == 1:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0], device=self.dist.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag.item() == 0.0

    def _grads_finite(self) -> bool:
        """Whether the (already all-reduced) gradients are finite: one pass over them, one sync.

        ZeRO-2 moves gradients into its own partitioned buffers during backward, leaving
        `.grad` empty; there only the loss check applies.
        """
        grads = [p.grad.detach() for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return True
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
        return bool(torch.isfinite(norms).all().item())

    def _skip_step(self, what: str, value: float) -> None:
        """Drop this step's gradients, keep the LR schedule in step, count; stop after too many."""
        self.engine.zero_grad()
        if hasattr(self.engine.optimizer, "zero_grad"):
            self.engine.optimizer.zero_grad()
        with warnings.catch_warnings():
            # LambdaLR warns when it steps before the optimizer ever has (a skipped first step).
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        self.state.nonfinite_in_a_row += 1
        self.state.nonfinite_total += 1
        log.warning(
            "step %d: non-finite %s (%s), update skipped (%d in a row, %d in this run)",
            self.state.step + 1, what, value, self.state.nonfinite_in_a_row, self.state.nonfinite_total,
        )
        if self.state.nonfinite_in_a_row > self.cfg.max_nonfinite_steps:
            first = self.state.step + 2 - self.state.nonfinite_in_a_row
            raise NonFiniteLossError(
                f"{self.state.nonfinite_in_a_row} steps in a row (steps {first}-{self.state.step + 1}) had a non-finite "
                f"loss or gradient, more than train.max_nonfinite_steps={self.cfg.max_nonfinite_steps}: "
                "lower train.lr, check the data, or resume from the last checkpoint "
                f"in {self.stage_dir / 'checkpoints'} (none was written from the bad steps)"
            )

    # ------------------------------------------------------------------ loop
    def _batches_from(self, step: int) -> Iterator[torch.Tensor]:
        return self.sampler.batches_from(step)

    def _evaluate(self) -> bool:
        """Run validation, keep the best weights; True when early stopping should end the run."""
        if self.eval_fn is None:
            return False
        self.model.eval()
        metrics = self.eval_fn()
        self.model.train()
        value = metrics[self.select_metric]
        self.logger.log({f"valid/{k}": v for k, v in metrics.items()}, self.state.step)
        if value > self.state.best_metric:
            self.state.best_metric, self.state.best_step = value, self.state.step
            self.state.evals_without_improvement = 0
            if self.expert_parallel or self.dist.is_main:  # gathering experts takes every rank
                full_state = self._full_weights()
            if self.dist.is_main:
                save_weights(
                    self.model, self.stage_dir / BEST_WEIGHTS, full_state,
                    provenance={"run_id": self.state.run_id, "step": self.state.step, self.select_metric: value},
                )
        else:
            self.state.evals_without_improvement += 1
        log.info(
            "step %d: valid %s=%.4f (best %.4f at step %d)",
            self.state.step, self.select_metric, value, self.state.best_metric, self.state.best_step,
        )
        return self.cfg.patience > 0 and self.state.evals_without_improvement >= self.cfg.patience

    # ------------------------------------------------------------------ runs
    def _share_run_id(self, run_id: str) -> str:
        """Rank 0's run id on every rank (a collective)."""
        if self.dist.world_size == 1:
            return run_id
        id_16 = torch.zeros(16, dtype=torch.uint8, device=self.dist.device)
        if self.dist.is_main:
            id_16.copy_(torch.tensor(list(bytes.fromhex(run_id)), dtype=torch.uint8))
        torch.distributed.broadcast(id_16, src=0)
        return bytes(id_16.cpu().tolist()).hex()

    def _set_aside_other_runs(self, run_id: str) -> None:
        """Rank 0, at a fresh start: move other runs' checkpoints and best weights out of the way."""
        checkpoints = self.stage_dir / "checkpoints"
        set_aside_other_runs(checkpoints, run_id)
        best = self.stage_dir / BEST_WEIGHTS
        if best.parent.is_dir():  # not this run's: it has only just started
            owner = str(weights_provenance(best).get("run_id", ""))
            moved = set_aside(best.parent, checkpoints, owner)
            log.warning("%s held another run's best weights (%s); moved them aside to %s",
                        best.parent, owner or "written before runs had ids", moved)

    def _start_run(self, resumed: bool) -> None:
        """Give the run its id: a new one at a fresh start (after moving other runs' files aside)
        or when the restored checkpoint predates run ids; a resume otherwise keeps its own."""
        if self.state.run_id:
            return
        # Every rank has looked at the checkpoints (resolve_resume) before rank 0 moves any.
        self._barrier()
        run_id = uuid.uuid4().hex if self.dist.is_main else ""
        if self.dist.is_main and not resumed:
            self._set_aside_other_runs(run_id)
        self.state.run_id = self._share_run_id(run_id)
        if resumed:
            self._continues_unstamped_run = True
            log.info("the checkpoint predates run ids: continuing it as run %s", self.state.run_id)
        else:
            log.info("starting run %s", self.state.run_id)

    def _own_best_weights(self) -> Optional[Path]:
        """best/ if this run wrote it (now, or in an attempt this resume continues), else None."""
        best = self.stage_dir / BEST_WEIGHTS
        if not best.is_file():
            return None
        written = weights_provenance(best)
        unstamped = "run_id" not in written and self._continues_unstamped_run
        if written.get("run_id") != self.state.run_id and not unstamped:
            log.warning("%s was not written by this run (%s), so it is not reported as its best weights",
                        best, self.state.run_id)
            return None
        if not unstamped and written.get("step") != self.state.best_step:
            # An attempt that died after saving them but before its next checkpoint: the
            # replay from that checkpoint did not reach them again (on a GPU, not bit for bit).
            log.warning("%s holds step %s of this run; the restored counters name step %d as the best",
                        best, written.get("step"), self.state.best_step)
        return best

    def fit(self) -> FitResult:
        """Train to the end; on SIGUSR1/SIGTERM checkpoint at the step's end and raise
        TrainingInterrupted (exit code 75), see onerec/train/preemption.py."""
        with self._stop_signals:
            return self._fit()

    def _stop_requested(self) -> bool:
        """Whether any rank received a stop signal (a collective at each step boundary, so
        every rank stops at the same step)."""
        return not self._all_ranks_agree(self._stop_signals.received is None)

    def _fit(self) -> FitResult:
        resume_from = resolve_resume(self.cfg.resume, self.stage_dir / "checkpoints")
        if resume_from is not None and self.cfg.resume == "auto":
            changed = config_changes(read_manifest(resume_from / "manifest.json").get("config") or {}, self.config_dict)
            if changed:  # every launcher passes resume=auto: never continue a run made with other settings
                log.warning("not resuming %s: it was trained with other settings (%s); starting a fresh run, "
                            "its checkpoints are set aside", resume_from, ", ".join(changed[:5]))
                resume_from = None
        if resume_from is not None:
            self._restore(resume_from)
        self._start_run(resumed=resume_from is not None)
        self.logger.set_training_run(self.state.run_id)  # a fresh run opens a new W&B run; a resumed one continues its own
        self.model.train()
        stopped_early = False
        window_start, window_samples = time.perf_counter(), 0
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc="train",
            disable=not self.dist.is_main or progress_disabled(),
            dynamic_ncols=True,
        )
        batches = self._batches_from(self.state.step)
        while self.state.step < self.total_steps:
            indices = next(batches)
            with torch.autocast(
                self.dist.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None
            ):
                loss, scalars = self.step_fn(self.engine, indices)
            loss_value = loss.item()
            # Checked before backward: a NaN loss would otherwise reach every rank's
            # weights through the gradient all-reduce.
            if not self._all_ranks_agree(math.isfinite(loss_value)):
                self._skip_step("loss", loss_value)
            else:
                self.engine.backward(loss)
                if not self._all_ranks_agree(self._grads_finite()):
                    self._skip_step("gradient", loss_value)
                else:
                    self.engine.step()
                    self.state.nonfinite_in_a_row = 0
            self.state.step += 1
            window_samples += len(indices) * self.dist.world_size
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")

            if self.state.step % self.cfg.log_every == 0 or self.state.step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                self.logger.log(
                    {
                        "loss": loss_value,
                        **scalars,
                        "lr": self.scheduler.get_last_lr()[0],
                        "epoch": self.state.step / self.steps_per_epoch,
                        "samples_per_s": window_samples / max(elapsed, 1e-9),
                        "nonfinite_steps": self.state.nonfinite_total,
                    },
                    self.state.step,
                )
                window_start, window_samples = time.perf_counter(), 0
            at_end = self.state.step == self.total_steps
            if self.state.step % self.cfg.eval_every == 0 or at_end:
                stopped_early = self._evaluate()
            checkpointed = self.state.step % self.cfg.checkpoint_every == 0 or at_end or stopped_early
            if checkpointed:
                self._checkpoint()
            if self.after_step is not None:
                self.after_step(self.state.step)
            if stopped_early:
                log.info("early stopping at step %d: no improvement in %d evaluations", self.state.step, self.cfg.patience)
                break
            if not at_end and self._stop_requested():
                if not checkpointed:
                    self._checkpoint()
                bar.close()
                reason = self._stop_signals.received or "a signal on another rank"
                log.warning("step %d: stopped on %s, checkpoint in %s; run the same command again to continue",
                            self.state.step, reason, self.stage_dir / "checkpoints")
                raise TrainingInterrupted(self.state.step, reason)
        bar.close()
        return FitResult(
            steps=self.state.step,
            best_step=self.state.best_step,
            best_metric=self.state.best_metric,
            stopped_early=stopped_early,
            best_weights=self._own_best_weights(),
        )
