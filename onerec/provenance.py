"""Provenance: what each stage's output was made from, so stale outputs are never used.

When a stage finishes it writes a record:

    <out>/.onerec/provenance/<stage>.json
        {"stage", "fingerprint", "output_id", "upstream": {stage: output_id}, "config": {key: value},
         "raw_files": [...] (data only), "onerec": version, "finished": time}

    fingerprint = sha256(stage, onerec version, the config keys the stage reads,
                         the output_id of every upstream stage it read, [data: the raw files' names,
                         sizes and content digests])
    output_id   = a fresh id for each run of the stage: a downstream stage records the exact
                  output it read, so rerunning a stage (even with the same config) marks what was
                  made from its old output as stale

A stage's output is fresh when its record's fingerprint equals the fingerprint computed now
from the current config and the upstream records. Before a stage runs, every upstream output
it reads must be fresh; otherwise StaleInputError names the first stage to rerun.
`onerec pipeline` reruns exactly the stages that are not fresh, and everything after them.

Keys that cannot change a stage's output are left out (where outputs go, the device, resume,
logging). Outputs written by an older onerec have no record: they are trusted, with a warning.

Raw files count by content, not by modification time: the same data set copied again (a new
mount, a copy without timestamps, a rebuilt image) leaves every run made from it fresh. The
record keeps each file's size and modification time beside its sha256, so a later check hashes
only the files whose size or time moved (as git's index does: an edit that restores both is not
seen). A record written before digests were kept ([path, size, mtime_ns] per file) is compared
as it was made, so a copy with new times still marks it stale.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from onerec import __version__

log = logging.getLogger("onerec.provenance")

RECORD_DIR = Path(".onerec") / "provenance"
LEGACY_OUTPUT = "legacy"  # output_id of an output written before records existed
# Config keys that never change what a stage computes.
IGNORED_KEYS = ("run.out_dir", "run.device", "train.resume", "data.cache_dir")
IGNORED_SECTIONS = ("logging",)
# Keys added after records were first written, at the value that computes what older versions
# did: left out of the fingerprint at that value, so a record written before the key existed
# stays fresh. Any other value counts like every key.
NEUTRAL_DEFAULTS: dict[str, Any] = {
    "sasrec.enabled": True, "sasrec.max_len": 0, "sasrec.crop_prob": 0.0, "sasrec.crop_ratio": 0.6,
    "sasrec.shuffle_prob": 0.0, "sasrec.shuffle_ratio": 0.3,
    "train.item_loss_weight": 0.0, "eval.item_score_weight": 0.0, "model.encoder_block": "transformer",
}
# Sections that change nothing while their switch is off: their keys count only when it is on.
SWITCHED_SECTIONS = {"sasrec_pp": "enabled", "hstu": "enabled"}
MAX_RAW_FILES = 10_000  # a data.root with more files is fingerprinted by its first 10,000 names


@dataclass
class Record:
    stage: str
    fingerprint: str
    output_id: str
    upstream: dict[str, str]
    config: dict[str, Any]
    raw_files: list = field(default_factory=list)
    onerec: str = __version__
    finished: str = ""


def record_path(root: Path, stage: str) -> Path:
    return Path(root) / RECORD_DIR / f"{stage}.json"


def read_record(root: Path, stage: str) -> Optional[Record]:
    path = record_path(root, stage)
    if not path.is_file():
        return None
    return Record(**json.loads(path.read_text(encoding="utf-8")))


def write_record(root: Path, record: Record) -> None:
    path = record_path(root, record.stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(asdict(record), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def config_subset(config: dict, sections: tuple[str, ...]) -> dict[str, Any]:
    """The flattened `section.key` values of `config` under `sections` (a section or one key)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}", inner)
        else:
            flat[prefix] = value

    for section in sections:
        switch = SWITCHED_SECTIONS.get(section)
        if switch is not None and not config.get(section, {}).get(switch, False):
            continue
        value: Any = config
        for part in section.split("."):
            value = value[part]
        walk(section, value)
    return {
        key: value for key, value in sorted(flat.items())
        if key not in IGNORED_KEYS and key.split(".")[0] not in IGNORED_SECTIONS
        and not (key in NEUTRAL_DEFAULTS and value == NEUTRAL_DEFAULTS[key])
    }


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (raw logs can be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def raw_file_listing(data_root: str, known: Optional[list] = None, digests: bool = True) -> list[list]:
    """[relative path, size, mtime_ns, sha256] of the files under data.root, sorted by path.

    known: the listing of an earlier record; a file whose path, size and mtime_ns it shares
    keeps that digest instead of being read again. digests=False gives [path, size, mtime_ns]
    entries, the form of records written before digests were kept."""
    if not data_root:
        return []
    root = Path(data_root)
    if root.is_file():
        files = [(root.name, root)]
    else:
        files = [(path.relative_to(root).as_posix(), path) for path in sorted(root.rglob("*")) if path.is_file()]
        files = files[:MAX_RAW_FILES]
    recorded = {tuple(entry[:3]): entry[3] for entry in known or () if len(entry) == 4}
    listing = []
    for name, path in files:
        stat = path.stat()
        entry = [name, stat.st_size, stat.st_mtime_ns]
        if digests:
            entry.append(recorded.get(tuple(entry)) or file_digest(path))
        listing.append(entry)
    return listing


def has_digests(raw_files: list) -> bool:
    """Whether a listing names each file by content (False only for records older than digests)."""
    return all(len(entry) == 4 for entry in raw_files)


def raw_file_identity(raw_files: list) -> list:
    """What the fingerprint holds of a listing: [path, size, sha256], or the old entries whole."""
    return [[entry[0], entry[1], entry[3]] if len(entry) == 4 else entry for entry in raw_files]


def fingerprint(stage: str, config: dict[str, Any], upstream: dict[str, str], raw_files: list) -> str:
    payload = {
        "stage": stage, "onerec": __version__, "config": config, "upstream": upstream,
        "raw_files": raw_file_identity(raw_files),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def new_record(stage: str, config: dict[str, Any], upstream: dict[str, str], raw_files: list) -> Record:
    return Record(
        stage=stage,
        fingerprint=fingerprint(stage, config, upstream, raw_files),
        output_id=uuid.uuid4().hex,
        upstream=upstream,
        config=config,
        raw_files=raw_files,
        finished=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
