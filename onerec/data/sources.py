"""Which reader turns `data.root` into a RawLog, by `data.format`.

    movielens   ML-100K (fetched into data.cache_dir when data.root is empty)
    amazon2014  the P5 / S3-Rec / TIGER sequence files (sequences.txt + items.jsonl)
    amazon2018  the LC-Rec / LETTER files
    kuairand    KuaiRand logs with watch/like/follow signals
    generic     your own interactions/items files (see docs/data.md)
"""

from __future__ import annotations

from pathlib import Path

from onerec.config import DataConfig
from onerec.data.amazon import load_amazon2014, load_amazon2018
from onerec.data.errors import BadRows
from onerec.data.fetch import fetch_movielens
from onerec.data.generic import load_generic
from onerec.data.kuairand import load_kuairand
from onerec.data.movielens import load_movielens
from onerec.data.schema import RawLog


def load_raw(cfg: DataConfig, bad: BadRows) -> RawLog:
    if cfg.format in ("csv", "parquet"):
        return load_generic(cfg, bad)  # data.root may be empty, a folder or a URL: see files.py
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
    return load_kuairand(root, bad)
