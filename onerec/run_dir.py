"""Output safety: onerec writes, replaces and deletes only inside run directories it created.

    <run.out_dir>/
        .onerec-run.json     {"run_id", "created", "onerec"}: written when onerec first uses the
                             directory; a directory without it is not onerec's to change
        data/ semantic_ids/ pretrain/ ...   stage outputs, each replaced only as a whole and
                             only when it carries the stage-output marker below (or, for
                             directories written before markers existed, its layout file)
        <stage output>/.onerec-output.json  {"kind", "run_id"}

Refused before any work, with a message: an empty run.out_dir; the current working directory
(`.`), which would mix run outputs with whatever else lives there; a run.out_dir that is
data.root or a parent of it, where a stage output could replace the raw data; an existing
directory that holds files onerec did not write; a directory the process cannot write to.
A directory laid out by an older onerec (config.yaml or a stage output at the top, no
marker) is adopted: the marker is added and nothing is removed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

from onerec import __version__
from onerec.errors import ConfigError, ResourceError

log = logging.getLogger("onerec.run_dir")

RUN_MARKER = ".onerec-run.json"
OUTPUT_MARKER = ".onerec-output.json"
# Top-level names only onerec writes (an older onerec too): a directory holding one of them
# but no marker is a run to adopt.
LEGACY_LAYOUT = ("config.yaml", "metrics.json", "metrics.jsonl", "data", "semantic_ids", "pretrain", "baselines",
                 ".locks", ".onerec")


def _is_main_process() -> bool:
    """Global rank 0, or a plain process: the one that creates markers in a distributed job."""
    return os.environ.get("RANK", "0") == "0"


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def check_out_dir(out_dir: str, data_root: str = "") -> Path:
    """The resolved run directory, or a ConfigError when writing there could harm other files."""
    if not str(out_dir).strip():
        raise ConfigError("run.out_dir is empty: name a directory for this run's outputs, e.g. run.out_dir=runs/my-run")
    root = Path(out_dir).expanduser().resolve()
    if root == Path.cwd().resolve():
        raise ConfigError(
            f"run.out_dir={out_dir} is the current working directory: give the run a directory of its own "
            "(e.g. run.out_dir=runs/my-run), so its outputs never mix with other files"
        )
    local_root = data_root.removeprefix("file://")
    if local_root and "://" not in local_root:  # a remote data.root (s3://...) cannot be under a local run directory
        raw = Path(local_root).expanduser().resolve()
        if _is_within(raw, root):
            raise ConfigError(
                f"run.out_dir={out_dir} contains data.root={data_root}: stage outputs could replace the raw data; "
                "put the run directory elsewhere (e.g. run.out_dir=runs/my-run)"
            )
    return root


def open_run_dir(out_dir: str, data_root: str = "") -> Optional[str]:
    """Check run.out_dir and mark it as onerec's (creating it if needed); return its run id.

    Only the main process creates or adopts; other ranks of a distributed job return None
    (their rank 0 fails for all of them if the directory is refused).
    """
    root = check_out_dir(out_dir, data_root)
    marker = root / RUN_MARKER
    if not _is_main_process():
        return None
    if marker.is_file():
        _check_writable(root, out_dir)
        return json.loads(marker.read_text(encoding="utf-8"))["run_id"]
    if root.exists() and not root.is_dir():
        raise ConfigError(f"run.out_dir={out_dir} is a file, not a directory")
    if root.is_dir():
        entries = sorted(p.name for p in root.iterdir())
        if entries and not any(name in LEGACY_LAYOUT for name in entries):
            shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
            raise ConfigError(
                f"run.out_dir={out_dir} holds files onerec did not write ({shown}): choose a new or empty "
                "directory, so no stage can replace them"
            )
        if entries:
            log.info("adopting %s, a run directory laid out by an older onerec (nothing is removed)", root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except PermissionError as err:
        raise ResourceError(f"run.out_dir={out_dir}: cannot create it ({err.strerror})") from None
    _check_writable(root, out_dir)
    run_id = uuid.uuid4().hex
    _write_json_exclusive(marker, {
        "run_id": run_id,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "onerec": __version__,
    })
    return json.loads(marker.read_text(encoding="utf-8"))["run_id"]  # another process may have won the race


def _check_writable(root: Path, out_dir: str) -> None:
    """Fail now, not after a stage has spent its compute, when the run directory is read-only."""
    probe = root / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except PermissionError:
        raise ResourceError(
            f"run.out_dir={out_dir} is not writable by this user: fix its permissions or choose another run.out_dir"
        ) from None


def _write_json_exclusive(path: Path, payload: dict) -> None:
    """Create `path` only if it does not exist yet (first writer wins), atomically."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    try:
        os.link(tmp, path)  # fails if `path` exists: never replaces another process's marker
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def replace_directory(staged: Path, target: Path, kind: str, layout_file: str) -> None:
    """Move the complete directory `staged` into place as `target`.

    An existing `target` is replaced only when onerec wrote it (it carries the output marker
    of the same kind, or, written before markers existed, its `layout_file`) or when it is
    empty. Anything else is refused and left as it is.
    """
    staged, target = Path(staged), Path(target)
    (staged / OUTPUT_MARKER).write_text(json.dumps({"kind": kind}) + "\n", encoding="utf-8")
    if target.exists():
        if not (is_onerec_output(target, kind, layout_file) or (target.is_dir() and not any(target.iterdir()))):
            raise ConfigError(
                f"{target} exists and was not written by onerec's {kind} stage: move it away or choose another "
                "run.out_dir; it is left untouched"
            )
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)  # two renames: the window without `target` is tiny
        os.rename(staged, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staged, target)


def is_onerec_output(directory: Path, kind: str, layout_file: str) -> bool:
    marker = directory / OUTPUT_MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text(encoding="utf-8")).get("kind") == kind
        except (ValueError, OSError):
            return False
    return (directory / layout_file).is_file()
