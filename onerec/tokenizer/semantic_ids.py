"""Semantic IDs: one code tuple per item, a dedup level that makes every tuple unique,
and the codebook statistics that tell whether the quantiser used its codes well.

Shape legend: N items, L code levels.

    item i -> (c_1, ..., c_L_sem, dedup)     dedup numbers the items sharing (c_1..c_L_sem): 0, 1, 2, ...
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CODES_FILE = "codes.safetensors"
META_FILE = "semantic_ids.json"


@dataclass
class SemanticIds:
    codes: torch.Tensor  # [N, L] int64; row i is item_index i; L includes the dedup level when present
    codebook_sizes: list[int]
    semantic_levels: int  # levels before dedup
    stats: dict = field(default_factory=dict)

    def save(self, directory: Path) -> None:
        """Write atomically: a temporary sibling directory renamed into place."""
        directory = Path(directory)
        tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({"codes": self.codes.contiguous()}, str(tmp / CODES_FILE))
        meta = {"codebook_sizes": self.codebook_sizes, "semantic_levels": self.semantic_levels, "stats": self.stats}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        keep = directory / "cache"
        if keep.is_dir():  # the embedding cache survives a re-run
            shutil.move(str(keep), str(tmp / "cache"))
        if directory.exists():
            shutil.rmtree(directory)
        os.rename(tmp, directory)

    @classmethod
    def load(cls, directory: Path) -> "SemanticIds":
        directory = Path(directory)
        if not (directory / META_FILE).is_file():
            raise FileNotFoundError(f"{directory}: no {META_FILE}; run `onerec tokenize` first")
        meta = json.loads((directory / META_FILE).read_text())
        codes = load_file(str(directory / CODES_FILE))["codes"]
        return cls(codes, list(meta["codebook_sizes"]), int(meta["semantic_levels"]), meta.get("stats", {}))


def add_dedup_level(codes_NL: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Append a level numbering the items that share a tuple (0, 1, ... in item order).

    Returns (codes_N(L+1), dedup_size) where dedup_size = the largest group (>= 1).
    """
    codes = codes_NL.cpu().numpy()
    _, group_N, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    group_N = group_N.reshape(-1)
    order = np.argsort(group_N, kind="stable")
    first_in_group = np.concatenate([[0], np.cumsum(counts)[:-1]])
    dedup = np.empty(len(codes), dtype=np.int64)
    dedup[order] = np.arange(len(codes)) - first_in_group[group_N[order]]
    out = torch.cat([codes_NL.cpu(), torch.from_numpy(dedup).unsqueeze(1)], dim=1)
    return out, int(counts.max())


def codebook_stats(codes_NL: torch.Tensor, codebook_sizes: list[int]) -> dict:
    """Per level: utilisation (used codes / size), entropy (bits) and perplexity of code usage.

    collision_rate_before_dedup: share of items whose full tuple is shared with at least
    one other item (0 = the quantiser alone already identifies every item).
    """
    codes = codes_NL.cpu().numpy()
    per_level = []
    for level, size in enumerate(codebook_sizes):
        counts = np.bincount(codes[:, level], minlength=size)
        p = counts[counts > 0] / counts.sum()
        entropy = float(-(p * np.log2(p)).sum())
        per_level.append(
            {"utilization": float((counts > 0).sum() / size), "entropy": entropy, "perplexity": float(2**entropy)}
        )
    _, counts = np.unique(codes, axis=0, return_counts=True)
    collided = int(counts[counts > 1].sum())
    return {
        "per_level": per_level,
        "collision_rate_before_dedup": collided / len(codes),
        "max_items_per_tuple": int(counts.max()),
        "unique_tuples": int(len(counts)),
        "max_entropy_bits": [math.log2(s) for s in codebook_sizes],
    }
