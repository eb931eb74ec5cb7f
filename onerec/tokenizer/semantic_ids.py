"""Semantic IDs: one code tuple per item, a dedup level that makes every tuple unique,
and the codebook statistics that tell whether the quantiser used its codes well.

Shape legend: N items, L code levels.

    item i -> (c_1, ..., c_Ls, dedup)     dedup numbers the items sharing (c_1..c_Ls): 0, 1, 2, ...
                                          (TIGER appends such a code; OneRec's balanced k-means
                                          keeps the groups small)

On disk (`SemanticIds.save`):
    <dir>/codes.safetensors    {"codes": [N, L] int64}
    <dir>/semantic_ids.json    {"codebook_sizes", "semantic_levels", "stats"}
    <dir>/manifest.json        sha256 and size of both, verified by `SemanticIds.load`
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from onerec.checkpoint import verify_files, write_manifest
from onerec.errors import CorruptFileError
from onerec.run_dir import is_onerec_output, replace_directory

log = logging.getLogger("onerec.tokenizer")

CODES_FILE = "codes.safetensors"
META_FILE = "semantic_ids.json"
OUTPUT_KIND = "semantic_ids"
MANIFEST_FILE = "manifest.json"
CACHE_DIR = "cache"  # the tokenize stage's embedding cache lives here and survives a re-save


def _check_codes(codes_NL: torch.Tensor) -> None:
    if codes_NL.dim() != 2 or codes_NL.shape[0] == 0 or codes_NL.shape[1] == 0:
        raise ValueError(f"expected codes of shape [N, L] with N, L >= 1, got {tuple(codes_NL.shape)}")
    if codes_NL.is_floating_point() or codes_NL.dtype == torch.bool:
        raise ValueError(f"expected integer codes, got {codes_NL.dtype}")


@dataclass
class SemanticIds:
    codes: torch.Tensor  # [N, L] int64; row i is item_index i; L includes the dedup level when present
    codebook_sizes: list[int]  # per level; the dedup level's size = the most items sharing one prefix
    semantic_levels: int  # levels before dedup
    stats: dict = field(default_factory=dict)  # codebook_stats of the pre-dedup codes

    def __post_init__(self) -> None:
        _check_codes(self.codes)
        L = self.codes.shape[1]
        if len(self.codebook_sizes) != L:
            raise ValueError(f"{len(self.codebook_sizes)} codebook sizes for codes with {L} levels")
        if not 1 <= self.semantic_levels <= L:
            raise ValueError(f"semantic_levels={self.semantic_levels}: expected 1..{L}")

    @property
    def num_items(self) -> int:
        return int(self.codes.shape[0])

    def save(self, directory: Path) -> None:
        """Write atomically: a temporary sibling directory renamed into place."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({"codes": self.codes.to(torch.int64).cpu().contiguous()}, str(tmp / CODES_FILE))
        meta = {
            "codebook_sizes": [int(s) for s in self.codebook_sizes],
            "semantic_levels": int(self.semantic_levels),
            "stats": self.stats,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        # Checked on load: a damaged or edited codes file would otherwise train and score a
        # model on the wrong items without a word.
        write_manifest(tmp / MANIFEST_FILE, tmp, [CODES_FILE, META_FILE])
        keep = directory / CACHE_DIR
        try:
            # The embedding cache survives a re-run; it is moved only out of a directory that
            # is ours (a previous output, or one holding nothing but the cache just written).
            if keep.is_dir() and (is_onerec_output(directory, OUTPUT_KIND, META_FILE)
                                  or {p.name for p in directory.iterdir()} == {CACHE_DIR}):
                shutil.move(str(keep), str(tmp / CACHE_DIR))
            replace_directory(tmp, directory, OUTPUT_KIND, META_FILE)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, directory: Path) -> "SemanticIds":
        directory = Path(directory)
        if not (directory / META_FILE).is_file() or not (directory / CODES_FILE).is_file():
            raise FileNotFoundError(f"{directory}: no {META_FILE} / {CODES_FILE}; run `onerec tokenize` first")
        if (directory / MANIFEST_FILE).is_file():
            verify_files(directory, directory / MANIFEST_FILE)
        else:
            log.warning("%s has no %s (written by an older onerec): its codes are not verified; "
                        "rerun `onerec tokenize` to add one", directory, MANIFEST_FILE)
        try:
            meta = json.loads((directory / META_FILE).read_text())
            codes = load_file(str(directory / CODES_FILE))["codes"]
            return cls(codes, [int(s) for s in meta["codebook_sizes"]], int(meta["semantic_levels"]), meta.get("stats", {}))
        except (SafetensorError, ValueError, KeyError, TypeError) as err:
            raise CorruptFileError(f"{directory}: unreadable semantic IDs ({err}); rerun `onerec tokenize`") from None


def add_dedup_level(codes_NL: torch.Tensor, priority_N: np.ndarray | torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Append a level numbering the items that share a tuple: 0, 1, ... inside each group.

    priority_N (e.g. training popularity) decides the order inside a group: the highest
    priority gets 0, ties (and priority_N=None) in item order. The idea: in item order the
    dedup code is an arbitrary label per group; by popularity, code 0 means "the most taken
    item of this tuple" everywhere. (On Amazon Beauty the two tie on validation: conditioned
    on the tuple, the decoder learns each group's favourite either way.)

    Returns (codes_N(L+1) int64, dedup_size) where dedup_size = the largest group (>= 1),
    i.e. the codebook size the dedup level needs.
    """
    _check_codes(codes_NL)
    codes = codes_NL.cpu().numpy().astype(np.int64)
    _, group_N, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    group_N = group_N.reshape(-1)
    if priority_N is None:
        priority_N = np.zeros(len(codes))
    priority_N = np.asarray(priority_N, dtype=np.float64)
    if priority_N.shape != (len(codes),):
        raise ValueError(f"priority_N must be [N]={len(codes)}, got shape {priority_N.shape}")
    # Sort by (group, -priority, item index); rank in group = position - group start.
    order = np.lexsort((np.arange(len(codes)), -priority_N, group_N))
    group_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    dedup_N = np.empty(len(codes), dtype=np.int64)
    dedup_N[order] = np.arange(len(codes)) - group_start[group_N[order]]
    out_NL = torch.from_numpy(np.concatenate([codes, dedup_N[:, None]], axis=1))
    return out_NL, int(counts.max())


def codebook_stats(codes_NL: torch.Tensor, codebook_sizes: list[int]) -> dict:
    """Statistics of the semantic (pre-dedup) codes.

    per_level[l]: utilization = distinct codes used / codebook size; entropy (bits) of the
        code usage distribution; perplexity = 2 ** entropy (the effective number of codes).
    collision_rate_before_dedup: fraction of items whose full tuple is shared with at least
        one other item (0 = the quantiser alone already tells every item apart).
    max_items_per_tuple: the largest group of items sharing one tuple (the dedup size).
    unique_tuples, max_entropy_bits (log2 of each codebook size): for reading the above.
    """
    _check_codes(codes_NL)
    codes = codes_NL.cpu().numpy().astype(np.int64)
    if len(codebook_sizes) != codes.shape[1]:
        raise ValueError(f"{len(codebook_sizes)} codebook sizes for codes with {codes.shape[1]} levels")
    if (codes < 0).any() or (codes >= np.asarray(codebook_sizes)).any():
        raise ValueError(f"codes must lie in [0, codebook_size) at every level; sizes {list(codebook_sizes)}")
    per_level = []
    for level, size in enumerate(codebook_sizes):
        counts = np.bincount(codes[:, level], minlength=size)
        p = counts[counts > 0] / counts.sum()
        entropy = float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0
        per_level.append(
            {"utilization": float((counts > 0).sum() / size), "entropy": entropy, "perplexity": float(2.0**entropy)}
        )
    _, tuple_counts = np.unique(codes, axis=0, return_counts=True)
    collided = int(tuple_counts[tuple_counts > 1].sum())
    return {
        "per_level": per_level,
        "collision_rate_before_dedup": collided / len(codes),
        "max_items_per_tuple": int(tuple_counts.max()),
        "unique_tuples": int(len(tuple_counts)),
        "max_entropy_bits": [math.log2(s) for s in codebook_sizes],
    }
