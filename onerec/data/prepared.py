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
import numpy as np
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
    sequences = _read_sequences(interactions, meta)
    return PreparedData(items, interactions, sequences, meta)


def _interaction_batches(interactions: datasets.Dataset, columns: list[str]):
    """The table's record batches, read from its Arrow files as a stream (not memory-mapped:
    mapped pages that were read stay in the process's resident memory until it ends)."""
    files = [entry["filename"] for entry in interactions.cache_files]
    if not files:  # a dataset held in memory
        yield from interactions.data.select(columns).to_batches()
        return
    for path in files:
        with pa.OSFile(path) as handle:
            for batch in pa.ipc.open_stream(handle):
                yield batch.select(columns)


def _read_sequences(interactions: datasets.Dataset, meta: dict) -> UserSequences:
    """Users' items and orders in CSR form, filled a record batch at a time into one array
    each: 16 bytes per interaction, without a whole int64 user column or concatenated copies.
    With a sequence_column (KuaiRand) only interactions with a positive value there count."""
    signal = meta.get("sequence_column")
    columns = ["user_index", "item_index", "order"] + ([signal] if signal else [])
    rows = interactions.num_rows
    items, orders = np.empty(rows, dtype=np.int64), np.empty(rows, dtype=np.int64)  # pages touched only as filled
    counts = np.zeros(meta["users"], dtype=np.int64)
    filled = 0
    for batch in _interaction_batches(interactions, columns):
        user, item, order = (batch.column(name).to_numpy() for name in columns[:3])
        if signal:
            positive = batch.column(signal).to_numpy() > 0
            user, item, order = user[positive], item[positive], order[positive]
        counts += np.bincount(user, minlength=len(counts))
        items[filled : filled + len(item)] = item
        orders[filled : filled + len(order)] = order
        filled += len(item)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return UserSequences(offsets, items[:filled], orders[:filled], has_time=meta["has_time"])
