"""The shared training loop: DeepSpeed engine, warmup + cosine schedule, periodic
validation with early stopping, best-weights copy, atomic resumable checkpoints.

Data order is a pure function of (seed, epoch): each epoch is a seeded permutation of
example indices, split into global batches, each rank taking its slice. A checkpoint
therefore only needs the step counter to find its place again, plus the torch RNG state
for dropout; a resumed CPU run reproduces the uninterrupted run's losses exactly.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from tqdm.auto import tqdm

from onerec.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, save_weights
from onerec.config import TrainConfig
from onerec.distributed.deepspeed import DistInfo, autocast_dtype, build_engine
from onerec.logging import RunLogger, progress_disabled

log = logging.getLogger("onerec.train")

BEST_WEIGHTS = "best/model.safetensors"

# (engine, example indices) -> (loss to optimise, scalars to log)
StepFn = Callable[[Any, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
# () -> validation metrics (every rank calls it; it returns the same numbers everywhere)
EvalFn = Callable[[], dict[str, float]]


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def epoch_batches(
    num_examples: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int
) -> list[torch.Tensor]:
    """This rank's example indices for each step of `epoch` (the last global batch may be short)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_examples, generator=generator)
    global_batch = batch_size * world_size
    batches = []
    for start in range(0, num_examples, global_batch):
        chunk = order[start : start + global_batch]
        per_rank = math.ceil(len(chunk) / world_size)
        batches.append(chunk[rank * per_rank : (rank + 1) * per_rank])
    return batches


@dataclass
class FitResult:
    steps: int
    best_step: int
    best_metric: float
    stopped_early: bool
    best_weights: Optional[Path]


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
        self.steps_per_epoch = math.ceil(num_examples / (cfg.batch_size * dist_info.world_size))
        by_epochs = cfg.max_epochs * self.steps_per_epoch
        self.total_steps = min(by_epochs, cfg.max_steps) if cfg.max_steps > 0 else by_epochs
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

        self.step = 0
        self.best_metric = -math.inf
        self.best_step = -1
        self.evals_without_improvement = 0

    # ----------------------------------------------------------------- state
    def _train_state(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "evals_without_improvement": self.evals_without_improvement,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state()
        return state

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path, self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])
        self.step = int(state["step"])
        self.best_metric = float(state["best_metric"])
        self.best_step = int(state["best_step"])
        self.evals_without_improvement = int(state["evals_without_improvement"])
        log.info("resumed from %s at step %d", path, self.step)

    def _checkpoint(self) -> None:
        if self.dist.is_main:
            save_checkpoint(
                self.stage_dir / "checkpoints",
                self.step,
                self.model,
                self._train_state(),
                self.config_dict,
                keep=self.cfg.keep_checkpoints,
            )
        if self.dist.world_size > 1:
            torch.distributed.barrier()

    # ------------------------------------------------------------------ loop
    def _batches_from(self, step: int) -> Iterator[torch.Tensor]:
        epoch, offset = divmod(step, self.steps_per_epoch)
        while True:
            batches = epoch_batches(
                self.num_examples, self.cfg.batch_size, self.seed, epoch, self.dist.rank, self.dist.world_size
            )
            yield from batches[offset:]
            epoch, offset = epoch + 1, 0

    def _evaluate(self) -> bool:
        """Run validation, keep the best weights; True when early stopping should end the run."""
        if self.eval_fn is None:
            return False
        self.model.eval()
        metrics = self.eval_fn()
        self.model.train()
        value = metrics[self.select_metric]
        self.logger.log({f"valid/{k}": v for k, v in metrics.items()}, self.step)
        if value > self.best_metric:
            self.best_metric, self.best_step = value, self.step
            self.evals_without_improvement = 0
            if self.dist.is_main:
                save_weights(self.model, self.stage_dir / BEST_WEIGHTS)
        else:
            self.evals_without_improvement += 1
        log.info(
            "step %d: valid %s=%.4f (best %.4f at step %d)",
            self.step, self.select_metric, value, self.best_metric, self.best_step,
        )
        return self.cfg.patience > 0 and self.evals_without_improvement >= self.cfg.patience

    def fit(self) -> FitResult:
        resume_from = resolve_resume(self.cfg.resume, self.stage_dir / "checkpoints")
        if resume_from is not None:
            self._restore(resume_from)
        self.model.train()
        stopped_early = False
        window_start, window_samples = time.perf_counter(), 0
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            disable=not self.dist.is_main or progress_disabled(),
            dynamic_ncols=True,
        )
        batches = self._batches_from(self.step)
        while self.step < self.total_steps:
            indices = next(batches)
            with torch.autocast(
                self.dist.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None
            ):
                loss, scalars = self.step_fn(self.engine, indices)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"non-finite loss ({loss_value}) at step {self.step}; lower train.lr or check the data"
                )
            self.engine.backward(loss)
            self.engine.step()
            self.step += 1
            window_samples += len(indices) * self.dist.world_size
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")

            if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                self.logger.log(
                    {
                        "loss": loss_value,
                        **scalars,
                        "lr": self.scheduler.get_last_lr()[0],
                        "epoch": self.step / self.steps_per_epoch,
                        "samples_per_s": window_samples / max(elapsed, 1e-9),
                    },
                    self.step,
                )
                window_start, window_samples = time.perf_counter(), 0
            at_end = self.step == self.total_steps
            if self.step % self.cfg.eval_every == 0 or at_end:
                stopped_early = self._evaluate()
            if self.step % self.cfg.checkpoint_every == 0 or at_end or stopped_early:
                self._checkpoint()
            if stopped_early:
                log.info("early stopping at step %d: no improvement in %d evaluations", self.step, self.cfg.patience)
                break
        bar.close()
        best = self.stage_dir / BEST_WEIGHTS
        return FitResult(
            steps=self.step,
            best_step=self.best_step,
            best_metric=self.best_metric,
            stopped_early=stopped_early,
            best_weights=best if best.is_file() else None,
        )
