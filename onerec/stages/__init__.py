"""The stage table: every `onerec` command, with what it reads, what marks it done, and
whether `onerec pipeline` runs it. The CLI builds its sub-commands from this table, `onerec
pipeline` runs `pipeline_stages(cfg)` in order, and launch/pipeline.sh reads the same list
through `onerec plan`, so the three never disagree.

    data -> [baseline] -> tokenize -> pretrain -> [reward] -> [dpo] -> evaluate
              |                                      |          |
              tokenizer.collaborative_source         reward.    align.enabled
              names sasrec, or sasrec_pp.enabled     enabled
              or hstu.enabled

Before a stage runs, `run_stage` checks, in this order and before the stage module (torch,
DeepSpeed, a process group) loads: the run directory is safe to write (onerec/run_dir.py),
the earlier stages' outputs exist, and they are fresh, i.e. made from the current config
and from each other (onerec/provenance.py); then it takes the run directory's lock for the
stage (onerec/locks.py), so a second process into the same run stops with a message. After
it succeeds, the stage's provenance record is written; `onerec pipeline` reruns exactly the
stages that are not fresh.

Each command is the module `onerec.stages.<name>`. Stage modules are imported only when
their command runs, so `onerec --help` and `onerec config` start fast; a module whose
command takes its own arguments (not `--config`) defines `add_arguments(parser)` and
`main(args)`, and keeps its heavy imports inside `main`.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional, Union

from onerec.config import ConfigError, RootConfig, to_dict
from onerec.errors import StaleInputError
from onerec.locks import stage_lock
from onerec.paths import RunPaths
from onerec.provenance import (
    LEGACY_OUTPUT,
    Record,
    changed_keys,
    config_subset,
    fingerprint,
    has_digests,
    new_record,
    raw_file_identity,
    raw_file_listing,
    read_record,
    write_record,
)
from onerec.run_dir import check_out_dir, open_run_dir

log = logging.getLogger("onerec.stages")

# (file or directory relative to run.out_dir, the command that writes it)
Input = tuple[str, str]


def _always(cfg: RootConfig) -> bool:
    return True


def _check_sasrec_source(cfg: RootConfig) -> None:
    """ConfigError when tokenize would read SASRec's item vectors that `onerec baseline` is told
    not to train (they would be missing, or left over from another config)."""
    if cfg.tokenizer.needs_sasrec and not cfg.sasrec.enabled:
        raise ConfigError(
            f"tokenizer.collaborative_source={cfg.tokenizer.collaborative_source} reads the item vectors of the "
            "`sasrec` baseline, but sasrec.enabled=false: set sasrec.enabled=true, or use collaborative_source="
            "cooccurrence"
        )


def check_item_head(cfg: RootConfig) -> None:
    """ConfigError when the item head (train.item_loss_weight, eval.item_score_weight) is asked
    of a model without the item-ID table that is its output layer."""
    if cfg.model.item_id_embedding:
        return
    for key, weight in (("train.item_loss_weight", cfg.train.item_loss_weight),
                        ("eval.item_score_weight", cfg.eval.item_score_weight)):
        if weight > 0:
            raise ConfigError(
                f"{key}={weight} needs model.item_id_embedding=true: the item head scores every item against "
                f"the item-ID embedding table, which is off; set model.item_id_embedding=true or {key}=0"
            )


def _pretrain_inputs(cfg: RootConfig) -> list[Input]:
    check_item_head(cfg)
    return [("data/meta.json", "data"), ("semantic_ids/semantic_ids.json", "tokenize")]


def _tokenize_inputs(cfg: RootConfig) -> list[Input]:
    inputs = [("data/meta.json", "data")]
    if cfg.tokenizer.needs_sasrec:
        _check_sasrec_source(cfg)
        inputs.append(("baselines/sasrec/model.safetensors", "baseline"))
    return inputs


def _baseline_done(cfg: RootConfig) -> str:
    """The metrics.json of the last baseline model the stage trains (each is written when that
    model is done, in order); `sasrec`'s when none is enabled."""
    return f"baselines/{(cfg.enabled_baselines or ('sasrec',))[-1]}/metrics.json"


def _evaluate_inputs(cfg: RootConfig) -> list[Input]:
    inputs = [("data/meta.json", "data"), ("pretrain/export/model.safetensors", "pretrain")]
    if cfg.align.enabled:  # the aligned model is scored, the pretrained one beside it
        inputs.append(("dpo/export/model.safetensors", "dpo"))
    return inputs


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    # Inputs that earlier stages write; checked before the stage starts (before any
    # distributed start-up), so a missing one is a message in a second, not after a minute.
    inputs: Callable[[RootConfig], list[Input]] = lambda cfg: []
    # The file whose presence means the stage finished (stages write atomically); a function of
    # the config where that depends on it.
    done_marker: Union[str, Callable[[RootConfig], str], None] = None
    # Runs on every rank of a launcher (torchrun / deepspeed / srun): pretrain and reward
    # train data parallel, tokenize shards the items. launch/pipeline.sh starts these under its launcher;
    # `onerec pipeline` runs every stage in its one process, where a world of one does it all.
    distributed: bool = False
    # Whether `onerec pipeline` runs it for this config (None: not a pipeline stage).
    in_pipeline: Optional[Callable[[RootConfig], bool]] = None
    # False: the command takes its own arguments (module.add_arguments), not --config.
    takes_config: bool = True
    resumable: bool = False
    # The config sections (or single keys) whose values can change this stage's output: part
    # of its provenance fingerprint.
    config_sections: tuple[str, ...] = ()
    # Keys inside those sections that cannot change this stage's output (left out of it).
    config_ignored: tuple[str, ...] = ()
    # Writes under run.out_dir (everything but printing the config).
    writes_run_dir: bool = True

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
        if self.done_marker is None:
            return None
        marker = self.done_marker(cfg) if callable(self.done_marker) else self.done_marker
        return RunPaths.of(cfg.run.out_dir).root / marker

    def upstream(self, cfg: RootConfig) -> list[str]:
        """The stages whose output this one reads, in pipeline order."""
        return list(dict.fromkeys(producer for _, producer in self.inputs(cfg)))

    @property
    def records_provenance(self) -> bool:
        return self.in_pipeline is not None

    def config_keys(self, cfg: RootConfig) -> dict:
        """The flattened config values this stage's output depends on (its fingerprint's part)."""
        config = config_subset(to_dict(cfg), self.config_sections)
        return {key: value for key, value in config.items() if key not in self.config_ignored}


# Inference settings the training stages never read (their validation ranks the plain beams);
# only evaluate, recommend and serve apply them, so changing one after training reruns evaluate
# alone.
AFTER_TRAINING = ("eval.item_score_weight",)

STAGES: tuple[Stage, ...] = (
    Stage("data", "raw files -> validated, dense-id tables in <out>/data",
          done_marker="data/meta.json", in_pipeline=_always, config_sections=("data",)),
    Stage("baseline", "SASRec (+ SASRec++ / HSTU when enabled) on the same split -> <out>/baselines/<model>",
          inputs=lambda cfg: [("data/meta.json", "data")], done_marker=_baseline_done,
          # tokenize reads SASRec's vectors, or a baseline beyond `sasrec` was asked for
          in_pipeline=lambda cfg: cfg.tokenizer.needs_sasrec or any(m != "sasrec" for m in cfg.enabled_baselines),
          config_sections=("data", "sasrec", "sasrec_pp", "hstu", "eval", "run.seed"), config_ignored=AFTER_TRAINING),
    Stage("tokenize", "item embeddings -> semantic IDs + trie in <out>/semantic_ids",
          inputs=_tokenize_inputs, done_marker="semantic_ids/semantic_ids.json", distributed=True, in_pipeline=_always,
          config_sections=("data", "tokenizer", "run.seed")),
    Stage("pretrain", "next-token training of the MoE encoder-decoder -> <out>/pretrain/export",
          inputs=_pretrain_inputs,
          done_marker="pretrain/export/model.safetensors", distributed=True, in_pipeline=_always, resumable=True,
          config_sections=("data", "model", "train", "eval", "parallel", "run.seed"), config_ignored=AFTER_TRAINING),
    Stage("reward", "session reward model on logged feedback -> <out>/reward",
          inputs=lambda cfg: [("data/meta.json", "data"), ("semantic_ids/semantic_ids.json", "tokenize")],
          done_marker="reward/reward.json", distributed=True, in_pipeline=lambda cfg: cfg.reward.enabled,
          resumable=True, config_sections=("data", "reward", "run.seed")),
    Stage("dpo", "Iterative Preference Alignment (beam samples, reward, DPO + NTP) -> <out>/dpo/export",
          inputs=lambda cfg: [("data/meta.json", "data"), ("pretrain/export/model.safetensors", "pretrain"),
                              ("reward/reward.json", "reward")],
          done_marker="dpo/alignment.json", distributed=True, in_pipeline=lambda cfg: cfg.align.enabled,
          resumable=True, config_sections=("data", "align", "eval", "run.seed", "parallel", "train.precision",
                                           "train.zero_stage", "train.grad_clip"), config_ignored=AFTER_TRAINING),
    Stage("evaluate", "validation and test Recall/NDCG@K beside popularity -> <out>/metrics.json",
          inputs=_evaluate_inputs, done_marker="metrics.json", in_pipeline=_always,
          config_sections=("data", "eval", "align.enabled")),
    Stage("pipeline", "run, in order, the stages this config enables whose output is not fresh", resumable=True),
    Stage("recommend", "top-K items for a history or a file of requests, from a model export", takes_config=False),
    Stage("serve", "recommendations over HTTP from a model export, concurrent requests batched", takes_config=False),
    Stage("report", "figures and tables of a run directory -> RUN_DIR/report.html", takes_config=False),
    Stage("config", "print the resolved config (defaults < YAML < overrides) and exit", writes_run_dir=False),
    Stage("plan", "save <out>/config.yaml and print the stages `onerec pipeline` would run (for launch scripts)"),
)

BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}


def pipeline_stages(cfg: RootConfig) -> list[Stage]:
    """The stages `onerec pipeline` runs for `cfg`, in order."""
    if cfg.align.enabled and not cfg.reward.enabled:
        raise ValueError("align.enabled needs the reward model: set reward.enabled=true as well")
    _check_sasrec_source(cfg)
    check_item_head(cfg)
    return [stage for stage in STAGES if stage.in_pipeline is not None and stage.in_pipeline(cfg)]


def _record_inputs(stage: Stage, cfg: RootConfig, previous: Optional[Record] = None) -> tuple[dict, dict[str, str], list]:
    """What `stage` would be made from now: its config keys, the upstream outputs it would
    read (by output id), and for `data` the raw files. `previous`: the stage's own record;
    its digests are reused for the files whose size and time did not move, and a record older
    than digests gets a listing in its own form."""
    root = RunPaths.of(cfg.run.out_dir).root
    config = stage.config_keys(cfg)
    upstream = {}
    for name in stage.upstream(cfg):
        record = read_record(root, name)
        upstream[name] = record.output_id if record is not None else LEGACY_OUTPUT
    raw_files = []
    if stage.name == "data":
        known = previous.raw_files if previous is not None else []
        raw_files = raw_file_listing(cfg.data.root, known=known, digests=has_digests(known))
    return config, upstream, raw_files


def freshness(stage: Stage, cfg: RootConfig) -> tuple[bool, str]:
    """(whether `stage`'s output exists and was made from the current config and upstream
    outputs, why not)."""
    root = RunPaths.of(cfg.run.out_dir).root
    done = stage.done_path(cfg)
    if done is None or not done.exists():
        return False, "it has not finished"
    record = read_record(root, stage.name)
    if record is None:
        log.warning("%s: no provenance record (written by an older onerec): trusting it", done)
        return True, "no record"
    config, upstream, raw_files = _record_inputs(stage, cfg, previous=record)
    if fingerprint(stage.name, config, upstream, raw_files) == record.fingerprint:
        return True, "up to date"
    changed = changed_keys(record.config, config)
    if changed:
        return False, "config changed since it ran: " + ", ".join(changed[:6]) + (" ..." if len(changed) > 6 else "")
    remade = [name for name in upstream if record.upstream.get(name) != upstream[name]]
    if remade:
        return False, "made from an earlier output of " + ", ".join(f"`{name}`" for name in remade)
    if raw_file_identity(raw_files) != raw_file_identity(record.raw_files):
        if not has_digests(record.raw_files):  # an older record knows times, not contents
            return False, f"the raw files under data.root={cfg.data.root} have other sizes or times than when it ran"
        return False, f"the raw files under data.root={cfg.data.root} changed since it ran"
    return False, f"made by onerec {record.onerec}"


def _ancestors(stage: Stage, cfg: RootConfig) -> list[Stage]:
    """Every stage `stage` reads from, directly or not, in pipeline order."""
    seen: set[str] = set()
    pending = stage.upstream(cfg)
    while pending:
        name = pending.pop()
        if name not in seen:
            seen.add(name)
            pending.extend(BY_NAME[name].upstream(cfg))
    return [s for s in STAGES if s.name in seen]


def check_fresh_inputs(stage: Stage, cfg: RootConfig) -> None:
    """StaleInputError naming the first earlier stage to rerun when an input of `stage` is stale."""
    for ancestor in _ancestors(stage, cfg):
        fresh, reason = freshness(ancestor, cfg)
        if not fresh:
            raise StaleInputError(
                f"`onerec {stage.name}` reads outputs made by `onerec {ancestor.name}`, whose output in "
                f"{cfg.run.out_dir} is stale ({reason}): rerun `onerec {ancestor.name}` and the stages after it, "
                f"or `onerec pipeline`, which reruns exactly the stages that are stale"
            )


def run_stage(stage: Stage, cfg: RootConfig, **kwargs) -> object:
    """Run one config-reading stage after the checks in the module docstring, and record its
    provenance when it succeeds."""
    if stage.writes_run_dir:
        check_out_dir(cfg.run.out_dir, cfg.data.root)
    stage.check_inputs(cfg)
    check_fresh_inputs(stage, cfg)
    if cfg.run.device == "cuda" and stage.records_provenance:  # a missing GPU stops the first stage
        from onerec.device import resolve_device  # torch loads only in this case

        resolve_device(cfg.run.device)
    if stage.writes_run_dir:  # only now: a refused command leaves no directory behind
        open_run_dir(cfg.run.out_dir, cfg.data.root)
    if not stage.records_provenance:
        return stage.load().main(cfg, **kwargs)
    root = RunPaths.of(cfg.run.out_dir).root
    # One process per run directory and stage (global rank 0 holds it for a distributed job).
    with stage_lock(root, stage.name):
        record = new_record(stage.name, *_record_inputs(stage, cfg))
        result = stage.load().main(cfg, **kwargs)
        if os.environ.get("RANK", "0") == "0":
            write_record(root, record)
    return result
