"""Every bad-input case: a clear error naming file, line and field, or a counted skip."""

import hashlib
from pathlib import Path

import pytest

from onerec.config import DataConfig, load_config
from onerec.data.build import build_tables
from onerec.data.errors import BadRows, DataError
from onerec.data.sources import load_raw
from onerec.stages.data import main as data_main

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
ITEMS = "item_id:token\tmovie_title:token_seq\n1\tA\n2\tB\n3\tC\n"
GOOD = ["1\t1\t4\t10", "1\t2\t4\t11", "1\t3\t4\t12", "2\t1\t4\t10", "2\t2\t4\t11", "2\t3\t4\t12"]


def write(root: Path, rows: list[str], items: str = ITEMS) -> DataConfig:
    root.mkdir(parents=True, exist_ok=True)
    (root / "ml-100k.inter").write_text(HEADER + "".join(r + "\n" for r in rows))
    (root / "ml-100k.item").write_text(items)
    return DataConfig(format="movielens", root=str(root))


def run(cfg: DataConfig, policy: str):
    cfg.on_bad_rows = policy
    bad = BadRows(policy)
    return build_tables(load_raw(cfg, bad), cfg, bad)


CASES = [
    # (name, rows, items, file, line, field, reason)
    ("malformed line", GOOD[:3] + ["2\t1"] + GOOD[3:], ITEMS, "ml-100k.inter", 5, "#3", "malformed line"),
    ("non-numeric field", GOOD + ["2\t3\tabc\t13"], ITEMS, "ml-100k.inter", 8, "rating", "non-numeric field"),
    ("unknown item id", GOOD + ["2\t99\t4\t13"], ITEMS, "ml-100k.inter", 8, "item", "unknown item id"),
    ("too few interactions", GOOD + ["3\t1\t4\t10", "3\t2\t4\t11"], ITEMS, "ml-100k.inter", 8, "user", "user with too few interactions"),
    ("duplicate item id", GOOD, ITEMS + "2\tB again\n", "ml-100k.item", 5, "item_id", "duplicate item id"),
]


@pytest.mark.parametrize("name, rows, items, file, line, field, reason", CASES, ids=[c[0] for c in CASES])
def test_error_mode_names_file_line_and_field(tmp_path, name, rows, items, file, line, field, reason):
    cfg = write(tmp_path, rows, items)
    with pytest.raises(DataError) as err:
        run(cfg, "error")
    assert (err.value.file, err.value.line, err.value.field) == (file, line, field)
    assert f"{file}:{line}: field '{field}'" in str(err.value)


@pytest.mark.parametrize("name, rows, items, file, line, field, reason", CASES, ids=[c[0] for c in CASES])
def test_skip_mode_drops_and_counts(tmp_path, name, rows, items, file, line, field, reason):
    tables = run(write(tmp_path, rows, items), "skip")
    assert tables.meta["bad_rows"] == {reason: 1}
    assert tables.meta["users"] == 2 and tables.meta["interactions"] == 6
    if name == "duplicate item id":
        assert tables.items["title"][1] == "B"  # the first definition wins


def test_empty_file_is_an_error_in_both_modes(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    (root / "ml-100k.inter").write_text("")
    for policy in ("error", "skip"):
        with pytest.raises(DataError, match="ml-100k.inter:1: .*empty"):
            run(DataConfig(format="movielens", root=str(root)), policy)


def test_generic_csv_reports_line_and_column(tmp_path):
    (tmp_path / "log.csv").write_text("u,i,t\na,x,1\na,y,2\na,z,oops\n")
    cfg = DataConfig(format="csv", root=str(tmp_path), interactions_file="log.csv", user_column="u",
                     item_column="i", time_column="t")
    with pytest.raises(DataError, match=r"log.csv:4: field 't': expected a number, got 'oops'"):
        run(cfg, "error")


def test_generic_csv_missing_column_is_named(tmp_path):
    (tmp_path / "log.csv").write_text("user,item\na,x\n")
    cfg = DataConfig(format="csv", root=str(tmp_path), interactions_file="log.csv", user_column="uid", item_column="item")
    with pytest.raises(DataError, match="field 'uid': column not found"):
        run(cfg, "error")


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_run_leaves_the_previous_output_untouched(tmp_path):
    raw = tmp_path / "raw"
    write(raw, GOOD)
    overrides = [f"run.out_dir={tmp_path / 'run'}", f"data.root={raw}"]
    data_dir = data_main(load_config(None, overrides))
    before = _digest(data_dir)
    write(raw, GOOD + ["2\t3\tabc\t13"])
    with pytest.raises(DataError):
        data_main(load_config(None, overrides))
    assert _digest(data_dir) == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["data"]  # no temporary leftovers
