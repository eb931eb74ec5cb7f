"""bench/ensemble.py's fusion of several runs' ranked beams, on hand-made lists whose fused
order is worked out below."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import ensemble  # noqa: E402  (bench/ is not a package)

# Two users, two runs, three beams each; -1 / -inf is a dead beam.
ITEMS = [np.array([[7, 3, 5], [1, 2, -1]]), np.array([[3, 9, 7], [2, 4, 6]])]
SCORES = [
    np.log(np.array([[0.5, 0.3, 0.2], [0.6, 0.4, 1.0]])),
    np.log(np.array([[0.4, 0.35, 0.25], [0.7, 0.2, 0.1]])),
]
SCORES[0][1, 2] = -np.inf


def test_probability_fusion_sums_each_runs_beam_softmax():
    # user 0: 3 -> 0.3 + 0.4 = 0.7, 7 -> 0.5 + 0.25 = 0.75, 9 -> 0.35, 5 -> 0.2
    # user 1: 2 -> 0.4 + 0.7 = 1.1, 1 -> 0.6, 4 -> 0.2, 6 -> 0.1 (the dead beam counts nothing)
    top = ensemble.fuse(ITEMS, SCORES, "probability", k=4)
    assert top.tolist() == [[7, 3, 9, 5], [2, 1, 4, 6]]


def test_rank_fusion_adds_reciprocal_ranks_and_pads_short_lists():
    # user 0: 3 has ranks 2 and 1, 7 has ranks 1 and 3: 1/62 + 1/61 > 1/61 + 1/63
    top = ensemble.fuse(ITEMS, SCORES, "rank", k=6)
    assert top[0].tolist() == [3, 7, 9, 5, -1, -1]
    assert top[1, :2].tolist() == [2, 1] and -1 not in top[1, :4].tolist()


def test_one_run_alone_keeps_its_own_order():
    top = ensemble.fuse(ITEMS[:1], SCORES[:1], "probability", k=3)
    assert top.tolist() == [[7, 3, 5], [1, 2, -1]]


def test_an_unknown_fusion_is_refused():
    with pytest.raises(ValueError, match="fusion"):
        ensemble.fuse(ITEMS, SCORES, "vote", k=2)


def test_metrics_count_a_hit_at_its_fused_rank():
    top = ensemble.fuse(ITEMS, SCORES, "probability", k=4)
    metrics = ensemble.metrics_of(top, np.array([3, 6]), ks=[1, 4])
    assert metrics["recall@1"] == 0.0 and metrics["recall@4"] == 1.0
    assert metrics["ndcg@4"] == pytest.approx((1 / np.log2(3) + 1 / np.log2(5)) / 2)


def test_a_user_without_a_live_beam_gets_no_items():
    dead = [np.array([[-1, -1]]), np.array([[-1, -1]])]
    top = ensemble.fuse(dead, [np.full((1, 2), -np.inf)] * 2, "probability", k=2)
    assert top.tolist() == [[-1, -1]]


def test_a_runs_sasrec_decoded_here_scores_what_the_baseline_stage_measured(tmp_path):
    """decode_baseline rebuilds a run's SASRec from its config and weights: its top items give
    the validation metrics the baseline stage wrote, to the last digit."""
    import json

    from onerec.cli import main as cli_main

    rng = np.random.default_rng(0)
    lines = ["user_id,item_id"] + [f"u{u},i{(int(rng.integers(0, 30)) + t) % 30}" for u in range(40) for t in range(7)]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "log.csv").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    overrides = [f"run.out_dir={run}", "run.device=cpu", "data.format=csv", f"data.root={tmp_path / 'raw'}",
                 "data.interactions_file=log.csv", "data.max_history=5", "sasrec.d_model=16", "sasrec.layers=1",
                 "sasrec.max_epochs=2", "eval.beam_width=12", "eval.exclude_history=true"]
    assert cli_main(["plan", *overrides]) == 0  # writes <run>/config.yaml, which decode_baseline reads
    assert cli_main(["data", *overrides]) == 0 and cli_main(["baseline", *overrides]) == 0
    measured = json.loads((run / "baselines/sasrec/metrics.json").read_text())["valid"]

    items, scores, target = ensemble.decode_baseline(str(run), "valid", "sasrec", "cpu")
    assert items.shape == (len(target), 12) and np.all(np.diff(scores, axis=1) <= 0)
    assert ensemble.metrics_of(items, target, [5, 10]) == pytest.approx(measured, abs=1e-12)
    # The same run twice fuses to its own order.
    twice = ensemble.fuse([items, items], [scores, scores], "probability", k=10)
    assert np.array_equal(twice, items[:, :10])
