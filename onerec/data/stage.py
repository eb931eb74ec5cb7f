"""Stage `data`: raw files -> validated, dense-id Arrow tables in <out>/data/.

    data/items/         item_index, raw_id, title, text (+ features) (HF datasets, save_to_disk)
    data/interactions/  user_index, item_index, order, feedback (sorted by user, then time)
    data/users/         user_index, raw_id
    data/meta.json      counts, skipped bad rows by reason, format

Everything is written into a temporary sibling directory and renamed into place only
when complete, so a failed run leaves an earlier good data/ untouched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets

from onerec.config import DataConfig, RootConfig
from onerec.data.amazon import load_amazon2014, load_amazon2018
from onerec.data.build import build_tables
from onerec.data.errors import BadRows
from onerec.data.fetch import fetch_movielens
from onerec.data.generic import load_generic
from onerec.data.kuairand import load_kuairand
from onerec.data.movielens import load_movielens
from onerec.data.schema import RawLog
from onerec.data.splits import UserSequences
from onerec.logging import progress_disabled
from onerec.paths import RunPaths

log = logging.getLogger("onerec.data")


def load_raw(cfg: DataConfig, bad: BadRows) -> RawLog:
    if cfg.format == "movielens" and not cfg.root:
        root = fetch_movielens(Path(cfg.cache_dir))
    elif not cfg.root:
        raise ValueError(f"data.root is empty: point it at the folder with the {cfg.format} files")
    else:
        root = Path(cfg.root)
        if not root.is_dir():
            raise FileNotFoundError(f"data.root={cfg.root}: no such directory")
    if cfg.format == "movielens":
        return load_movielens(root, bad)
    if cfg.format == "amazon2014":
        return load_amazon2014(root, bad)
    if cfg.format == "amazon2018":
        return load_amazon2018(root, bad)
    if cfg.format == "kuairand":
        return load_kuairand(root, bad)
    return load_generic(root, cfg, bad)


def main(cfg: RootConfig) -> Path:
    if progress_disabled():
        datasets.disable_progress_bars()
    paths = RunPaths.of(cfg.run.out_dir)
    bad = BadRows(cfg.data.on_bad_rows)
    raw = load_raw(cfg.data, bad)
    tables = build_tables(raw, cfg.data, bad)
    bad.log_summary()
    target = paths.data
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name in ("items", "interactions", "users"):
            # lists and 2-D arrays (item feature vectors) go in as one list per row
            table = {k: list(v) if isinstance(v, list) or getattr(v, "ndim", 1) > 1 else v
                     for k, v in getattr(tables, name).items()}
            datasets.Dataset.from_dict(table).save_to_disk(str(tmp / name))
        (tmp / "meta.json").write_text(json.dumps(tables.meta, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = tables.meta
    log.info("data: %d users, %d items, %d interactions -> %s", meta["users"], meta["items"], meta["interactions"], target)
    return target


@dataclass
class PreparedData:
    items: datasets.Dataset
    interactions: datasets.Dataset
    sequences: UserSequences
    meta: dict


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
