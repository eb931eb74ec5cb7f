"""A NaN loss on one rank only: every rank must skip that step together (a rank that skipped
alone would leave the other waiting in the gradient all-reduce), and stay in sync."""

from __future__ import annotations

import json
import math
from pathlib import Path

from distributed_helpers import BIN, process_env, run_logged

WORKER = Path(__file__).with_name("nonfinite_worker.py")


def test_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    log = tmp_path / "torchrun.log"
    run_logged(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(WORKER), str(tmp_path), "1", "3"],
        log, 600, process_env(),
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["steps"] == 6 and rank["nonfinite_total"] == 1
    assert ranks[0]["weights"] == ranks[1]["weights"]  # no rank updated alone: replicas identical
    assert all(math.isfinite(v) for tensor in ranks[0]["weights"] for v in tensor)
    text = log.read_text()
    assert text.count("step 3: non-finite loss") == 2  # logged by both ranks
    assert "step 3: non-finite loss (nan)" in text  # rank 1 saw the NaN itself
