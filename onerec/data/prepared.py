"""The prepared data directory that the `data` stage writes and every later stage reads.

    data/items/         item_index, raw_id, title, text (+ features) (HF datasets, save_to_disk)
    data/interactions/  user_index, item_index, order, feedback (sorted by user, then time)
    data/users/         user_index, raw_id
    data/meta.json      counts, skipped bad rows by reason, format (and duplicate_rows_kept
                        when the reader keeps exact duplicate rows: KuaiRand)

`write_prepared` fills a temporary sibling directory and renames it into place only when
complete, so a failed run leaves an earlier good data/ untouched; it replaces only a data/
that onerec wrote (onerec.run_dir.replace_directory).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets

from onerec.data.build import Tables
from onerec.data.splits import UserSequences
from onerec.run_dir import replace_directory

TABLES = ("items", "interactions", "users")
META_FILE = "meta.json"
OUTPUT_KIND = "data"


@dataclass
class PreparedData:
    items: datasets.Dataset
    interactions: datasets.Dataset
    sequences: UserSequences
    meta: dict


def write_prepared(tables: Tables, target: Path) -> Path:
    """Write the three tables and meta.json to `target` atomically (temporary dir + rename)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name in TABLES:
            # lists and 2-D arrays (item feature vectors) go in as one list per row
            table = {k: list(v) if isinstance(v, list) or getattr(v, "ndim", 1) > 1 else v
                     for k, v in getattr(tables, name).items()}
            datasets.Dataset.from_dict(table).save_to_disk(str(tmp / name))
        (tmp / META_FILE).write_text(json.dumps(tables.meta, indent=2) + "\n")
        replace_directory(tmp, target, OUTPUT_KIND, META_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_prepared(data_dir: Path) -> PreparedData:
    data_dir = Path(data_dir)
    if not (data_dir / "meta.json").is_file():
        raise FileNotFoundError(f"{data_dir}: no meta.json; run `onerec data` first")
    meta = json.loads((data_dir / "meta.json").read_text())
    items = datasets.load_from_disk(str(data_dir / "items"))
    interactions = datasets.load_from_disk(str(data_dir / "interactions"))
    arrow = interactions.data  # read columns straight from Arrow: no per-row Python objects
    columns = [arrow.column(name).to_numpy() for name in ("user_index", "item_index", "order")]
    if meta.get("sequence_column"):  # e.g. KuaiRand: users' sequences are their clicked impressions
        positive = arrow.column(meta["sequence_column"]).to_numpy() > 0
        columns = [column[positive] for column in columns]
    sequences = UserSequences.from_sorted(
        *columns,
        num_users=meta["users"],
        has_time=meta["has_time"],
    )
    return PreparedData(items, interactions, sequences, meta)
