"""`onerec pipeline`: the stages `pipeline_stages(cfg)` lists, in order, in this process, each
reading the previous stages' output under run.out_dir (see onerec/stages/__init__.py).

    data [-> baseline] -> tokenize -> pretrain [-> reward] [-> dpo] -> evaluate

A stage whose output is fresh (made from the current config and the current outputs of the
stages before it: onerec/provenance.py) is skipped, so a rerun after editing train.lr
starts at pretrain; `--force` reruns every stage. The evaluate stage's metrics, with the wall
time of each stage that ran, end up in <out>/metrics.json. launch/pipeline.sh runs the same
list with the training stages under a distributed launcher.
"""

from __future__ import annotations

import json
import logging
import time

from onerec.config import RootConfig
from onerec.logging import write_json_atomic
from onerec.paths import RunPaths, save_resolved_config
from onerec.stages import freshness, pipeline_stages, run_stage

log = logging.getLogger("onerec.pipeline")


def main(cfg: RootConfig, force: bool = False) -> dict:
    stages = pipeline_stages(cfg)
    started = time.perf_counter()
    save_resolved_config(cfg)
    paths = RunPaths.of(cfg.run.out_dir)
    timings, metrics = {}, None
    for stage in stages:
        # Checked just before each stage: a stage that reran gives its output a new id, which
        # makes every stage that read the old one stale.
        fresh, reason = (False, "--force") if force else freshness(stage, cfg)
        if fresh:
            log.info("== stage %s: up to date, skipped ==", stage.name)
            continue
        log.info("== stage %s (%s) ==", stage.name, reason)
        stage_started = time.perf_counter()
        result = run_stage(stage, cfg)
        timings[stage.name] = time.perf_counter() - stage_started
        if stage.name == "evaluate":
            metrics = result
    if metrics is None:
        log.info("every stage is up to date: %s is unchanged (--force reruns them all)", paths.metrics)
        return json.loads(paths.metrics.read_text(encoding="utf-8"))
    metrics["stage_seconds"] = timings
    metrics["wall_seconds"] = time.perf_counter() - started
    write_json_atomic(paths.metrics, metrics)
    log.info("pipeline finished in %.1f s", metrics["wall_seconds"])
    return metrics
