"""The stage table: every `onerec` command, with what it reads, what marks it done, and
whether `onerec pipeline` runs it. The CLI builds its sub-commands from this table, `onerec
pipeline` runs `pipeline_stages(cfg)` in order, and launch/pipeline.sh reads the same list
through `onerec plan`, so the three never disagree.

    data -> [baseline] -> tokenize -> pretrain -> [reward] -> [dpo] -> evaluate
              |                                      |          |
              tokenizer.collaborative_source         reward.    align.enabled
              names sasrec                           enabled

Each command is the module `onerec.stages.<name>`. Stage modules are imported only when
their command runs, so `onerec --help` and `onerec config` start fast; a module whose
command takes its own arguments (not `--config`) defines `add_arguments(parser)` and
`main(args)`, and keeps its heavy imports inside `main`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

from onerec.config import RootConfig
from onerec.paths import RunPaths

# (file or directory relative to run.out_dir, the command that writes it)
Input = tuple[str, str]


def _always(cfg: RootConfig) -> bool:
    return True


def _tokenize_inputs(cfg: RootConfig) -> list[Input]:
    inputs = [("data/meta.json", "data")]
    if cfg.tokenizer.needs_sasrec:
        inputs.append(("baselines/sasrec/model.safetensors", "baseline"))
    return inputs


def _evaluate_inputs(cfg: RootConfig) -> list[Input]:
    if cfg.align.enabled:
        return [("data/meta.json", "data"), ("dpo/export/model.safetensors", "dpo")]
    return [("data/meta.json", "data"), ("pretrain/export/model.safetensors", "pretrain")]


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    # Inputs that earlier stages write; checked before the stage starts (before any
    # distributed start-up), so a missing one is a message in a second, not after a minute.
    inputs: Callable[[RootConfig], list[Input]] = lambda cfg: []
    # The file whose presence means the stage finished (stages write atomically).
    done_marker: Optional[str] = None
    # Trains or samples on every rank of a launcher (torchrun / deepspeed / srun).
    distributed: bool = False
    # Whether `onerec pipeline` runs it for this config (None: not a pipeline stage).
    in_pipeline: Optional[Callable[[RootConfig], bool]] = None
    # False: the command takes its own arguments (module.add_arguments), not --config.
    takes_config: bool = True
    resumable: bool = False

    @property
    def module_name(self) -> str:
        return f"onerec.stages.{self.name}"

    def load(self) -> ModuleType:
        return importlib.import_module(self.module_name)

    def missing_inputs(self, cfg: RootConfig) -> list[tuple[Path, str]]:
        root = RunPaths.of(cfg.run.out_dir).root
        return [(root / path, producer) for path, producer in self.inputs(cfg) if not (root / path).exists()]

    def check_inputs(self, cfg: RootConfig) -> None:
        """Raise FileNotFoundError naming the first missing input and the command that makes it."""
        for path, producer in self.missing_inputs(cfg):
            raise FileNotFoundError(
                f"`onerec {self.name}` needs {path}, which does not exist: run `onerec {producer}` "
                f"with the same run.out_dir ({cfg.run.out_dir}) first"
            )

    def done_path(self, cfg: RootConfig) -> Optional[Path]:
        return None if self.done_marker is None else RunPaths.of(cfg.run.out_dir).root / self.done_marker


STAGES: tuple[Stage, ...] = (
    Stage("data", "raw files -> validated, dense-id tables in <out>/data",
          done_marker="data/meta.json", in_pipeline=_always),
    Stage("baseline", "SASRec on the same split -> <out>/baselines/sasrec (metrics, item vectors)",
          inputs=lambda cfg: [("data/meta.json", "data")], done_marker="baselines/sasrec/metrics.json",
          in_pipeline=lambda cfg: cfg.tokenizer.needs_sasrec),
    Stage("tokenize", "item embeddings -> semantic IDs + trie in <out>/semantic_ids",
          inputs=_tokenize_inputs, done_marker="semantic_ids/semantic_ids.json", in_pipeline=_always),
    Stage("pretrain", "next-token training of the MoE encoder-decoder -> <out>/pretrain/export",
          inputs=lambda cfg: [("data/meta.json", "data"), ("semantic_ids/semantic_ids.json", "tokenize")],
          done_marker="pretrain/export/model.safetensors", distributed=True, in_pipeline=_always, resumable=True),
    Stage("reward", "session reward model on logged feedback -> <out>/reward",
          inputs=lambda cfg: [("data/meta.json", "data"), ("semantic_ids/semantic_ids.json", "tokenize")],
          done_marker="reward/reward.json", in_pipeline=lambda cfg: cfg.reward.enabled),
    Stage("dpo", "Iterative Preference Alignment (beam samples, reward, DPO + NTP) -> <out>/dpo/export",
          inputs=lambda cfg: [("data/meta.json", "data"), ("pretrain/export/model.safetensors", "pretrain"),
                              ("reward/reward.json", "reward")],
          done_marker="dpo/alignment.json", in_pipeline=lambda cfg: cfg.align.enabled),
    Stage("evaluate", "validation and test Recall/NDCG@K beside popularity -> <out>/metrics.json",
          inputs=_evaluate_inputs, done_marker="metrics.json", in_pipeline=_always),
    Stage("pipeline", "run every stage in order (those this config enables)", resumable=True),
    Stage("recommend", "top-K items for a history, from a model export", takes_config=False),
    Stage("report", "figures and tables of a run directory -> RUN_DIR/report.html", takes_config=False),
    Stage("config", "print the resolved config (defaults < YAML < overrides) and exit"),
    Stage("plan", "save <out>/config.yaml and print the stages `onerec pipeline` would run (for launch scripts)"),
)

BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}


def pipeline_stages(cfg: RootConfig) -> list[Stage]:
    """The stages `onerec pipeline` runs for `cfg`, in order."""
    if cfg.align.enabled and not cfg.reward.enabled:
        raise ValueError("align.enabled needs the reward model: set reward.enabled=true as well")
    return [stage for stage in STAGES if stage.in_pipeline is not None and stage.in_pipeline(cfg)]


def run_stage(stage: Stage, cfg: RootConfig) -> object:
    """Run one config-reading stage: its inputs are checked before its module (and with it
    torch, DeepSpeed and any process group) loads."""
    stage.check_inputs(cfg)
    return stage.load().main(cfg)
