"""Loaders for every supported format, on small files written in the real layouts."""

import json
import zipfile
from pathlib import Path

import pytest

from onerec.config import DataConfig, load_config
from onerec.data.build import build_tables
from onerec.data.errors import BadRows
from onerec.data.fetch import RECBOLE_MEMBERS, extract_from_recbole_wheel, is_fetched
from onerec.data.prepared import load_prepared
from onerec.data.sources import load_raw
from onerec.stages.data import main as data_main

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def build(cfg: DataConfig, policy="error"):
    bad = BadRows(policy)
    return build_tables(load_raw(cfg, bad), cfg, bad)


def write_atomic_movielens(root: Path):
    root.mkdir(exist_ok=True)
    (root / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "1\t10\t4\t300\n1\t2\t5\t100\n1\t3\t3\t200\n2\t2\t1\t50\n2\t10\t2\t60\n2\t3\t4\t70\n"
    )
    (root / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "2\tGoldenEye\t1995\tAction Thriller\n3\tFour Rooms\t1995\tThriller\n10\tRichard III\t1995\tDrama War\n"
    )


def test_movielens_atomic_files_sort_by_time_and_map_ids_numerically(tmp_path):
    write_atomic_movielens(tmp_path)
    tables = build(DataConfig(format="movielens", root=str(tmp_path), text_fields=["title", "year", "genres"]))
    assert tables.items["raw_id"] == ["2", "3", "10"]  # numeric order, not "10" < "2"
    assert tables.items["text"][0] == "GoldenEye; 1995; Action Thriller"
    assert tables.interactions["user_index"].tolist() == [0, 0, 0, 1, 1, 1]
    assert tables.interactions["item_index"].tolist() == [0, 1, 2, 0, 2, 1]  # user 1: t=100,200,300
    assert tables.interactions["rating"].tolist() == [5, 3, 4, 1, 2, 4]
    assert tables.meta["users"] == 2 and tables.meta["items"] == 3 and tables.meta["interactions"] == 6


def test_movielens_grouplens_files(tmp_path):
    flags = "|".join(["0"] * 19)
    action = "|".join(["0", "1"] + ["0"] * 17)
    (tmp_path / "u.data").write_text("1\t1\t5\t10\n1\t2\t3\t20\n1\t3\t4\t30\n")
    (tmp_path / "u.item").write_bytes(
        (f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags}\n"
         f"2|GoldenEye (1995)|01-Jan-1995||http://x|{action}\n"
         f"3|Caf\xe9 au lait (1994)|01-Jan-1994||http://x|{flags}\n").encode("latin-1")
    )
    tables = build(DataConfig(format="movielens", root=str(tmp_path), text_fields=["title", "year", "genres"]))
    assert tables.items["title"] == ["Toy Story", "GoldenEye", "Café au lait"]
    assert tables.items["text"][1] == "GoldenEye; 1995; Action"


def test_amazon2014_format(tmp_path):
    (tmp_path / "sequences.txt").write_text("1 1 2 3\n2 3 2 1 2\n")
    (tmp_path / "items.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [
            {"item_id": 1, "title": "Lipstick red", "short_text": "red lipstick"},
            {"item_id": 2, "title": None, "short_text": "nail polish"},
            {"item_id": 3, "title": "Shampoo", "short_text": "mild shampoo"},
        ]) + "\n"
    )
    tables = build(DataConfig(format="amazon2014", root=str(tmp_path), text_fields=["title", "short_text"]))
    assert tables.items["title"] == ["Lipstick red", "nail polish", "Shampoo"]  # missing title -> short_text
    # The embedded text names each field once: no "nail polish; nail polish" for the untitled item.
    assert tables.items["text"] == ["Lipstick red; red lipstick", "nail polish", "Shampoo; mild shampoo"]
    assert tables.interactions["item_index"].tolist() == [0, 1, 2, 2, 1, 0, 1]
    assert tables.interactions["order"].tolist() == [0, 1, 2, 0, 1, 2, 3]


def test_amazon2018_format(tmp_path):
    (tmp_path / "Toys.inter.json").write_text(json.dumps({"0": [0, 1, 2], "1": [2, 1, 0, 1]}))
    (tmp_path / "Toys.item.json").write_text(json.dumps({
        "0": {"title": "Ball", "brand": "Acme", "categories": "Toys,Balls", "description": ""},
        "1": {"title": "Kite", "brand": "", "categories": "Toys", "description": "flies"},
        "2": {"title": "Yo-yo", "brand": "Acme", "categories": "Toys", "description": ""},
    }))
    tables = build(DataConfig(format="amazon2018", root=str(tmp_path), text_fields=["title", "brand", "categories"]))
    assert tables.items["text"] == ["Ball; Acme; Toys,Balls", "Kite; Toys", "Yo-yo; Acme; Toys"]
    assert tables.meta["interactions"] == 7


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_generic_log_with_column_mapping(tmp_path, suffix):
    rows = [("a", "x", 3, 1.0), ("a", "y", 1, 0.0), ("a", "z", 2, 1.0), ("b", "y", 5, 1.0), ("b", "x", 4, 0.5), ("b", "z", 6, 1.0)]
    if suffix == "csv":
        (tmp_path / "log.csv").write_text("uid,iid,ts,click\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"uid": [r[0] for r in rows], "iid": [r[1] for r in rows],
                                 "ts": [r[2] for r in rows], "click": [r[3] for r in rows]}), tmp_path / "log.parquet")
    cfg = DataConfig(format=suffix, root=str(tmp_path), interactions_file=f"log.{suffix}", user_column="uid",
                     item_column="iid", time_column="ts", feedback_columns=["click"])
    tables = build(cfg)
    assert tables.items["raw_id"] == ["x", "y", "z"]
    assert tables.interactions["item_index"].tolist() == [1, 2, 0, 0, 1, 2]
    assert tables.interactions["click"].tolist() == [0.0, 1.0, 1.0, 0.5, 1.0, 1.0]
    assert tables.meta["has_time"] is True


def test_recbole_wheel_extraction(tmp_path):
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for member in RECBOLE_MEMBERS:
            archive.writestr(member, f"content of {member}")
        archive.writestr("recbole/__init__.py", "")
    target = tmp_path / "ml-100k"
    target.mkdir()
    extract_from_recbole_wheel(wheel, target)
    assert sorted(p.name for p in target.iterdir()) == ["ml-100k.inter", "ml-100k.item", "ml-100k.user"]
    assert is_fetched(target)


def test_data_stage_writes_arrow_tables_that_load_back(tmp_path):
    write_atomic_movielens(tmp_path / "raw")
    cfg = load_config(None, [f"run.out_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'raw'}"])
    data_dir = data_main(cfg)
    prepared = load_prepared(data_dir)
    assert prepared.meta["bad_rows"] == {}
    assert prepared.items.column_names[:4] == ["item_index", "raw_id", "title", "text"]
    assert prepared.sequences.offsets.tolist() == [0, 3, 6]
    assert prepared.sequences.items.tolist() == [0, 1, 2, 0, 2, 1]


@pytest.mark.skipif(not (SHARED / "amazon2014_beauty").is_dir(), reason="shared data not present (../shared/data)")
def test_real_beauty_counts_match_the_published_statistics():
    tables = build(load_config(None, [f"data.root={SHARED / 'amazon2014_beauty'}", "data.format=amazon2014",
                                      "data.text_fields=[title,short_text]"]).data)
    assert (tables.meta["users"], tables.meta["items"], tables.meta["interactions"]) == (22363, 12101, 198502)


@pytest.mark.skipif(not (SHARED / "amazon2018_scientific").is_dir(), reason="shared data not present (../shared/data)")
def test_real_scientific_counts():
    tables = build(load_config(None, [f"data.root={SHARED / 'amazon2018_scientific'}", "data.format=amazon2018",
                                      "data.text_fields=[title,brand,categories]"]).data)
    assert (tables.meta["users"], tables.meta["items"], tables.meta["interactions"]) == (8317, 4344, 58492)
