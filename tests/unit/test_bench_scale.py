"""bench/scale.py: the synthetic log generator writes what the data stage reads, with the counts
it predicts, Zipf-skewed item popularity, and the same table whether written as one file or as
shards; the benchmark's own pieces (codebook rule, process measurement, report) work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import scale  # noqa: E402  (bench/ is not a package)

from onerec.cli import main as onerec_main  # noqa: E402

# ~2,000 rows; small blocks so that several shards are possible; a long-tailed length spread
# so that some users fall below min_user_interactions and are dropped.
SPEC = dict(rows=2_000, users=120, items=300, length_sigma=1.5, block_users=16, feedback=True, seed=3)


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    return scale.generate_log(tmp_path_factory.mktemp("log"), scale.LogSpec(**SPEC), formats=("parquet", "csv"))


def _meta(run: Path) -> dict:
    return json.loads((run / "data" / "meta.json").read_text())


def test_generator_counts_are_exact(log):
    assert log.user_lengths.sum() == SPEC["rows"] and len(log.user_lengths) == SPEC["users"]
    assert log.user_lengths.min() >= 1
    assert log.item_counts.sum() == SPEC["rows"]
    table = pq.read_table(log.root / log.interactions_files["parquet"])
    assert table.num_rows == SPEC["rows"]
    assert table.column_names == ["user_id", "item_id", "timestamp", "like", "watch_ratio"]
    users = table["user_id"].to_numpy()
    assert np.array_equal(np.bincount(users - 1, minlength=SPEC["users"]), log.user_lengths)
    assert np.array_equal(np.bincount(table["item_id"].to_numpy() - 1, minlength=SPEC["items"]), log.item_counts)
    assert pq.read_table(log.root / log.items_files["parquet"]).num_rows == SPEC["items"]


def test_timestamps_increase_per_user_in_file_order(log):
    table = pq.read_table(log.root / log.interactions_files["parquet"])
    users, times = table["user_id"].to_numpy(), table["timestamp"].to_numpy()
    by_user = np.argsort(users, kind="stable")  # file order within each user
    same_user = users[by_user][1:] == users[by_user][:-1]
    assert (np.diff(times[by_user])[same_user] > 0).all()


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
@pytest.mark.parametrize("with_items_file", [True, False], ids=["items-file", "no-items-file"])
def test_data_stage_reads_the_log_with_the_predicted_counts(log, fmt, with_items_file, tmp_path, monkeypatch):
    monkeypatch.setenv("ONEREC_NO_PROGRESS", "1")
    run = tmp_path / "run"
    expected = log.expected_counts(min_user_interactions=3, with_items_file=with_items_file)
    assert expected["short_users"] > 0  # the filtering rule is exercised
    assert onerec_main(["data", f"run.out_dir={run}", *log.data_overrides(fmt, with_items_file)]) == 0
    meta = _meta(run)
    assert {k: meta[k] for k in ("users", "items", "interactions")} == {
        k: expected[k] for k in ("users", "items", "interactions")
    }
    assert meta["bad_rows"] == {"user with too few interactions": expected["short_users"]}
    assert meta["feedback_columns"] == ["like", "watch_ratio"]


def test_stricter_minimum_drops_more_users_as_predicted(log, tmp_path, monkeypatch):
    monkeypatch.setenv("ONEREC_NO_PROGRESS", "1")
    run = tmp_path / "run"
    expected = log.expected_counts(min_user_interactions=10, with_items_file=False)
    overrides = [*log.data_overrides("parquet", with_items_file=False), "data.min_user_interactions=10"]
    assert onerec_main(["data", f"run.out_dir={run}", *overrides]) == 0
    meta = _meta(run)
    assert (meta["users"], meta["items"], meta["interactions"]) == (
        expected["users"], expected["items"], expected["interactions"]
    )
    assert expected["items"] < SPEC["items"]  # some items lost all their users


def test_zipf_popularity_is_skewed(tmp_path):
    spec = scale.LogSpec(rows=200_000, users=2_000, items=5_000, zipf_exponent=1.0, text=False)
    counts = np.sort(scale.generate_log(tmp_path / "s1", spec).item_counts)[::-1]
    assert counts[0] > 50 * max(np.median(counts), 1)
    # rank-frequency slope over the head: about -s
    ranks = np.arange(1, 101)
    slope = np.polyfit(np.log(ranks), np.log(counts[:100]), 1)[0]
    assert -1.2 < slope < -0.8
    flatter = scale.LogSpec(rows=200_000, users=2_000, items=5_000, zipf_exponent=0.5, text=False)
    flat_counts = np.sort(scale.generate_log(tmp_path / "s05", flatter).item_counts)[::-1]
    assert flat_counts[0] / np.median(flat_counts) < counts[0] / max(np.median(counts), 1)


def test_shards_and_write_sizes_give_the_same_table(log, tmp_path):
    whole = pq.read_table(log.root / log.interactions_files["parquet"])
    sharded = scale.generate_log(tmp_path / "sharded", scale.LogSpec(**SPEC), formats=("parquet", "csv"),
                                 shards=3, rows_per_write=100)
    shard_dir = sharded.root / sharded.interactions_files["parquet"]
    assert shard_dir.is_dir() and len(list(shard_dir.glob("part-*.parquet"))) == 3
    assert pq.read_table(shard_dir).equals(whole)  # files in name order: the same rows in the same order
    csv_parts = sorted((sharded.root / sharded.interactions_files["csv"]).glob("part-*.csv"))
    from_csv = pa.concat_tables(pacsv.read_csv(p, convert_options=pacsv.ConvertOptions(
        column_types=whole.schema)) for p in csv_parts)
    assert from_csv.equals(whole)
    assert pq.read_table(sharded.root / sharded.items_files["parquet"]).equals(
        pq.read_table(log.root / log.items_files["parquet"]))
    assert np.array_equal(sharded.item_longest_user, log.item_longest_user)
    with pytest.raises(ValueError, match="shards"):
        scale.generate_log(tmp_path / "too_many", scale.LogSpec(**SPEC), shards=100)


def test_codebook_rule():
    assert scale.codebook_size_for(1_000) == 32
    assert scale.codebook_size_for(10_000) == 128
    assert scale.codebook_size_for(100_000) == 256
    assert scale.codebook_size_for(10**9) == 8192
    for items in (20, 100, 200, 5_000, 77_777):
        size = scale.codebook_size_for(items)
        assert size & (size - 1) == 0 and size * 8 <= items


def test_run_measured_reports_the_child_peak_rss(tmp_path):
    allocate = "import numpy as np; a = np.ones(300 * 2**20 // 8); print(a.sum())"
    result = scale.run_measured([sys.executable, "-c", allocate], tmp_path / "out.log", timeout_s=120)
    assert result["status"] == "ok" and result["peak_rss_bytes"] >= 300 * 2**20
    failed = scale.run_measured([sys.executable, "-c", "raise SystemExit('boom')"], tmp_path / "f.log", 120)
    assert failed["status"] == "failed" and "boom" in failed["reason"]
    slow = scale.run_measured([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "s.log", 0.5)
    assert slow["status"] == "timed out" and slow["wall_s"] < 20


def test_markdown_shows_every_size_and_what_did_not_finish():
    report = {
        "device": "CPU: test", "cpus": 2, "date": "2026-01-01", "command": "python bench/scale.py --sizes 1e5,1e6",
        "code": {"commit": "abc1234", "modified": []},
        "settings": {"rows_per_user": 100, "rows_per_item": 100, "zipf": 1.0, "input_format": "parquet", "shards": 1,
                     "min_user_interactions": 3, "kmeans_iters": 25, "onerec_kmeans_iters": 5,
                     "pretrain_overrides": scale.PRETRAIN_OVERRIDES},
        "sizes": [
            {"rows": n, "users": n // 100, "items": n // 100, "source_digest": "d1", "stages": {
                "data": {"status": "ok", "wall_s": n / 1e5, "stage_s": n / 2e5, "user_s": n / 4e5, "sys_s": 0.5,
                         "rows_per_s": 2e5, "peak_rss_bytes": 1000 * n},
                "tokenize": {"status": "ok", "wall_s": 5.0, "stage_s": 3.0, "peak_rss_bytes": 5e8, "codebook_size": 32,
                             "kmeans_iters": 25, "embed_s": 0.5,
                             "levels": [{"level": i, "seconds": 1.0, "peak_rss_bytes": 4e8} for i in range(3)]},
                "pretrain": {"status": "timed out", "reason": "killed after 1800 s (--stage-timeout)"},
            }}
            for n in (10**5, 10**6)
        ],
    }
    text = scale.markdown(report)
    assert "`python bench/scale.py --sizes 1e5,1e6`" in text
    assert "| 1,000,000 | 10,000 | 10,000 |" in text
    assert "| data | 1,000,000 | 10.0 | 5.0 | 3.0 | 10.0 | 0.93 GiB | 1,000 | 1.00 | 1.00 |" in text
    assert "1,000,000 rows, pretrain: timed out: killed after 1800 s" in text


def test_stage_wrapper_reports_tokenize_per_level(log, tmp_path, monkeypatch):
    """The data stage in-process, then tokenize through the bench's own process wrapper: per-level
    times and peaks come back, and the peak RSS is at least every phase's."""
    monkeypatch.setenv("ONEREC_NO_PROGRESS", "1")
    run = tmp_path / "run"
    common = [f"run.out_dir={run}", *log.data_overrides("parquet")]
    assert onerec_main(["data", *common]) == 0
    tokenize = ["tokenize", *common, "tokenizer.encoder=hashing", "tokenizer.levels=3", "tokenizer.codebook_size=16",
                "tokenizer.kmeans_iters=2"]
    result = scale._stage("tokenize", tokenize, tmp_path, timeout_s=300)
    assert result["status"] == "ok", result.get("reason")
    assert [level["level"] for level in result["levels"]] == [0, 1, 2]
    assert result["embed_s"] >= 0 and result["stage_s"] <= result["wall_s"]
    assert result["cuda_max_memory_allocated_bytes"] is None or result["cuda_max_memory_allocated_bytes"] > 0
    phases = [result["load_and_embed_peak_rss_bytes"], *(level["peak_rss_bytes"] for level in result["levels"])]
    assert result["peak_rss_bytes"] >= max(phases) > 0
    assert (run / "semantic_ids").is_dir()
