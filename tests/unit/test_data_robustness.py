"""Raw data that is bad: a DataError naming file, line and field (or, with on_bad_rows: skip, a
counted skip), never a traceback and never a silently wrong table. One section per case:
times, long CSV fields, Amazon users on several lines, null ids, bytes that are not UTF-8, a
byte-order mark, non-finite feedback, exact duplicate rows, control characters in item text."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onerec import errors
from onerec.cli import main as cli_main
from onerec.config import DataConfig
from onerec.data.build import build_tables
from onerec.data.errors import BadRows, DataError
from onerec.data.sources import load_raw

# a generic log (user, item, time, click): row i is line i + 2 of the CSV (after the header), row
# i + 1 of the Parquet file; user b keeps three interactions when one of its rows is dropped
ROWS = [("a", "x", 1, 1.0), ("a", "y", 2, 0.0), ("a", "z", 3, 1.0),
        ("b", "x", 4, 1.0), ("b", "y", 5, 0.5), ("b", "z", 6, 1.0), ("b", "x", 7, 0.0)]


def build(cfg: DataConfig, policy: str = "error"):
    cfg.on_bad_rows = policy
    bad = BadRows(policy)
    return build_tables(load_raw(cfg, bad), cfg, bad)


def generic(root: Path, fmt: str, columns: dict, items: dict | None = None, **extra) -> DataConfig:
    """Write `columns` (name -> list of values) as log.csv / log.parquet (and items likewise)."""
    root.mkdir(parents=True, exist_ok=True)

    def write(name: str, table: dict) -> str:
        if fmt == "parquet":
            pq.write_table(table if isinstance(table, pa.Table) else pa.table(table), root / f"{name}.parquet")
        else:
            names = list(table)
            lines = [",".join(names)] + [",".join(str(v) for v in row) for row in zip(*table.values())]
            (root / f"{name}.csv").write_text("\n".join(lines) + "\n")
        return f"{name}.{fmt}"

    cfg = dict(format=fmt, root=str(root), interactions_file=write("log", columns), user_column="u",
               item_column="i", time_column="t", feedback_columns=["click"])
    if items is not None:
        cfg.update(items_file=write("items", items), item_id_column="id", text_fields=list(items)[1:])
    cfg.update(extra)
    return DataConfig(**cfg)


def log_columns(rows=ROWS) -> dict:
    return {"u": [r[0] for r in rows], "i": [r[1] for r in rows], "t": [r[2] for r in rows], "click": [r[3] for r in rows]}


def assert_located(err: DataError, file: str, line, field: str) -> None:
    assert isinstance(err, errors.DataError) and isinstance(err, errors.UserError)
    assert (err.file, err.line, err.field) == (file, line, field)
    assert str(err).startswith(f"{file}:{line}: field '{field}'")


# --- 1. times: finite, within int64; numbers kept as they are, ISO 8601 dates become seconds ----

# (CSV text, the same value as a Parquet column) for times no int64 order column can hold
BAD_TIMES = [
    ("1e30", pa.array([1e30])),
    ("inf", pa.array([float("inf")])),
    ("-inf", pa.array([float("-inf")])),
    ("nan", pa.array([float("nan")])),
    ("99999999999999999999", pa.array([2**64 - 1], pa.uint64())),
    ("-9223372036854775809", pa.array(["-9223372036854775809"])),
]


def _with_bad_time(fmt: str, bad_time: tuple) -> dict:
    """ROWS with the fifth time (CSV line 6, Parquet row 5) replaced by the bad one."""
    text, column = bad_time
    times = [str(t) if pa.types.is_string(column.type) else t for t in log_columns()["t"]]
    times[4] = text if fmt == "csv" else column[0].as_py()
    return {**log_columns(), "t": times if fmt == "csv" else pa.array(times, column.type)}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("bad_time", BAD_TIMES, ids=[b[0] for b in BAD_TIMES])
def test_times_out_of_int64_or_not_finite_are_located_errors(tmp_path, fmt, bad_time):
    cfg = generic(tmp_path, fmt, _with_bad_time(fmt, bad_time))
    with pytest.raises(DataError) as err:
        build(cfg)
    assert_located(err.value, f"log.{fmt}", 6 if fmt == "csv" else "row 5", "t")
    assert "finite" in str(err.value) or "int64" in str(err.value)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("bad_time", BAD_TIMES, ids=[b[0] for b in BAD_TIMES])
def test_times_out_of_int64_or_not_finite_are_skipped_with_a_reason(tmp_path, fmt, bad_time):
    tables = build(generic(tmp_path, fmt, _with_bad_time(fmt, bad_time)), "skip")
    assert tables.meta["bad_rows"] == {"time out of range": 1}
    assert tables.meta["interactions"] == 6 and tables.interactions["order"].tolist() == [1, 2, 3, 4, 6, 7]


def test_movielens_timestamp_beyond_int64_is_a_located_error(tmp_path):
    (tmp_path / "u.data").write_text("1\t1\t5\t10\n1\t2\t3\t1e30\n1\t3\t4\t30\n")
    with pytest.raises(DataError) as err:
        build(DataConfig(format="movielens", root=str(tmp_path)))
    assert_located(err.value, "u.data", 2, "timestamp")


def write_kuairand(root: Path, time_ms=(1000.0, 2000.0, 3000.0), watch_ratio=(0.5, 0.5, 0.5), user_ids=(1, 1, 1),
                   last_time_ms=900, history_user=1, video_ids=(10, 11, 12), impression_videos=(10, 11, 12)):
    """A minimal KuaiRand-Pure release: one user, three impressions, a short history, three videos."""
    root.mkdir()
    impressions = pa.table({"user_id": pa.array(list(user_ids), pa.int64()), "video_id": list(impression_videos),
                            "time_ms": list(time_ms), "is_click": [1, 1, 1], "is_like": [0, 0, 0],
                            "is_follow": [0, 0, 0], "long_view": [0, 0, 0], "watch_ratio": list(watch_ratio)})
    pq.write_table(impressions, root / "val.parquet")
    pq.write_table(impressions.slice(0, 0), root / "test.parquet")
    pq.write_table(pa.table({"user_id": pa.array([history_user], pa.int64()), "last_time_ms": [last_time_ms],
                             "watch_seq": [[11, 12]]}), root / "user_sequences.parquet")
    pq.write_table(pa.table({"video_id": pa.array(list(video_ids), pa.int64()), "author_id": [7, 7, 9],
                             "tag": ["1", "2", "3"], "video_duration": [1000.0, 2000.0, 3000.0]}),
                   root / "item_features.parquet")
    return DataConfig(format="kuairand", root=str(root))


@pytest.mark.parametrize("value", [1e30, float("inf"), 2.0**63])
def test_kuairand_time_beyond_int64_is_a_located_error_not_a_wrapped_integer(tmp_path, value):
    # before: 1e30 became -9223372036854775808 in the order column, silently
    cfg = write_kuairand(tmp_path / "raw", time_ms=(1000.0, value, 3000.0))
    with pytest.raises(DataError) as err:
        build(cfg)
    assert_located(err.value, "val.parquet", 2, "time_ms")
    assert build(cfg, "skip").meta["bad_rows"] == {"time out of range": 1}


@pytest.mark.parametrize("value", [1e30, float("nan")])
def test_kuairand_history_last_time_beyond_int64_is_a_located_error(tmp_path, value):
    cfg = write_kuairand(tmp_path / "raw", last_time_ms=value)
    with pytest.raises(DataError) as err:
        build(cfg)
    assert_located(err.value, "user_sequences.parquet", 1, "last_time_ms")


ISO_TIMES = [  # (text, seconds since 1970 UTC)
    ("2024-05-01", 1714521600),
    ("2024-05-01T12:30:00Z", 1714566600),
    ("2024-05-01T12:30:00", 1714566600),  # no offset: UTC
    ("2024-05-01 12:30:00", 1714566600),
    ("2024-05-01T12:30", 1714566600),
    ("2024-05-01T14:30:00+02:00", 1714566600),
    ("2024-05-01T14:30:00+0200", 1714566600),
    ("2024-05-01T07:30:00-05", 1714566600),
    ("2024-05-01T12:30:00.999999999Z", 1714566600),  # fractions dropped
    ("1969-12-31T23:59:59.5", -1),  # dropped toward the past (floor), also before 1970
]


@pytest.mark.parametrize("text, seconds", ISO_TIMES, ids=[t for t, _ in ISO_TIMES])
def test_iso_8601_times_become_seconds_since_1970_utc(tmp_path, text, seconds):
    rows = [("a", "x", text, 1.0), ("a", "y", "2030-01-01", 1.0), ("a", "z", "2030-01-02", 1.0)]
    tables = build(generic(tmp_path, "csv", log_columns(rows)))
    assert tables.interactions["order"].tolist() == [seconds, 1893456000, 1893542400]


def test_parquet_timestamp_and_date_columns_become_seconds(tmp_path):
    from datetime import date, datetime, timezone

    at = datetime(2024, 5, 1, 12, 30, 0, 250000)
    cases = {
        "naive": pa.array([at] * 3, pa.timestamp("us")),
        "utc_ns": pa.array([at.replace(tzinfo=timezone.utc)] * 3, pa.timestamp("ns", tz="UTC")),
        "zoned": pa.array([at.replace(tzinfo=timezone.utc)] * 3, pa.timestamp("ms", tz="Europe/Paris")),
        "date": pa.array([date(2024, 5, 1)] * 3, pa.date32()),
    }
    for name, times in cases.items():
        columns = {**log_columns(ROWS[:3]), "t": times}
        tables = build(generic(tmp_path / name, "parquet", columns))
        expected = 1714521600 if name == "date" else 1714566600
        assert tables.interactions["order"].tolist() == [expected] * 3, name


def test_integer_times_are_kept_exactly_and_decimals_truncate_as_before(tmp_path):
    big = 2**62 + 1  # not a float64: int(float(text)) would have rounded it
    rows = [("a", "x", str(big), 1.0), ("a", "y", "10.9", 1.0), ("a", "z", "-3.7", 1.0)]
    tables = build(generic(tmp_path, "csv", log_columns(rows)))
    assert sorted(tables.interactions["order"].tolist()) == [-3, 10, big]


def test_a_time_column_mixing_numbers_and_dates_is_refused_in_both_modes(tmp_path):
    rows = [("a", "x", "100", 1.0), ("a", "y", "200", 1.0), ("a", "z", "2024-05-01", 1.0)]
    cfg = generic(tmp_path, "csv", log_columns(rows))
    for policy in ("error", "skip"):
        with pytest.raises(DataError) as err:
            build(cfg, policy)
        assert_located(err.value, "log.csv", 4, "t")
        assert "held a number first, on line 2" in str(err.value)


@pytest.mark.parametrize("text", ["05/01/2024", "2024-13-01", "2024-05-01T25:00", "1 May 2024", "2024-05-01T12:00+25:00"])
def test_other_date_layouts_are_refused_with_the_accepted_form(tmp_path, text):
    rows = [("a", "x", "2024-01-01", 1.0), ("a", "y", text, 1.0), ("a", "z", "2024-01-03", 1.0)]
    with pytest.raises(DataError, match=r"log\.csv:3: field 't': expected a number, got .* ISO 8601"):
        build(generic(tmp_path, "csv", log_columns(rows)))


# --- 2. CSV fields over csv's 131,072-character cap --------------------------------------------

@pytest.mark.parametrize("fmt", ["csv", "parquet"])  # Parquet never had the cap: kept as a guard
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_a_200_kb_item_description_is_read_whole(tmp_path, fmt, policy):
    description = "soft " * 40_000  # 200,000 characters
    items = {"id": ["x", "y", "z"], "title": ["X", "Y", "Z"], "description": ["short", description, "short"]}
    tables = build(generic(tmp_path, fmt, log_columns(), items), policy)
    assert tables.items["text"][1] == "Y; " + description.strip()
    assert tables.meta["bad_rows"] == {}


def test_a_long_field_in_the_interactions_csv_is_read_whole(tmp_path):
    rows = [("u" * 200_000, item, t, 1.0) for item, t in (("x", 1), ("y", 2), ("z", 3))]
    tables = build(generic(tmp_path, "csv", log_columns(rows)))
    assert tables.users["raw_id"] == ["u" * 200_000]


# --- 3. Amazon: a user on several lines (2014) or under a repeated key (2018) ------------------

def write_amazon2014(root: Path, sequences: str, items: list[dict] | None = None) -> DataConfig:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sequences.txt").write_text(sequences)
    items = items if items is not None else [{"item_id": i, "title": f"item {i}"} for i in range(1, 6)]
    (root / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return DataConfig(format="amazon2014", root=str(root))


def test_amazon2014_user_on_two_lines_names_both_lines(tmp_path):
    # before: user 1's items 1 2 3 and 4 5 were interleaved by position (1 4 2 5 3)
    cfg = write_amazon2014(tmp_path, "1 1 2 3\n2 3 2 1\n1 4 5 1\n")
    with pytest.raises(DataError) as err:
        build(cfg)
    assert_located(err.value, "sequences.txt", 3, "user")
    assert "already on line 1" in str(err.value)


def test_amazon2014_user_on_two_lines_keeps_the_first_line_in_skip_mode(tmp_path):
    tables = build(write_amazon2014(tmp_path, "1 1 2 3\n2 3 2 1\n1 4 5 1\n"), "skip")
    assert tables.meta["bad_rows"] == {"duplicate user id": 1}
    assert tables.interactions["item_index"].tolist() == [0, 1, 2, 2, 1, 0]  # user 1: 1 2 3 (its first line)


def write_amazon2018(root: Path, inter: str, items: str | None = None) -> DataConfig:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Toys.inter.json").write_text(inter)
    (root / "Toys.item.json").write_text(items or json.dumps({str(i): {"title": f"item {i}"} for i in range(4)}))
    return DataConfig(format="amazon2018", root=str(root))


def test_amazon2018_user_under_a_repeated_key_is_not_silently_replaced(tmp_path):
    # before: json.loads kept only the last {"0": [...]}, dropping the first history without a word
    inter = '{"0": [0, 1, 2], "1": [2, 1, 0], "0": [3, 2, 1]}'
    with pytest.raises(DataError) as err:
        build(write_amazon2018(tmp_path, inter))
    assert_located(err.value, "Toys.inter.json", "entry 3", "0")
    tables = build(write_amazon2018(tmp_path, inter), "skip")
    assert tables.meta["bad_rows"] == {"duplicate user id": 1}
    assert tables.interactions["item_index"].tolist()[:3] == [0, 1, 2]  # the first entry


def test_amazon2018_item_under_a_repeated_key_is_a_duplicate_item_id(tmp_path):
    items = '{"0": {"title": "A"}, "1": {"title": "B"}, "2": {"title": "C"}, "1": {"title": "B again"}}'
    cfg = write_amazon2018(tmp_path, '{"0": [0, 1, 2], "1": [2, 1, 0]}', items)
    with pytest.raises(DataError) as err:
        build(cfg)
    assert_located(err.value, "Toys.item.json", 4, "item_id")
    assert build(cfg, "skip").items["title"] == ["A", "B", "C"]


# --- 4. null or empty ids -----------------------------------------------------------------------

NUMERIC_ITEMS = [{"item_id": i, "title": f"item {i}"} for i in (1, 2, 3, 10)]


@pytest.mark.parametrize("bad_id", [None, "", " "])
def test_amazon2014_null_item_id_is_a_located_error(tmp_path, bad_id):
    items = NUMERIC_ITEMS[:2] + [{"item_id": bad_id, "title": "?"}] + NUMERIC_ITEMS[2:]
    cfg = write_amazon2014(tmp_path, "1 1 2 3\n2 3 2 10\n", items)
    with pytest.raises(DataError) as err:
        build(cfg)
    assert_located(err.value, "items.jsonl", 3, "item_id")


def test_amazon2014_null_item_id_skipped_keeps_the_numeric_id_order(tmp_path):
    # before: an item "None" joined the catalogue and turned the order lexicographic (1, 10, 2, 3, None)
    items = NUMERIC_ITEMS[:2] + [{"item_id": None, "title": "?"}] + NUMERIC_ITEMS[2:]
    cfg = write_amazon2014(tmp_path, "1 1 2 3\n2 3 2 10\n", items)
    tables = build(cfg, "skip")
    assert tables.items["raw_id"] == ["1", "2", "3", "10"]
    assert tables.meta["bad_rows"] == {"missing id": 1}


@pytest.mark.parametrize("bad_id", [True, 1.5, [1], {"id": 1}])
def test_amazon2014_item_id_of_another_type_is_a_located_error(tmp_path, bad_id):
    cfg = write_amazon2014(tmp_path, "1 1 2 3\n2 3 2 10\n", NUMERIC_ITEMS + [{"item_id": bad_id, "title": "?"}])
    with pytest.raises(DataError) as err:
        build(cfg)
    assert_located(err.value, "items.jsonl", 5, "item_id")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("column", ["u", "i"])
def test_generic_null_user_or_item_id_is_a_missing_id(tmp_path, fmt, column):
    columns = log_columns()
    columns[column] = pa.array(columns[column][:4] + [None] + columns[column][5:], pa.string())
    if fmt == "csv":
        columns[column] = ["" if v is None else v for v in columns[column].to_pylist()]
    cfg = generic(tmp_path, fmt, columns)
    with pytest.raises(DataError) as err:
        build(cfg)
    assert_located(err.value, f"log.{fmt}", 6 if fmt == "csv" else "row 5", column)
    assert build(cfg, "skip").meta["bad_rows"] == {"missing id": 1}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_generic_null_id_in_the_items_file_is_not_an_item(tmp_path, fmt):
    # before: an item "" joined the catalogue (and an interactions-free one at that)
    items = {"id": pa.array(["x", None, "y", "z"], pa.string()), "title": ["X", "?", "Y", "Z"]}
    if fmt == "csv":
        items["id"] = ["x", "", "y", "z"]
    cfg = generic(tmp_path, fmt, log_columns(), items)
    with pytest.raises(DataError) as err:
        build(cfg)
    assert_located(err.value, f"items.{fmt}", 3 if fmt == "csv" else "row 2", "id")
    tables = build(cfg, "skip")
    assert tables.items["raw_id"] == ["x", "y", "z"] and tables.meta["bad_rows"] == {"missing id": 1}


def test_movielens_empty_user_id_is_a_located_error(tmp_path):
    (tmp_path / "u.data").write_text("1\t1\t5\t10\n\t2\t3\t20\n1\t3\t4\t30\n")
    with pytest.raises(DataError) as err:
        build(DataConfig(format="movielens", root=str(tmp_path)))
    assert_located(err.value, "u.data", 2, "user_id")


def test_kuairand_null_ids_are_located_errors(tmp_path):
    cases = {
        "history user": (dict(history_user=None), "user_sequences.parquet", 1, "user_id"),
        "impression user": (dict(user_ids=(1, None, 1)), "val.parquet", 2, "user_id"),
        "video": (dict(video_ids=(10, None, 12)), "item_features.parquet", 2, "video_id"),
    }
    for name, (kwargs, file, line, field) in cases.items():
        cfg = write_kuairand(tmp_path / name, **kwargs)
        with pytest.raises(DataError) as err:
            build(cfg)
        assert_located(err.value, file, line, field)


# --- 5. bytes that are not UTF-8 ----------------------------------------------------------------

def test_non_utf8_csv_names_file_line_and_byte_offset(tmp_path):
    cfg = generic(tmp_path, "csv", log_columns())
    lines = (tmp_path / "log.csv").read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b"a", b"\xff", 1)  # line 4: "\xff,z,3,1.0"
    (tmp_path / "log.csv").write_bytes(b"\n".join(lines))
    offset = len(b"\n".join(lines[:3])) + 1
    for policy in ("error", "skip"):  # a file in another encoding is wrong as a whole
        with pytest.raises(DataError) as err:
            build(cfg, policy)
        assert_located(err.value, "log.csv", 4, "*")
        assert f"byte offset {offset} (byte 0xff, column 1)" in str(err.value)


@pytest.mark.parametrize("layout", ["movielens", "amazon2014 sequences", "amazon2014 items", "amazon2018"])
def test_non_utf8_bytes_are_located_in_every_text_reader(tmp_path, layout):
    if layout == "movielens":
        (tmp_path / "ml-100k.inter").write_bytes(
            b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t4\t1\n1\t\xe9\t4\t2\n")
        cfg, file, line = DataConfig(format="movielens", root=str(tmp_path)), "ml-100k.inter", 3
    elif layout.startswith("amazon2014"):
        cfg = write_amazon2014(tmp_path, "1 1 2 3\n2 3 2 1\n")
        file = "sequences.txt" if layout.endswith("sequences") else "items.jsonl"
        (tmp_path / file).write_bytes((tmp_path / file).read_bytes().replace(b"2", b"\xc3(", 1))
        line = 1 if file == "sequences.txt" else 2
    else:
        cfg = write_amazon2018(tmp_path, '{"0": [0, 1, 2],\n "1": [2, 1, 0]}')
        (tmp_path / "Toys.inter.json").write_bytes((tmp_path / "Toys.inter.json").read_bytes().replace(b'"1"', b'"\xff"'))
        file, line = "Toys.inter.json", 2
    with pytest.raises(DataError) as err:
        build(cfg)
    assert_located(err.value, file, line, "*")
    assert "not valid UTF-8 at byte offset" in str(err.value)


def test_the_cli_reports_bad_bytes_as_a_message_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "u.data").write_bytes(b"1\t1\t5\t10\n1\t2\t\xff\t20\n")
    code = cli_main(["data", f"data.root={tmp_path / 'raw'}", f"run.out_dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "u.data:2: field '*': not valid UTF-8 at byte offset 13 (byte 0xff, column 5)" in err and "Traceback" not in err


# --- 6. a UTF-8 byte-order mark -----------------------------------------------------------------

BOM = b"\xef\xbb\xbf"


def test_bom_does_not_hide_the_first_csv_column(tmp_path):
    cfg = generic(tmp_path, "csv", log_columns())
    (tmp_path / "log.csv").write_bytes(BOM + (tmp_path / "log.csv").read_bytes())
    assert build(cfg).meta["interactions"] == 7  # before: "field 'u': column not found"


def test_bom_does_not_hide_the_first_movielens_column(tmp_path):
    (tmp_path / "ml-100k.inter").write_bytes(
        BOM + b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t4\t1\n1\t2\t4\t2\n1\t3\t4\t3\n")
    (tmp_path / "ml-100k.item").write_bytes(BOM + b"item_id:token\tmovie_title:token_seq\n1\tA\n2\tB\n3\tC\n")
    tables = build(DataConfig(format="movielens", root=str(tmp_path)))
    assert tables.items["title"] == ["A", "B", "C"]


def test_bom_does_not_change_the_first_amazon_user_or_item(tmp_path):
    cfg = write_amazon2014(tmp_path / "2014", "1 1 2 3\n2 3 2 1\n")
    for name in ("sequences.txt", "items.jsonl"):
        (tmp_path / "2014" / name).write_bytes(BOM + (tmp_path / "2014" / name).read_bytes())
    tables = build(cfg)
    assert tables.users["raw_id"] == ["1", "2"]  # before: "\ufeff1", and items.jsonl line 1 was malformed
    assert tables.items["raw_id"][0] == "1"
    cfg = write_amazon2018(tmp_path / "2018", '{"0": [0, 1, 2], "1": [2, 1, 0]}')
    for name in ("Toys.inter.json", "Toys.item.json"):
        (tmp_path / "2018" / name).write_bytes(BOM + (tmp_path / "2018" / name).read_bytes())
    assert build(cfg).meta["interactions"] == 6


# --- 7. feedback that is not a finite float32 ---------------------------------------------------

BAD_FEEDBACK = ["inf", "-inf", "nan", "Infinity", "1e39"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("value", BAD_FEEDBACK)
def test_non_finite_feedback_is_a_located_error_or_a_counted_skip(tmp_path, fmt, value):
    columns = log_columns()
    columns["click"] = columns["click"][:4] + [float(value) if fmt == "parquet" else value] + columns["click"][5:]
    cfg = generic(tmp_path, fmt, columns)
    with pytest.raises(DataError) as err:
        build(cfg)
    assert_located(err.value, f"log.{fmt}", 6 if fmt == "csv" else "row 5", "click")
    tables = build(cfg, "skip")
    reason = "number out of range" if value == "1e39" else "non-finite number"
    assert tables.meta["bad_rows"] == {reason: 1}
    assert np.isfinite(tables.interactions["click"]).all() and tables.meta["interactions"] == 6


def test_movielens_infinite_rating_is_a_located_error(tmp_path):
    (tmp_path / "u.data").write_text("1\t1\t5\t10\n1\t2\tinf\t20\n1\t3\t4\t30\n")
    with pytest.raises(DataError) as err:
        build(DataConfig(format="movielens", root=str(tmp_path)))
    assert_located(err.value, "u.data", 2, "rating")


def test_kuairand_infinite_signal_says_what_it_got(tmp_path):
    cfg = write_kuairand(tmp_path / "raw", watch_ratio=(0.5, float("inf"), 0.5))
    with pytest.raises(DataError, match=r"val\.parquet:2: field 'watch_ratio': expected a finite number, got inf"):
        build(cfg)  # before: "expected a number, got null"
    assert build(cfg, "skip").meta["bad_rows"] == {"non-finite number": 1}


# --- 8. exact duplicate rows ---------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_exact_duplicate_row_names_both_lines(tmp_path, fmt):
    rows = ROWS[:5] + [ROWS[1]] + ROWS[5:]  # line 7 repeats line 3
    with pytest.raises(DataError) as err:
        build(generic(tmp_path, fmt, log_columns(rows)))
    noun, first = ("line", 3) if fmt == "csv" else ("row", 2)
    assert_located(err.value, f"log.{fmt}", 7 if fmt == "csv" else 6, "*")
    assert f"same user, item, time and feedback as {noun} {first}" in str(err.value)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_exact_duplicate_rows_keep_the_first_in_skip_mode(tmp_path, fmt):
    rows = ROWS[:5] + [ROWS[1], ROWS[1], ROWS[4]] + ROWS[5:]
    tables = build(generic(tmp_path, fmt, log_columns(rows)), "skip")
    assert tables.meta["bad_rows"] == {"duplicate row": 3}
    assert tables.meta["interactions"] == 7 and tables.interactions["order"].tolist() == [1, 2, 3, 4, 5, 6, 7]


def test_rows_that_differ_in_feedback_or_time_are_not_duplicates(tmp_path):
    rows = ROWS + [("a", "y", 2, 1.0), ("a", "y", 7, 0.0), ("a", "y", 2, 0.5)]  # each differs from line 3
    assert build(generic(tmp_path, "csv", log_columns(rows))).meta["interactions"] == 10


def test_minus_zero_feedback_equals_zero(tmp_path):
    rows = ROWS + [("b", "y", 7, -0.0), ("b", "y", 7, 0.0)]
    assert build(generic(tmp_path, "csv", log_columns(rows)), "skip").meta["bad_rows"] == {"duplicate row": 1}


def test_movielens_duplicate_rating_names_both_lines(tmp_path):
    (tmp_path / "u.data").write_text("1\t1\t5\t10\n1\t2\t3\t20\n1\t3\t4\t30\n1\t2\t3\t20\n")
    with pytest.raises(DataError) as err:
        build(DataConfig(format="movielens", root=str(tmp_path)))
    assert_located(err.value, "u.data", 4, "*")
    assert "as line 2" in str(err.value)


def test_kuairand_keeps_its_double_logged_impressions_and_counts_them(tmp_path):
    # the real release logs 5,877 impressions twice; its published results were made with them
    cfg = write_kuairand(tmp_path / "raw", time_ms=(1000, 1000, 3000), impression_videos=(10, 10, 12))
    for policy in ("error", "skip"):
        tables = build(cfg, policy)
        assert tables.meta["duplicate_rows_kept"] == 1 and tables.meta["bad_rows"] == {}
        assert tables.meta["interactions"] == 5  # 2 watches + 3 impressions


# --- 9. control characters in item text ---------------------------------------------------------

def test_ansi_escapes_and_control_characters_leave_titles_at_load_time(tmp_path):
    # before: `onerec recommend` printed these to the terminal as they were
    titles = ["\x1b[31mRed\x1b[0m Movie", "Bell\x07 \x1b]0;owned\x07Title", "Back\x0bspace\x08\x7f"]
    (tmp_path / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(f"1\t{i}\t4\t{i}\n" for i in (1, 2, 3)))
    (tmp_path / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\n" + "".join(f"{i}\t{t}\n" for i, t in zip((1, 2, 3), titles)))
    tables = build(DataConfig(format="movielens", root=str(tmp_path)))
    assert tables.items["title"] == ["Red Movie", "Bell Title", "Backspace"]
    assert tables.items["text"] == ["Red Movie", "Bell Title", "Backspace"]


def test_control_characters_leave_amazon_titles(tmp_path):
    items = [{"item_id": 1, "title": "\u001b[2J\u001b[HCleared"}, {"item_id": 2, "title": "Carriage\rreturn"},
             {"item_id": 3, "title": "C1\u009b control"}]
    tables = build(write_amazon2014(tmp_path, "1 1 2 3\n2 3 2 1\n", items))
    assert tables.items["title"] == ["Cleared", "Carriagereturn", "C1 control"]


def test_strip_control_keeps_other_text_identical():
    from onerec.data.readers import strip_control

    texts = ["Café crème 🍰", "Tab\tand\nnewline", "", "a[31m b", "100% \\x1b not an escape"]
    assert strip_control(texts) is texts  # nothing to strip: the very same list
    assert strip_control(["x\x1b[1;31my", "z\x00"]) == ["xy", "z"]
