"""The KuaiRand loader on small parquet files written like the real release, and on the real one."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onerec.config import load_config
from onerec.data.errors import DataError
from onerec.data.prepared import load_prepared
from onerec.stages.data import main as data_main
from onerec.stages.tokenize import main as tokenize_main

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def _impressions(rows):
    names = ["user_id", "video_id", "time_ms", "is_click", "is_like", "is_follow", "long_view", "watch_ratio"]
    return pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)})


def write_kuairand(root: Path, bad_click=False):
    root.mkdir()
    pq.write_table(_impressions([
        (1, 10, 1000, 1, 0, 0, 1, 0.9),
        (1, 11, 2000, 0, 0, 0, 0, 0.0),
        (2, 12, 1500, 1, 1, 0, 1, 1.2),
    ]), root / "val.parquet")
    pq.write_table(_impressions([
        (1, 12, 3000, None if bad_click else 1, 0, 1, 0, 0.4),
        (2, 10, 4000, 1, 0, 0, 0, 0.1),
    ]), root / "test.parquet")
    pq.write_table(pa.table({
        "user_id": [1, 2], "history_len": [2, 1], "last_time_ms": [900, 800],
        "watch_seq": [[11, 12], [11]], "like_seq": [[12], []], "long_watch_seq": [[], [11]],
    }), root / "user_sequences.parquet")
    pq.write_table(pa.table({
        "video_id": [10, 11, 12], "author_id": [7, 7, 9], "tag": ["1", "1,2", "3"],
        "video_duration": [1000.0, 2000.0, None], "video_type": ["NORMAL", "NORMAL", "AD"],
        "upload_type": ["Web", "Kmovie", "Web"], "play_cnt": [10.0, 100.0, 5.0], "like_cnt": [1.0, 5.0, 0.0],
    }), root / "item_features.parquet")


def _config(tmp_path, *extra):
    return load_config(None, [f"run.out_dir={tmp_path / 'run'}", "data.format=kuairand", f"data.root={tmp_path / 'raw'}",
                              "tokenizer.encoder=features", "tokenizer.levels=1", "tokenizer.codebook_size=2", *extra])


def test_history_then_impressions_with_signals_and_clicked_sequences(tmp_path):
    write_kuairand(tmp_path / "raw")
    prepared = load_prepared(data_main(_config(tmp_path)))
    meta = prepared.meta
    assert meta["sequence_column"] == "is_click" and "logged" in meta["feedback_columns"]
    assert (meta["users"], meta["items"], meta["interactions"]) == (2, 3, 8)
    table = prepared.interactions.to_dict()
    # user 1 (index 0): history 11, 12 (unlogged), then impressions 10, 11 (not clicked), 12
    assert table["item_index"][:5] == [1, 2, 0, 1, 2]
    assert table["logged"][:5] == [0, 0, 1, 1, 1]
    assert table["is_like"][:2] == [0.0, 1.0]  # from like_seq
    assert np.isnan(table["watch_ratio"][0]) and table["watch_ratio"][2] == pytest.approx(0.9)
    # the generator's sequences skip the unclicked impression of item 11
    assert prepared.sequences.items.tolist() == [1, 2, 0, 2, 1, 2, 0]
    features = np.asarray(prepared.items["features"])
    assert features.shape[0] == 3 and np.isfinite(features).all()


def test_features_feed_the_tokenizer(tmp_path):
    write_kuairand(tmp_path / "raw")
    cfg = _config(tmp_path)
    data_main(cfg)
    from onerec.tokenizer.semantic_ids import SemanticIds

    ids = SemanticIds.load(tokenize_main(cfg))
    assert ids.codes.shape[0] == 3


def test_null_signal_names_file_row_and_column(tmp_path):
    write_kuairand(tmp_path / "raw", bad_click=True)
    with pytest.raises(DataError, match=r"test\.parquet:1: field 'is_click'"):
        data_main(_config(tmp_path))


@pytest.mark.skipif(not (SHARED / "kuairand_pure_partial").is_dir(), reason="shared data not present (../shared/data)")
def test_real_kuairand_counts(tmp_path):
    cfg = load_config(None, [f"run.out_dir={tmp_path / 'run'}", "data.format=kuairand", "data.on_bad_rows=skip",
                             f"data.root={SHARED / 'kuairand_pure_partial'}"])
    meta = load_prepared(data_main(cfg)).meta
    assert (meta["users"], meta["items"]) == (26412, 7583)
    assert meta["bad_rows"] == {"user with too few interactions": 665}
