"""`onerec pipeline`: every stage `pipeline_stages(cfg)` lists, in order, in this process, each
reading the previous stages' output under run.out_dir (see onerec/stages/__init__.py).

    data [-> baseline] -> tokenize -> pretrain [-> reward] [-> dpo] -> evaluate

The evaluate stage's metrics, with each stage's wall time added, end up in <out>/metrics.json.
launch/pipeline.sh runs the same list with the training stages under a distributed launcher.
"""

from __future__ import annotations

import logging
import time

from onerec.config import RootConfig
from onerec.logging import write_json_atomic
from onerec.paths import RunPaths, save_resolved_config
from onerec.stages import pipeline_stages, run_stage

log = logging.getLogger("onerec.pipeline")


def main(cfg: RootConfig) -> dict:
    stages = pipeline_stages(cfg)
    started = time.perf_counter()
    save_resolved_config(cfg)
    timings, metrics = {}, {}
    for stage in stages:
        log.info("== stage %s ==", stage.name)
        stage_started = time.perf_counter()
        result = run_stage(stage, cfg)
        timings[stage.name] = time.perf_counter() - stage_started
        if stage.name == "evaluate":
            metrics = result
    metrics["stage_seconds"] = timings
    metrics["wall_seconds"] = time.perf_counter() - started
    write_json_atomic(RunPaths.of(cfg.run.out_dir).metrics, metrics)
    log.info("pipeline finished in %.1f s", metrics["wall_seconds"])
    return metrics
