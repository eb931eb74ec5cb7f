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

import hashlib
import itertools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa

from onerec.data.build import SortedInteractions, Tables
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
        for name in ("items", "users"):
            # lists and 2-D arrays (item feature vectors) go in as one list per row
            table = {k: list(v) if isinstance(v, list) or getattr(v, "ndim", 1) > 1 else v
                     for k, v in getattr(tables, name).items()}
            datasets.Dataset.from_dict(table).save_to_disk(str(tmp / name))
        _write_interactions(tables.interactions, tmp / "interactions")
        (tmp / META_FILE).write_text(json.dumps(tables.meta, indent=2) + "\n")
        replace_directory(tmp, target, OUTPUT_KIND, META_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_interactions(interactions: SortedInteractions, target: Path) -> None:
    """The interactions table as a dataset folder, written a slice at a time, so the table is
    never built whole: the layout Dataset.save_to_disk writes (one Arrow stream file, and
    state.json naming it beside dataset_info.json), made from an empty dataset of the same
    schema, whose schema (with the features in its metadata) the stream file takes."""
    batches = (pa.RecordBatch.from_pydict(columns) for columns in interactions.batches())
    first = next(batches)
    empty = datasets.Dataset(pa.Table.from_batches([first.slice(0, 0)]))
    empty.save_to_disk(str(target))
    schema = empty.data.schema
    data_file = target / "data-00000-of-00001.arrow"
    hasher = hashlib.sha256()
    with pa.ipc.new_stream(str(data_file), schema) as writer:
        for batch in itertools.chain([first], batches):
            writer.write_batch(batch.cast(schema))
            hasher.update(batch.column(0).buffers()[1])
    state_path = target / "state.json"
    state = json.loads(state_path.read_text())
    state["_data_files"] = [{"filename": data_file.name}]
    state["_fingerprint"] = hasher.hexdigest()[:16]  # names the dataset's caches: distinct per content
    state_path.write_text(json.dumps(state, indent=2, sort_keys=True))


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
