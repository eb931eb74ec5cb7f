"""`onerec dpo` on one rank of a job the test starts itself (tests/distributed/test_dpo_distributed.py,
through distributed_helpers.run_ranks): runs the stage once for every override list in
<out_dir>/configs.json, in order.

The stage's main is called directly, not through the CLI's freshness check: one of the runs
shards the experts (parallel.expert_parallel_size=2) over a model pretrained without, which
the check would call a stale input (parallel.* is part of pretraining's config).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from onerec.config import load_config
from onerec.logging import setup_console
from onerec.stages import dpo


def main(out_dir: Path) -> None:
    setup_console()
    results = [dpo.main(load_config(None, overrides)) for overrides in json.loads((out_dir / "configs.json").read_text())]
    torch.save({"exported_rounds": [r["exported_round"] for r in results]}, out_dir / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
