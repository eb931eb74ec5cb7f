"""`onerec plan --config FILE [key=value ...]`: save <out>/config.yaml and print the stages
`onerec pipeline` would run, one per line, for launch/pipeline.sh to follow:

    <stage>\t<distributed: 0|1>\t<run: 0|1>\t<why>

`run` is 0 for a stage whose output is fresh (onerec/provenance.py) and whose upstream
stages are not rerun either; so the shell pipeline and the Python one read the same stage
table and skip the same stages.
"""

from __future__ import annotations

from onerec.config import RootConfig
from onerec.paths import save_resolved_config
from onerec.stages import freshness, pipeline_stages


def main(cfg: RootConfig, force: bool = False) -> list[str]:
    stages = pipeline_stages(cfg)
    save_resolved_config(cfg)
    lines, rerun = [], set()
    for stage in stages:
        fresh, reason = (False, "--force") if force else freshness(stage, cfg)
        remade = [name for name in stage.upstream(cfg) if name in rerun]
        if fresh and remade:  # its input will be remade first
            fresh, reason = False, "reads the output of " + ", ".join(remade) + ", which reruns"
        if not fresh:
            rerun.add(stage.name)
        lines.append(f"{stage.name}\t{int(stage.distributed)}\t{int(not fresh)}\t{reason}")
    print("\n".join(lines))
    return lines
