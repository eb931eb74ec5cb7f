"""SASRec++: the crop and shuffle augmentation of the training rows, the baseline's own longer
histories over the same split, and the `sasrec_pp` model beside `sasrec` in `onerec baseline`."""

import dataclasses
import json

import numpy as np
import pytest

from onerec.baselines.sasrec import augmented_sequences, training_sequences
from onerec.config import ConfigError, DataConfig, SASRecConfig, SASRecPPConfig, load_config
from onerec.data.splits import UserSequences, make_splits


def _csr(lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """offsets, items of users with these sequence lengths; item = its global position, so a
    row's items tell exactly where they came from."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return offsets, np.arange(offsets[-1], dtype=np.int64)


LENGTHS = [0, 1, 2, 3, 5, 9, 17, 40] * 25  # empty, single-item and long training parts


def _real(row: np.ndarray) -> np.ndarray:
    return row[row >= 0]


def _check_layout(rows: np.ndarray, train_len: np.ndarray, max_len: int) -> None:
    """The harness's layout: right-aligned, -1 only on the left, >= 2 real items, one row per
    user with >= 2 training items, in user order."""
    assert rows.dtype == np.int64 and rows.shape == (int((train_len >= 2).sum()), max_len + 1)
    real = rows >= 0
    assert (real.sum(1) >= 2).all()
    assert (np.diff(real.astype(int), axis=1) >= 0).all()  # once real, real to the end
    assert (rows[~real] == -1).all()


def test_with_both_operators_off_the_rows_are_todays_training_rows():
    offsets, items = _csr(LENGTHS)
    train_len = np.array(LENGTHS)
    for max_len in (1, 4, 50):
        expected = training_sequences(offsets, items, train_len, max_len)
        got = augmented_sequences(offsets, items, train_len, max_len, np.random.default_rng(0))
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("max_len", [50, 6])
def test_crop_keeps_a_contiguous_window_of_the_whole_training_part_in_order(max_len):
    offsets, items = _csr(LENGTHS)
    train_len = np.array(LENGTHS)
    ratio = 0.6
    rows = augmented_sequences(offsets, items, train_len, max_len, np.random.default_rng(1), crop_prob=1.0, crop_ratio=ratio)
    _check_layout(rows, train_len, max_len)
    users = np.flatnonzero(train_len >= 2)
    shifts = []
    for row, user in zip(rows, users):
        n, start = train_len[user], offsets[user]
        length = min(max(int(np.floor(ratio * n)), 2), n)
        real = _real(row)
        # The row is the tail of a window of `length` consecutive items of the training part.
        assert len(real) == min(length, max_len + 1)
        assert (np.diff(real) == 1).all()
        window_end = real[-1] + 1
        assert start + length <= window_end <= start + n
        shifts.append(window_end - (start + length))
    # Windows start anywhere in the training part, not only at its end (40-item users: 17 starts).
    assert len(set(shifts)) > 10


def test_crop_probability_crops_a_share_of_the_rows():
    offsets, items = _csr([10] * 2000)
    train_len = np.full(2000, 10)
    full = training_sequences(offsets, items, train_len, 20)
    rows = augmented_sequences(offsets, items, train_len, 20, np.random.default_rng(2), crop_prob=0.3, crop_ratio=0.5)
    cropped = ((rows >= 0).sum(1) == 5).mean()
    assert 0.25 < cropped < 0.35
    np.testing.assert_array_equal(rows[(rows >= 0).sum(1) == 10], full[(rows >= 0).sum(1) == 10])


def test_shuffle_permutes_only_one_window_of_the_row():
    offsets, items = _csr(LENGTHS)
    train_len = np.array(LENGTHS)
    max_len, ratio = 20, 0.3
    plain = training_sequences(offsets, items, train_len, max_len)
    rows = augmented_sequences(offsets, items, train_len, max_len, np.random.default_rng(3), shuffle_prob=1.0,
                               shuffle_ratio=ratio)
    _check_layout(rows, train_len, max_len)
    np.testing.assert_array_equal(rows >= 0, plain >= 0)  # padding stays where it was
    changed_rows = 0
    for row, before in zip(rows, plain):
        m = int((before >= 0).sum())
        window = int(np.floor(ratio * m))
        moved = np.flatnonzero(row != before)
        assert sorted(row.tolist()) == sorted(before.tolist())  # the same items
        if len(moved):
            changed_rows += 1
            assert window >= 2 and moved[-1] - moved[0] < window  # within one window of w columns
            span = slice(moved[0], moved[-1] + 1)
            assert sorted(row[span].tolist()) == sorted(before[span].tolist())
    assert changed_rows > len(rows) // 4


def test_crop_then_shuffle_together_keep_the_layout_and_draw_afresh_each_call():
    offsets, items = _csr(LENGTHS)
    train_len = np.array(LENGTHS)
    rng = np.random.default_rng(4)
    kwargs = dict(crop_prob=0.5, crop_ratio=0.6, shuffle_prob=0.5, shuffle_ratio=0.3)
    first = augmented_sequences(offsets, items, train_len, 10, rng, **kwargs)
    second = augmented_sequences(offsets, items, train_len, 10, rng, **kwargs)
    for rows in (first, second):
        _check_layout(rows, train_len, 10)
    assert not np.array_equal(first, second)  # a new draw every epoch


def test_the_same_seed_gives_the_same_rows():
    offsets, items = _csr(LENGTHS)
    train_len = np.array(LENGTHS)
    kwargs = dict(crop_prob=0.5, crop_ratio=0.6, shuffle_prob=0.5, shuffle_ratio=0.3)

    def epochs(seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [augmented_sequences(offsets, items, train_len, 10, rng, **kwargs) for _ in range(3)]

    for a, b in zip(epochs(7), epochs(7)):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(epochs(7), epochs(8)))


@pytest.mark.parametrize("split", ["leave_one_out", "time"])
def test_a_longer_history_split_has_the_same_users_and_targets(split):
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, size=60)
    user = np.repeat(np.arange(60), lengths)
    item = rng.integers(0, 30, size=len(user))
    order = np.concatenate([np.sort(rng.choice(1000, size=n, replace=False)) for n in lengths])
    seqs = UserSequences.from_sorted(user, item, order, 60)
    short_cfg = DataConfig(split=split, max_history=4)
    short, long = make_splits(seqs, short_cfg), make_splits(seqs, dataclasses.replace(short_cfg, max_history=50))
    for name in ("valid", "test"):
        assert len(short[name]) == len(long[name]) > 0
        np.testing.assert_array_equal(np.asarray(short[name].user), np.asarray(long[name].user))
        np.testing.assert_array_equal(np.asarray(short[name].target), np.asarray(long[name].target))
        short_h, long_h = np.asarray(short[name].history), np.asarray(long[name].history)
        np.testing.assert_array_equal(long_h[:, -4:], short_h)  # the same newest items, more of them
        assert (long_h >= 0).sum() > (short_h >= 0).sum()


def test_sasrec_pp_section_has_the_sasrec_pp_defaults_and_its_own_key_in_messages():
    cfg = load_config(None, [])
    pp = cfg.sasrec_pp
    assert isinstance(pp, SASRecPPConfig) and not pp.enabled and cfg.enabled_baselines == ("sasrec",)
    assert (pp.d_model, pp.layers, pp.dropout, pp.max_len) == (32, 2, 0.4, 50)
    assert pp.crop_prob > 0 and pp.shuffle_prob > 0 and pp.max_epochs > cfg.sasrec.max_epochs
    # `sasrec` itself: unchanged, no augmentation, the harness's history length.
    assert not cfg.sasrec.augments and cfg.sasrec.max_len == 0 and cfg.sasrec.enabled
    assert load_config(None, ["sasrec_pp.enabled=true"]).enabled_baselines == ("sasrec", "sasrec_pp")
    with pytest.raises(ConfigError, match=r"^sasrec_pp\.crop_prob=1\.5: expected"):
        load_config(None, ["sasrec_pp.crop_prob=1.5"])
    with pytest.raises(ConfigError, match=r"^sasrec\.shuffle_ratio=0\.0: expected"):
        SASRecConfig(shuffle_ratio=0.0)
    with pytest.raises(ConfigError, match=r"sasrec_pp\.d_model=33 is not divisible by sasrec_pp\.num_heads=2"):
        load_config(None, ["sasrec_pp.d_model=33"])


def _tiny_log(tmp_path) -> None:
    """The raw log under tmp_path/raw: beside the run directory, not around it."""
    rng = np.random.default_rng(0)
    lines = ["user_id,item_id,timestamp"]
    for user in range(40):
        start = int(rng.integers(0, 20))
        for t in range(6 + user % 5):
            lines.append(f"u{user},i{(start + t) % 20},{t}")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "log.csv").write_text("\n".join(lines) + "\n")


def _overrides(tmp_path) -> list[str]:
    return [
        f"run.out_dir={tmp_path / 'run'}",
        "run.device=cpu",
        "data.format=csv",
        f"data.root={tmp_path / 'raw'}",
        "data.interactions_file=log.csv",
        "data.time_column=timestamp",
        "data.max_history=4",
        "sasrec.d_model=16",
        "sasrec.layers=1",
        "sasrec.max_epochs=2",
        "sasrec_pp.enabled=true",
        "sasrec_pp.d_model=16",
        "sasrec_pp.max_len=12",
        "sasrec_pp.max_epochs=3",
        "sasrec_pp.patience=0",
        "sasrec_pp.lr=1e-2",
    ]


def test_onerec_baseline_trains_sasrec_and_sasrec_pp_each_into_its_folder(tmp_path):
    from onerec.cli import main as cli_main
    from onerec.stages import BY_NAME, freshness

    _tiny_log(tmp_path)
    overrides = _overrides(tmp_path)
    assert cli_main(["data", *overrides]) == 0
    assert cli_main(["baseline", *overrides]) == 0
    run = tmp_path / "run"
    sasrec = json.loads((run / "baselines/sasrec/metrics.json").read_text())
    pp = json.loads((run / "baselines/sasrec_pp/metrics.json").read_text())
    assert (run / "baselines/sasrec_pp/model.safetensors").is_file()
    assert pp["model"] == "sasrec_pp" and pp["history_len"] == 12 and sasrec["history_len"] == 4
    assert pp["epochs_run"] == 3 and 1 <= pp["best_epoch"] <= 3 and pp["augment_seconds"] > 0
    assert sasrec["augment_seconds"] == 0
    assert set(pp["test"]) == set(pp["valid"]) == {"recall@5", "ndcg@5", "recall@10", "ndcg@10"}
    assert pp["config"]["crop_prob"] == 0.5 and pp["config"]["max_len"] == 12
    assert pp["seed"] == sasrec["seed"] == 0  # run.seed, which bench/quality.py checks when it reads these
    # Provenance: fresh now; a sasrec_pp key makes the stage stale, and names that key.
    stage = BY_NAME["baseline"]
    assert freshness(stage, load_config(None, overrides)) == (True, "up to date")
    fresh, reason = freshness(stage, load_config(None, [*overrides, "sasrec_pp.crop_ratio=0.5"]))
    assert not fresh and "sasrec_pp.crop_ratio" in reason


def test_sasrec_pp_alone_when_sasrec_is_disabled(tmp_path):
    """sasrec.enabled=false trains SASRec++ only (the stage's done marker is its metrics.json)."""
    from onerec.cli import main as cli_main
    from onerec.stages import BY_NAME

    _tiny_log(tmp_path)
    overrides = [*_overrides(tmp_path), "sasrec.enabled=false"]
    assert cli_main(["data", *overrides]) == 0
    assert cli_main(["baseline", *overrides]) == 0
    run = tmp_path / "run"
    assert not (run / "baselines/sasrec").exists() and (run / "baselines/sasrec_pp/metrics.json").is_file()
    assert BY_NAME["baseline"].done_path(load_config(None, overrides)) == run / "baselines/sasrec_pp/metrics.json"


def test_nothing_enabled_and_a_tokenizer_that_needs_a_disabled_sasrec_are_refused(tmp_path):
    from onerec.cli import main as cli_main
    from onerec.stages import pipeline_stages

    _tiny_log(tmp_path)
    overrides = [*_overrides(tmp_path), "sasrec.enabled=false", "sasrec_pp.enabled=false"]
    assert cli_main(["data", *overrides]) == 0
    assert cli_main(["baseline", *overrides]) == 2
    needs = ["tokenizer.collaborative_weight=0.5", "tokenizer.collaborative_source=sasrec", "sasrec.enabled=false"]
    with pytest.raises(ConfigError, match="sasrec.enabled=false"):
        pipeline_stages(load_config(None, needs))
    assert cli_main(["tokenize", *overrides, *needs[:2]]) == 2


def test_the_pipeline_runs_the_baseline_stage_when_sasrec_pp_is_enabled():
    from onerec.stages import pipeline_stages

    names = [s.name for s in pipeline_stages(load_config(None, ["sasrec_pp.enabled=true"]))]
    assert names == ["data", "baseline", "tokenize", "pretrain", "evaluate"]
    assert "baseline" not in [s.name for s in pipeline_stages(load_config(None, []))]


def test_quality_table_has_a_sasrec_pp_row_and_the_published_sources():
    import importlib.util
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "bench"
    spec = importlib.util.spec_from_file_location("quality", bench / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    published = json.loads((bench / "published" / "amazon2014_beauty.json").read_text())
    assert published["rows"]["SASRec++"] == {"recall@5": 0.0666, "ndcg@5": 0.0458, "recall@10": 0.0973, "ndcg@10": 0.0557}
    assert published["sources"]["SASRec++ (reproduction)"] == "independent 5-seed reproduction"
    metrics = {"recall@5": 0.05, "ndcg@5": 0.03, "recall@10": 0.08, "ndcg@10": 0.04}
    result = {
        "name": "tiny", "command": "python bench/quality.py --name tiny", "date": "2026-01-01", "device": "CPU",
        "ours": {"valid": metrics, "test": metrics}, "popularity": {"valid": metrics, "test": metrics},
        "sasrec": {"valid": metrics, "test": metrics}, "sasrec_pp": {"valid": metrics, "test": metrics},
        "published": published["rows"], "published_sources": published["sources"],
        "seconds": {"pipeline": 60.0, "sasrec": 30.0, "sasrec_pp": 90.0},
    }
    table = quality.markdown(result)
    assert "| SASRec (ours, CE) |" in table and "| SASRec++ (ours, CE + crop/shuffle) |" in table
    assert "| SASRec++ | 0.0666 | 0.0458 | 0.0973 | 0.0557 | arXiv 2508.14910, Table 5 |" in table
    assert "| TIGER | 0.0454 | 0.0321 | 0.0648 | 0.0384 | published |" in table
    assert "SASRec 0.5 min, SASRec++ 1.5 min." in table and "; SASRec++ recall@5 0.0500" in table
    del result["sasrec_pp"]
    assert "SASRec++ (ours" not in quality.markdown(result)


def test_quality_figure_draws_the_sasrec_pp_bar(tmp_path):
    pytest.importorskip("matplotlib")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import figures

    metrics = {"recall@5": 0.05, "ndcg@5": 0.03, "recall@10": 0.08, "ndcg@10": 0.04}
    result = {"name": "tiny", "date": "2026-01-01", "device": "CPU", "test_users": 1000,
              "ours": {"test": metrics}, "popularity": {"test": metrics}, "sasrec_pp": {"test": metrics}}
    assert figures.quality_figure(result, tmp_path / "quality_tiny.png").is_file()  # no `sasrec` row needed


def test_records_written_before_these_options_stay_fresh():
    """The baseline's config fingerprint at the new options' defaults (SASRec++ off) equals the
    one of a config that never had them, so runs made before them are not retrained; a
    changed option, or SASRec++ switched on, counts."""
    from dataclasses import fields

    from onerec.config import SASRecConfig, to_dict
    from onerec.provenance import NEUTRAL_DEFAULTS, config_subset

    defaults = {f"sasrec.{f.name}": f.default for f in fields(SASRecConfig) if f"sasrec.{f.name}" in NEUTRAL_DEFAULTS}
    # the table follows the dataclass (its keys of other sections: tests/unit/test_item_head.py)
    assert defaults == {key: value for key, value in NEUTRAL_DEFAULTS.items() if key.startswith("sasrec.")}
    sections = ("data", "sasrec", "sasrec_pp", "hstu", "eval", "run.seed")
    config = to_dict(load_config(None, []))
    old = {key: value for key, value in config_subset(config, ("data", "sasrec", "eval", "run.seed")).items()
           if key not in NEUTRAL_DEFAULTS}  # what a record written before the options held
    assert config_subset(config, sections) == old
    changed = to_dict(load_config(None, ["sasrec.crop_prob=0.2"]))
    assert config_subset(changed, sections)["sasrec.crop_prob"] == 0.2
    switched_on = to_dict(load_config(None, ["sasrec_pp.enabled=true"]))
    assert config_subset(switched_on, sections)["sasrec_pp.d_model"] == 32
