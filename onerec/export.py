"""The model export: what inference loads, with nothing from training attached.

    export/
        model.safetensors   weights
        config.json         the resolved run config (model shape, data window, eval settings)
        semantic_ids/       the item -> code tuple table (SemanticIds.save)
        items.parquet       item_index, raw_id, title (to print recommendations)
        manifest.json       sha256 and size of every file above (semantic_ids/* included),
                            the same format and code as checkpoint manifests (onerec.checkpoint)

`export_model` reads the source weights through their own manifest, refuses non-finite
weights before writing anything, and writes the manifest last, into a temporary directory
that is renamed into place. `load_export` verifies every file against the manifest and the
weights for NaN/inf before anything uses them: a damaged export is a CorruptFileError naming
the file and what failed (the CLI prints it and exits 2), never an empty recommendation list
or a metrics file computed from garbage.

An export without manifest.json was written before exports carried one. It is loaded with
a warning (unverified, but its weights are still checked finite); `onerec pretrain --resume`
(or `onerec dpo` for dpo/export) with the same run.out_dir rewrites it with a manifest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_model

from onerec.checkpoint import MANIFEST_FILE, check_finite, load_finite_weights, load_weights, verify_files, write_manifest
from onerec.config import RootConfig, from_dict, to_dict
from onerec.errors import CorruptFileError
from onerec.model.onerec import OneRecModel
from onerec.tokenizer.semantic_ids import SemanticIds
from onerec.tokenizer.trie import Trie, build_trie

log = logging.getLogger("onerec.export")

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ITEMS_FILE = "items.parquet"
# Files a manifest must cover for the export to count as verified (semantic_ids/ is listed
# file by file as well).
REQUIRED_FILES = (WEIGHTS_FILE, CONFIG_FILE, ITEMS_FILE)


def build_model(cfg: RootConfig, semantic_ids: SemanticIds) -> OneRecModel:
    return OneRecModel(
        cfg.model,
        codebook_sizes=list(semantic_ids.codebook_sizes),
        max_history=cfg.data.max_history,
        session_len=cfg.data.session_len,
        num_items=int(semantic_ids.codes.shape[0]),
    )


def export_model(
    directory: Path,
    weights: Path,
    cfg: RootConfig,
    semantic_ids: SemanticIds,
    raw_ids: list[str],
    titles: list[str],
) -> Path:
    """Write an export from a weights file (usually the best validation checkpoint), atomically,
    with a manifest of every file; the weights are verified and checked finite first."""
    model = build_model(cfg, semantic_ids)
    load_weights(model, weights)  # its own manifest, and finite values
    # Checked again on what will be written: nothing is written from non-finite weights.
    check_finite(model.state_dict(), f"an export to {directory}", CorruptFileError)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / WEIGHTS_FILE))
    (tmp / CONFIG_FILE).write_text(json.dumps(to_dict(cfg), indent=2) + "\n", encoding="utf-8")
    semantic_ids.save(tmp / "semantic_ids")
    table = pa.table(
        {"item_index": pa.array(range(len(raw_ids)), pa.int64()), "raw_id": raw_ids, "title": titles}
    )
    pq.write_table(table, tmp / ITEMS_FILE)
    names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    write_manifest(tmp / MANIFEST_FILE, tmp, names, kind="export", source=str(weights))
    if directory.exists():
        shutil.rmtree(directory)
    os.rename(tmp, directory)
    return directory


@dataclass
class ExportedModel:
    model: OneRecModel
    cfg: RootConfig
    semantic_ids: SemanticIds
    trie: Trie
    raw_ids: list[str]
    titles: list[str]


def verify_export(directory: Path) -> None:
    """CorruptFileError naming the first file that fails the export's manifest (or a manifest
    that does not cover the export); a warning for an export written before manifests."""
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        log.warning(
            "%s has no %s: written before exports carried checksums, so it is loaded unverified; "
            "`onerec pretrain --resume` (or `onerec dpo`) with the same run.out_dir rewrites it with one",
            directory, MANIFEST_FILE,
        )
        return
    manifest = verify_files(directory, manifest_path)
    unlisted = [name for name in REQUIRED_FILES if name not in manifest.get("files", {})]
    if unlisted:
        raise CorruptFileError(f"{manifest_path}: does not list {', '.join(unlisted)}; the export cannot be verified")


def load_export(directory: Path, device: torch.device | str = "cpu") -> ExportedModel:
    """The export at `directory`, verified against its manifest, with finite weights."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file() and not (directory / MANIFEST_FILE).is_file():
        raise FileNotFoundError(
            f"{directory} is not a model export (no config.json); point at <run.out_dir>/pretrain/export"
        )
    verify_export(directory)
    cfg = from_dict(json.loads(config_path.read_text(encoding="utf-8")))
    semantic_ids = SemanticIds.load(directory / "semantic_ids")
    model = build_model(cfg, semantic_ids)
    load_finite_weights(model, directory / WEIGHTS_FILE)  # verified with the whole export above
    model.to(device).eval()
    items = pq.read_table(directory / ITEMS_FILE).to_pydict()
    trie = build_trie(semantic_ids.codes, list(semantic_ids.codebook_sizes)).to(device)
    return ExportedModel(model, cfg, semantic_ids, trie, items["raw_id"], items["title"])
