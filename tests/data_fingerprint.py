"""A fingerprint of what `onerec data` makes of a data set: meta.json, a digest of every column
of the three prepared tables, and of every training, validation and test example.

Stored fingerprints (tests/unit/data_fingerprints.json) were made by the row-by-row reader
that the columnar one replaced; the columnar path must reproduce them bit for bit. Run as a
script to print the fingerprints of the data sets present here:

    python tests/data_fingerprint.py [--shared ../shared/data] > fingerprints.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _digest(values) -> str:
    hasher = hashlib.sha256()
    if isinstance(values, np.ndarray):
        hasher.update(str(values.dtype.kind).encode())
        hasher.update(np.ascontiguousarray(values).tobytes())
    else:
        for value in values:
            hasher.update(json.dumps(value).encode() + b"\0")
    return hasher.hexdigest()[:16]


def fingerprint(data_dir: Path, max_history: int, session_len: int) -> dict:
    from onerec.config import DataConfig
    from onerec.data.prepared import load_prepared
    from onerec.data.splits import make_splits

    prepared = load_prepared(data_dir)
    print_meta = {k: v for k, v in prepared.meta.items()}
    tables = {}
    for name in ("items", "interactions", "users"):
        dataset = getattr(prepared, name) if name != "users" else None
        if dataset is None:
            import datasets

            dataset = datasets.load_from_disk(str(data_dir / "users"))
        arrow = dataset.data
        columns = {}
        for column in arrow.column_names:
            values = arrow.column(column)
            if values.type.num_fields or str(values.type) in ("string", "large_string"):
                columns[column] = _digest(values.to_pylist())
            else:
                columns[column] = _digest(values.to_numpy())
        tables[name] = columns
    cfg = DataConfig(format=prepared.meta["format"], max_history=max_history, session_len=session_len)
    splits = {}
    for split, examples in make_splits(prepared.sequences, cfg).items():
        rows = examples.gather(np.arange(len(examples)))
        splits[split] = {"examples": len(examples), **{k: _digest(np.asarray(getattr(rows, k), dtype=np.int64))
                                                      for k in ("user", "history", "target")}}
    return {"meta": print_meta, "tables": tables, "splits": splits}


def data_sets(shared: Path, synthetic: Path) -> dict[str, list[str]]:
    """name -> `onerec data` overrides, for the data sets present."""
    sets = {
        "movielens": ["data.format=movielens", "data.text_fields=[title,year,genres]"],
        "synthetic_parquet": [f"data.root={synthetic}", "data.format=parquet", "data.interactions_file=interactions.parquet",
                              "data.user_column=user_id", "data.item_column=item_id", "data.time_column=timestamp",
                              "data.feedback_columns=[like,watch_ratio]", "data.on_bad_rows=skip",
                              "data.items_file=items.parquet", "data.item_id_column=item_id",
                              "data.text_fields=[title,category]"],
        "synthetic_csv": [f"data.root={synthetic}", "data.format=csv", "data.interactions_file=interactions.csv",
                          "data.user_column=user_id", "data.item_column=item_id", "data.time_column=timestamp",
                          "data.feedback_columns=[like,watch_ratio]", "data.on_bad_rows=skip",
                          "data.items_file=items.csv", "data.item_id_column=item_id",
                          "data.text_fields=[title,category]"],
    }
    if (shared / "amazon2014_beauty").is_dir():
        sets["beauty"] = [f"data.root={shared / 'amazon2014_beauty'}", "data.format=amazon2014",
                          "data.text_fields=[title,short_text]"]
    if (shared / "amazon2018_scientific").is_dir():
        sets["scientific"] = [f"data.root={shared / 'amazon2018_scientific'}", "data.format=amazon2018",
                              "data.text_fields=[title,brand,categories]"]
    if (shared / "kuairand_pure_partial").is_dir():
        sets["kuairand"] = [f"data.root={shared / 'kuairand_pure_partial'}", "data.format=kuairand",
                            "data.session_len=3", "data.on_bad_rows=skip"]
    return sets


def write_synthetic(root: Path) -> Path:
    """A small synthetic log with feedback columns, as Parquet and CSV (bench/scale.py)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from scale import LogSpec, generate_log

    generate_log(root, LogSpec(rows=20_000, users=300, items=400, feedback=True, seed=7), formats=("parquet", "csv"))
    return root


def raw_digest(root: Path) -> str:
    """The synthetic log's own content (its floats come from exp/log of the C library, which
    may round differently elsewhere: then the stored fingerprint does not apply)."""
    import pyarrow.parquet as pq

    table = pq.read_table(root / "interactions.parquet")
    return _digest(np.concatenate([np.asarray(c.to_numpy(), dtype=np.float64) for c in table.columns]))


def run_data(overrides: list[str], out: Path, cache_dir: str | None = None) -> Path:
    from onerec.config import load_config
    from onerec.stages.data import main as data_main

    extra = [f"data.cache_dir={cache_dir}"] if cache_dir else []
    cfg = load_config(None, [*overrides, *extra, f"run.out_dir={out}"])
    return data_main(cfg)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = write_synthetic(Path(tmp) / "synthetic")
        for name, overrides in data_sets(args.shared, synthetic).items():
            session_len = 3 if name == "kuairand" else 1
            data_dir = run_data(overrides, Path(tmp) / f"run_{name}", args.cache_dir)
            results[name] = fingerprint(data_dir, max_history=20, session_len=session_len)
            if name.startswith("synthetic"):
                results[name]["raw"] = raw_digest(synthetic)
    json.dump(results, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
