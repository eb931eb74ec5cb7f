"""Read what the stages left in a run directory into plain numbers for the figures and tables.

One loader per input, each returning None when its stage has not run, so the report can say
"not run yet" instead of failing:

    metrics.jsonl            every stage's RunLogger records  -> read_metrics_log, stage_rows
    semantic_ids/            the tokenize stage's codes       -> codebook_usage
    dpo/alignment.json       the IPA rounds                   -> read_alignment
    metrics.json             the evaluate stage's numbers     -> read_json

Shape legend: T logged steps, L MoE layers (expert load) or code levels (codebooks), E experts,
C codebook size, N items.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from onerec.logging import METRICS_LOG
from onerec.paths import RunPaths

log = logging.getLogger("onerec.report")

# The names expert_load_scalars gives the per-expert shares (onerec/logging.py).
_EXPERT_LOAD_KEY = re.compile(r"^moe/load/layer(\d+)/expert(\d+)$")


@dataclass
class StepRow:
    """Everything one stage logged at one step (its training and validation records merged)."""

    step: int
    values: dict[str, Any]


def read_metrics_log(run_dir: Path) -> list[dict]:
    """The records of <run_dir>/metrics.jsonl in file order ([] when there is no such file).

    A truncated last line (a run killed mid-write) is skipped with a warning; a malformed line
    anywhere else means the file was damaged, and that is an error naming the line.
    """
    path = Path(run_dir) / METRICS_LOG
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                log.warning("%s:%d: skipping a truncated last record (%s)", path, number, err)
                continue
            raise ValueError(f"{path}:{number}: not a JSON record ({err})") from err
        if not isinstance(record, dict) or "stage" not in record or "step" not in record:
            raise ValueError(f"{path}:{number}: expected an object with 'stage' and 'step', got {line[:80]!r}")
        records.append(record)
    return records


def stage_rows(records: list[dict], stage: str) -> list[StepRow]:
    """One stage's latest run as rows sorted by step, the records of one step merged.

    metrics.jsonl is appended to by every run into the same directory, so it can hold
    several runs of a stage. The latest one starts at the last record whose step falls back
    to (or below) the step its run started at: a fresh run starts from the beginning, while a
    resumed run continues past it (its re-logged steps then replace the old ones, as later
    records override earlier ones at the same step).
    """
    own = [r for r in records if r["stage"] == stage]
    start = 0
    for i in range(1, len(own)):
        if own[i]["step"] < own[i - 1]["step"] and own[i]["step"] <= own[start]["step"]:
            start = i
    merged: dict[int, dict[str, Any]] = {}
    for record in own[start:]:
        values = merged.setdefault(int(record["step"]), {})
        values.update({k: v for k, v in record.items() if k not in ("stage", "step")})
    return [StepRow(step, merged[step]) for step in sorted(merged)]


def series(rows: list[StepRow], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that have `key` (a scalar curve)."""
    points = [(row.step, float(row.values[key])) for row in rows if _is_number(row.values.get(key))]
    if not points:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    steps, values = zip(*points)
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)


def expert_load_by_step(rows: list[StepRow]) -> tuple[np.ndarray, np.ndarray]:
    """The per-expert load shares as an array: (steps_T, load_TLE).

    load_TLE[t, l, e] is the share of MoE layer l's routed token copies that went to expert
    e at steps_T[t] (`moe/load/layer{l}/expert{e}`); NaN where that step did not log it.
    Only the steps that logged at least one share are kept (validation-only steps are not).
    """
    found: list[tuple[int, dict[tuple[int, int], float]]] = []
    layers = experts = 0
    for row in rows:
        shares = {}
        for key, value in row.values.items():
            match = _EXPERT_LOAD_KEY.match(key)
            if match and _is_number(value):
                layer, expert = int(match.group(1)), int(match.group(2))
                shares[layer, expert] = float(value)
                layers, experts = max(layers, layer + 1), max(experts, expert + 1)
        if shares:
            found.append((row.step, shares))
    load_TLE = np.full((len(found), layers, experts), np.nan)
    for t, (_, shares) in enumerate(found):
        for (layer, expert), share in shares.items():
            load_TLE[t, layer, expert] = share
    return np.asarray([step for step, _ in found], dtype=np.int64), load_TLE


@dataclass
class LevelUsage:
    """How one semantic-ID level uses its codebook."""

    level: int
    codebook_size: int  # C
    items_per_code: np.ndarray  # [C] items whose code at this level is c
    used_fraction: float  # distinct codes used / C
    entropy_bits: float  # of the code usage distribution
    perplexity: float  # 2 ** entropy: the effective number of codes (C when perfectly even)


@dataclass
class CodebookUsage:
    num_items: int
    levels: list[LevelUsage]  # the semantic levels (the dedup level is summarised below)
    unique_tuples: int  # distinct semantic-code tuples
    collision_rate: float  # share of items whose semantic tuple another item shares
    dedup_size: Optional[int]  # codebook size of the dedup level (largest group); None without one


def level_usage(codes_N: np.ndarray, codebook_size: int, level: int = 0) -> LevelUsage:
    """Items per code, used fraction and perplexity of one level (codebook_stats' definitions)."""
    counts_C = np.bincount(codes_N.astype(np.int64), minlength=codebook_size)
    if len(counts_C) > codebook_size:
        raise ValueError(f"level {level}: code {len(counts_C) - 1} is outside its codebook of {codebook_size}")
    p = counts_C[counts_C > 0] / counts_C.sum()
    entropy = float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0
    return LevelUsage(level, codebook_size, counts_C, float((counts_C > 0).mean()), entropy, float(2.0**entropy))


def codebook_usage(run_dir: Path) -> Optional[CodebookUsage]:
    """Per-level code usage of <run_dir>/semantic_ids (None when the tokenize stage has not run)."""
    directory = RunPaths.of(run_dir).semantic_ids
    if not directory.exists():
        return None
    from onerec.tokenizer.semantic_ids import SemanticIds  # torch: loaded only when there are codes

    sid = SemanticIds.load(directory)
    codes_NL = sid.codes.cpu().numpy()
    levels = [level_usage(codes_NL[:, l], sid.codebook_sizes[l], l) for l in range(sid.semantic_levels)]
    _, tuple_counts = np.unique(codes_NL[:, : sid.semantic_levels], axis=0, return_counts=True)
    return CodebookUsage(
        num_items=sid.num_items,
        levels=levels,
        unique_tuples=int(len(tuple_counts)),
        collision_rate=float(tuple_counts[tuple_counts > 1].sum() / sid.num_items),
        dedup_size=sid.codebook_sizes[-1] if codes_NL.shape[1] > sid.semantic_levels else None,
    )


def read_json(path: Path) -> Optional[dict]:
    """A stage's JSON output, or None when the file is not there."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(payload).__name__}")
    return payload


def read_alignment(run_dir: Path) -> Optional[dict]:
    """dpo/alignment.json, or the copy the evaluate stage keeps in metrics.json["alignment"]."""
    paths = RunPaths.of(run_dir)
    source, alignment = paths.dpo / "alignment.json", read_json(paths.dpo / "alignment.json")
    if alignment is None:
        source, alignment = paths.metrics, (read_json(paths.metrics) or {}).get("alignment")
    if alignment is not None and ("pretrain" not in alignment or not isinstance(alignment.get("rounds"), list)):
        raise ValueError(f"{source}: the alignment report needs 'pretrain' and a 'rounds' list")
    return alignment


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
