"""`onerec data`: raw files -> validated, dense-id Arrow tables in <out>/data/.

The format readers live in onerec/data (sources.py picks one by data.format); the layout of
the output directory is described in onerec/data/prepared.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets

from onerec.config import RootConfig
from onerec.data.build import build_tables
from onerec.data.errors import BadRows
from onerec.data.prepared import write_prepared
from onerec.data.sources import load_raw
from onerec.logging import progress_disabled
from onerec.paths import RunPaths

log = logging.getLogger("onerec.data")


def main(cfg: RootConfig) -> Path:
    if progress_disabled():
        datasets.disable_progress_bars()
    bad = BadRows(cfg.data.on_bad_rows)
    raw = load_raw(cfg.data, bad)
    tables = build_tables(raw, cfg.data, bad)
    bad.log_summary()
    target = write_prepared(tables, RunPaths.of(cfg.run.out_dir).data)
    meta = tables.meta
    log.info("data: %d users, %d items, %d interactions -> %s", meta["users"], meta["items"], meta["interactions"], target)
    return target
