"""`onerec plan --config FILE [key=value ...]`: save <out>/config.yaml and print the stages
`onerec pipeline` would run, one per line, for launch/pipeline.sh to follow:

    <stage>\t<distributed: 0|1>\t<file that marks it done>

so the shell pipeline and the Python one read the same stage table.
"""

from __future__ import annotations

from onerec.config import RootConfig
from onerec.paths import save_resolved_config
from onerec.stages import pipeline_stages


def main(cfg: RootConfig) -> list[str]:
    stages = pipeline_stages(cfg)
    save_resolved_config(cfg)
    lines = [f"{stage.name}\t{int(stage.distributed)}\t{stage.done_path(cfg)}" for stage in stages]
    print("\n".join(lines))
    return lines
