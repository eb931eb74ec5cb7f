"""`onerec pipeline`: every stage in order, each reading the previous stage's output directory.

    data [-> baseline] -> tokenize -> pretrain [-> reward] [-> dpo] -> evaluate   (all under run.out_dir)

baseline (SASRec) runs first when the semantic IDs are built from its item embeddings
(tokenizer.collaborative_source names sasrec); reward runs when reward.enabled, dpo when
align.enabled (which needs the reward model).
"""

from __future__ import annotations

import logging
import time

from omegaconf import OmegaConf

from onerec.config import RootConfig, to_dict
from onerec.logging import write_json_atomic
from onerec.paths import RunPaths

log = logging.getLogger("onerec.pipeline")


def save_resolved_config(cfg: RootConfig) -> None:
    paths = RunPaths.of(cfg.run.out_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    tmp = paths.resolved_config.with_suffix(".yaml.tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))), encoding="utf-8")
    tmp.replace(paths.resolved_config)


def main(cfg: RootConfig) -> dict:
    # Imported here so `onerec --help` stays fast and each stage's dependencies load only when used.
    from onerec.align import dpo_stage, reward_stage
    from onerec.baselines import stage as baseline_stage
    from onerec.data import stage as data_stage
    from onerec.inference import stage as evaluate_stage
    from onerec.tokenizer import stage as tokenize_stage
    from onerec.train import pretrain

    if cfg.align.enabled and not cfg.reward.enabled:
        raise ValueError("align.enabled needs the reward model: set reward.enabled=true as well")
    started = time.perf_counter()
    save_resolved_config(cfg)
    timings = {}
    stages = [("data", data_stage.main)]
    if cfg.tokenizer.needs_sasrec:
        stages.append(("baseline", baseline_stage.main))
    stages += [("tokenize", tokenize_stage.main), ("pretrain", pretrain.main)]
    if cfg.reward.enabled:
        stages.append(("reward", reward_stage.main))
    if cfg.align.enabled:
        stages.append(("dpo", dpo_stage.main))
    for name, stage_main in stages:
        log.info("== stage %s ==", name)
        stage_started = time.perf_counter()
        stage_main(cfg)
        timings[name] = time.perf_counter() - stage_started
    log.info("== stage evaluate ==")
    stage_started = time.perf_counter()
    metrics = evaluate_stage.main(cfg)
    timings["evaluate"] = time.perf_counter() - stage_started
    metrics["stage_seconds"] = timings
    metrics["wall_seconds"] = time.perf_counter() - started
    write_json_atomic(RunPaths.of(cfg.run.out_dir).metrics, metrics)
    log.info("pipeline finished in %.1f s", metrics["wall_seconds"])
    return metrics
