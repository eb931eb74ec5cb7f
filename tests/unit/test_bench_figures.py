"""bench/figures.py: every figure function draws a PNG from a dict shaped like its bench's json,
and the command line redraws a committed result file."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import figures  # noqa: E402  (bench/ is not a package)

RUN = {"name": "tiny", "command": "python bench/x.py --name tiny", "date": "2026-01-01", "device": "CPU: test, 2 cores"}
METRICS = {"recall@5": 0.05, "ndcg@5": 0.03, "recall@10": 0.08, "ndcg@10": 0.04}


def _rewarded(scale: float) -> dict:
    return {"users": 100, "reward_mean": 0.5 * scale, "reward_max": 0.7 * scale,
            "per_signal": {"like": {"mean": 0.5 * scale, "max": 0.7 * scale}}, **METRICS}


# The structure of each committed bench/results/<kind>_*.json, cut down to what the figure reads.
SAMPLES = {
    "quality": {
        **RUN,
        "ours": {"valid": METRICS, "test": {"recall@5": 0.052, "ndcg@5": 0.036, "recall@10": 0.075, "ndcg@10": 0.043}},
        "sasrec": {"valid": METRICS, "test": {"recall@5": 0.06, "ndcg@5": 0.043, "recall@10": 0.081, "ndcg@10": 0.05}},
        "popularity": {"valid": METRICS, "test": {"recall@5": 0.007, "ndcg@5": 0.004, "recall@10": 0.011, "ndcg@10": 0.005}},
        "published": {"TIGER": {"recall@5": 0.0454, "ndcg@5": 0.0321, "recall@10": 0.0648, "ndcg@10": 0.0384}},
        "target": {"recall@5": 0.05, "ndcg@5": 0.035, "recall@10": 0.071, "ndcg@10": 0.042},
        "target_label": "TIGER x 1.1",
        "test_users": 1000,
    },
    "kernels": {
        "device": "Intel(R) Xeon(R) Processor", "device_slug": "cpu", "date": "2026-01-01T00:00:00+00:00",
        "command": "python bench/kernels.py", "torch": "2.x", "threads": 1, "clock": "process CPU time",
        "decode": [
            {"items": n, "B": 64, "W": 50, "steps": 4, "ours_ms_per_step": 2.0 * i + 2, "hf_style_ms_per_step": 70.0 + i,
             "speedup": 30.0}
            for i, n in enumerate((10_000, 1_000_000))
        ],
        "moe": [
            {"name": "ours", "layer_ms": 378.0, "tflops": 0.068, "note": ""},
            {"name": "deepspeed", "layer_ms": 319.2, "tflops": 0.081, "note": ""},
            {"name": "megatron", "error": "megatron-core not importable"},
        ],
        "moe_config": {"T": 1024, "D": 512, "F": 2048, "E": 24, "K": 2, "dtype": "fp32", "dense_matmul": {}},
    },
    "train_throughput": {
        "device": "Intel(R) Xeon(R) Processor", "ranks": 1, "backend": "nccl", "precision": "bf16 autocast",
        "date": "2026-01-01", "command": "python bench/train_throughput.py", "matmul_flops_per_s": 2.9e11,
        "rows": [{"preset": p, "ep": 1, "tokens_per_s": 1e4, "mfu": 0.1} for p in ("small", "base")],
        "skipped": ["small ep=2: needs a multiple of 2 ranks"],
    },
    "alignment": {
        **RUN,
        "session_len": 1,
        "alignment": {
            "eval_split": "valid", "eval_users": 100, "config": {"num_samples": 16},
            "pretrain": _rewarded(1.0), "rounds": [{**_rewarded(1.1), "accepted": True}, {**_rewarded(1.2), "accepted": False}],
        },
        "exported_round": 1,
    },
    "reward": {
        **RUN,
        "reward": {
            "best_epoch": 3, "sessions": {"train": 10, "heldout": 5, "session_len": 1},
            "heldout": {
                "model": {"like": {"auc": 0.7, "rmse": 0.4}, "rating": {"rmse": 1.0}},
                "baseline_item_mean": {"like": {"auc": 0.6, "rmse": 0.45}, "rating": {"rmse": 1.1}},
                "baseline_popularity": {"like": {"auc": 0.55}},
            },
        },
    },
    "prefix_recall": {
        **RUN, "users": 500, "beam_width": 20, "levels": 4,
        "recall": {"recall@5": [0.3, 0.12, 0.07, 0.05], "recall@10": [0.4, 0.2, 0.1, 0.08]},
    },
    "kmeans_scale": {
        "results": [
            {**RUN, "n": n, "levels": 3, "k": 8192, "mode": "default", "iters": 5, "total_s": t, "peak_rss_mb": m,
             "processor": "CPU"}
            for n, t, m in ((100_000, 234.0, 750.0), (1_000_000, 2022.0, 1874.0))
        ],
    },
    "pretrain_data_memory": {
        **RUN, "max_history": 20, "session_len": 1,
        "rows": [
            {"interactions": n, "before": {"host_bytes_per_interaction": b, "device_bytes_gpu_per_interaction": d},
             "after": {"host_bytes_per_interaction": a}}
            for n, b, d, a in ((10**6, 180.8, 123.3, 9.2), (10**7, 198.1, 170.7, 8.1))
        ],
    },
    "scale": {
        **RUN, "settings": {"rows_per_user": 100, "rows_per_item": 100, "zipf": 1.0},
        "sizes": [
            {"rows": n, "stages": {
                "data": {"status": "ok", "wall_s": 2.0 * n / 1e5, "peak_rss_bytes": 4e8 + 400 * n},
                "tokenize": {"status": "ok", "wall_s": 8.0 + n / 1e5, "peak_rss_bytes": 5e8 + 10 * n},
                "pretrain": {"status": "ok", "wall_s": 30.0 + n / 1e6, "peak_rss_bytes": 7e8 + 20 * n},
                **({"tokenize_onerec": {"status": "timed out", "reason": "killed after 1800 s"}} if n >= 10**7 else {}),
            }}
            for n in (10**5, 10**6, 10**7)
        ],
    },
    "inference": {
        **RUN, "threads": 2,
        "catalogues": {"tiny": {"items": 150, "cells": [
            {"system": system, "batch": batch, "beam": 20, "requests_per_s": rate * batch}
            for system, rate in (("ours", 60.0), ("ours_nocache", 40.0), ("t5", 30.0)) for batch in (1, 64)
        ]}},
        "test_split": {"users": 500, "beam": 20, "ours": {"seconds": 1.5}, "ours_nocache": {"seconds": 6.0}},
    },
    "ipa_sampling": {
        **RUN, "users": 48, "num_samples": 128, "model": "a small test model", "note": "a sample",
        "rows": [{"ranks": 1, "ep": 1, "sessions_per_s": 818.0}, {"ranks": 2, "ep": 1, "sessions_per_s": 1533.0},
                 {"ranks": 2, "ep": 2, "sessions_per_s": 1027.0}],
    },
}


def test_every_figure_has_a_sample():
    assert set(SAMPLES) == set(figures.FIGURES)


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_figure_writes_a_png(kind, tmp_path):
    json_path = tmp_path / f"{kind}_tiny.json"
    png = figures.save_figure(SAMPLES[kind], json_path)
    assert png == tmp_path / f"{kind}_tiny.png"
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_quality_without_user_count_recovers_it(tmp_path):
    """Older quality jsons hold no test_users: n comes back from Recall = hits / n."""
    n = 22363
    sample = {key: value for key, value in SAMPLES["quality"].items() if key != "test_users"}
    for row, (h5, h10) in zip(("ours", "sasrec", "popularity"), ((1170, 1673), (1352, 1823), (161, 256))):
        sample[row] = {"test": {"recall@5": h5 / n, "ndcg@5": h5 / n / 2, "recall@10": h10 / n, "ndcg@10": h10 / n / 2}}
    shares = [sample[row]["test"][m] for row in ("ours", "sasrec", "popularity") for m in ("recall@5", "recall@10")]
    assert figures.users_from_hit_shares(shares) == n
    assert figures.quality_figure(sample, tmp_path / "q.png").stat().st_size > 1000


def test_ndcg_standard_error_bound_holds():
    """The bound is at least the standard error of per-user NDCG values drawn at random."""
    rng = np.random.default_rng(0)
    k, n = 10, 2000
    for _ in range(20):
        hit_rate = rng.uniform(0.01, 0.5)
        ranks = np.where(rng.random(n) < hit_rate, rng.integers(0, k, n), -1)
        values = np.where(ranks >= 0, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)
        true_se = values.std() / math.sqrt(n)
        bound = figures.ndcg_standard_error_bound(values.mean(), (ranks >= 0).mean(), k, n)
        assert bound >= true_se - 1e-12


def test_cli_redraws_a_committed_json(tmp_path):
    committed = sorted((BENCH / "results").glob("kernels_*.json")) or sorted((BENCH / "results").glob("*.json"))
    if not committed:
        pytest.skip("no committed result json in bench/results")
    out = tmp_path / "redrawn.png"
    assert figures.main([str(committed[0]), "--out", str(out)]) == [out]
    assert out.read_bytes().startswith(b"\x89PNG")


def test_unknown_result_file_is_an_error():
    with pytest.raises(ValueError, match="no figure"):
        figures.figure_kind("ablations_beauty")
