"""What an IPA run keeps under <out>/dpo so that a killed job resumes where it stopped:

    dpo/rounds.json                  {"fingerprint": ...}: the config and inputs the rounds
                                     below were made from (the dpo stage's provenance fingerprint)
    dpo/round_0/round.json           the pretrained model's held-out evaluation
    dpo/round_<k>/pairs.safetensors  round k's sampled pairs (onerec/align/pairs.py), written
                                     before training on them
    dpo/round_<k>/checkpoints/       the round's DPO training checkpoints (the Trainer's)
    dpo/round_<k>/policy.safetensors the policy after round k (full weights, with manifest)
    dpo/round_<k>/round.json         the round's evaluation and statistics, written last:
                                     its presence means the round is finished

On a restart with train.resume != none (the launchers pass auto) a finished round is read
back, not rerun; a round with pairs but no round.json loads them and resumes its training
from its newest checkpoint; a round without pairs samples them (deterministically). Round
directories made from another config or other inputs (another fingerprint), or any at all
when train.resume=none, are moved aside whole to dpo/rounds.superseded-<their fingerprint>/,
never deleted and never mixed with this run's.

Every file is written by rank 0 through a temporary file and a rename.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

from onerec.logging import write_json_atomic

log = logging.getLogger("onerec.dpo")

ROUNDS_FILE = "rounds.json"
ROUND_FILE = "round.json"
POLICY_FILE = "policy.safetensors"


def round_dir(dpo_dir: Path, round_index: int) -> Path:
    return dpo_dir / f"round_{round_index}"


def read_round(dpo_dir: Path, round_index: int) -> Optional[dict]:
    """A finished round's record, or None when the round has not finished."""
    path = round_dir(dpo_dir, round_index) / ROUND_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def write_round(dpo_dir: Path, round_index: int, record: dict) -> None:
    write_json_atomic(round_dir(dpo_dir, round_index) / ROUND_FILE, record)


def _round_dirs(dpo_dir: Path) -> list[Path]:
    return sorted(p for p in dpo_dir.glob("round_*") if p.is_dir()) if dpo_dir.is_dir() else []


def prepare_rounds(dpo_dir: Path, fingerprint: str, resume: bool) -> bool:
    """Rank 0, before any round: keep the round directories when `resume` and they were made
    from `fingerprint`, else move them aside; record the fingerprint. True when rounds are kept."""
    dpo_dir.mkdir(parents=True, exist_ok=True)
    rounds_file = dpo_dir / ROUNDS_FILE
    previous = json.loads(rounds_file.read_text(encoding="utf-8")).get("fingerprint", "") if rounds_file.is_file() else ""
    existing = _round_dirs(dpo_dir)
    keep = resume and previous == fingerprint
    if existing and not keep:
        target = dpo_dir / f"rounds.superseded-{(previous or 'unknown')[:16]}"
        n = 1
        while target.exists():
            n += 1
            target = dpo_dir / f"rounds.superseded-{(previous or 'unknown')[:16]}.{n}"
        target.mkdir()
        for path in existing:
            os.rename(path, target / path.name)
        why = "train.resume=none" if not resume else "they were made from another config or other inputs"
        log.warning("moved %d earlier round directories aside to %s (%s)", len(existing), target, why)
    write_json_atomic(rounds_file, {"fingerprint": fingerprint})
    return keep and bool(existing)
