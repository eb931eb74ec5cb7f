"""The model export: what inference loads, with nothing from training attached.

    export/
        model.safetensors   weights
        config.json         the resolved run config (model shape, data window, eval settings)
        semantic_ids/       the item -> code tuple table (SemanticIds.save)
        items.parquet       item_index, raw_id, title (to print recommendations)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from onerec.checkpoint import load_weights, save_weights
from onerec.config import RootConfig, from_dict, to_dict
from onerec.model.onerec import OneRecModel
from onerec.tokenizer.semantic_ids import SemanticIds
from onerec.tokenizer.trie import Trie, build_trie


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
    """Write an export from a weights file (usually the best validation checkpoint), atomically."""
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = build_model(cfg, semantic_ids)
    load_weights(model, weights)
    save_weights(model, tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n", encoding="utf-8")
    semantic_ids.save(tmp / "semantic_ids")
    table = pa.table(
        {"item_index": pa.array(range(len(raw_ids)), pa.int64()), "raw_id": raw_ids, "title": titles}
    )
    pq.write_table(table, tmp / "items.parquet")
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


def load_export(directory: Path, device: torch.device | str = "cpu") -> ExportedModel:
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a model export (no config.json); point at <run.out_dir>/pretrain/export"
        )
    cfg = from_dict(json.loads(config_path.read_text(encoding="utf-8")))
    semantic_ids = SemanticIds.load(directory / "semantic_ids")
    model = build_model(cfg, semantic_ids)
    load_weights(model, directory / "model.safetensors")
    model.to(device).eval()
    items = pq.read_table(directory / "items.parquet").to_pydict()
    trie = build_trie(semantic_ids.codes, list(semantic_ids.codebook_sizes)).to(device)
    return ExportedModel(model, cfg, semantic_ids, trie, items["raw_id"], items["title"])
