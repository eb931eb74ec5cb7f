"""Resumable training checkpoints and verified weights files, written atomically, loaded
without unpickling.

A checkpoint is a directory:

    checkpoints/step_00000500/
        model.safetensors       model weights, always the full model (an expert-parallel run
                                gathers every rank's experts first)
        train_state.pt          scheduler, progress, world size and global batch, RNG states
                                and, when every rank holds the same optimizer state, the
                                optimizer: only tensors and plain Python values, so it loads
                                with torch.load(weights_only=True)
        optimizer_rank00000.pt  one per rank when the optimizer state is sharded (ZeRO 1/2
        optimizer_rank00001.pt  partitions, or experts sharded by expert parallelism)
        manifest.json           step, run_id, seq (write order), sha256 and size of each
                                file, the resolved config

The optimizer state, in train_state.pt or the per-rank files, is kept by parameter name as
fragments of the whole parameters (onerec/distributed/optimizer_state.py), so a checkpoint
written by N ranks loads on M ranks: every rank reads all per-rank files (read_rank_states)
and takes what its own layout holds. Per-rank files of checkpoints written before that hold
torch's optimizer state_dict of their rank and load on the same number of ranks only
(load_rank_state).

It is staged in a hidden temporary directory and renamed into place, so a crash (even a
SIGKILL) never leaves a half-written `step_*` directory. With per-rank files every rank
writes its own file into the staging directory (which must then be on a filesystem all
ranks share, as resuming needs anyway) and rank 0 seals it with the manifest and the rename.
The manifest's sizes and checksums catch a file that was damaged afterwards (say, truncated
by a full disk or a partial copy), and `resolve_resume("auto")` falls back to the previous
checkpoint. Weights with a NaN/inf in them are refused: a checkpoint is never written from
a poisoned state, and one that holds them is never loaded.

Ownership. Every checkpoint records the id of the training run that wrote it and a write
sequence number (one more than the highest in the directory), because step numbers say
nothing about which run came last: a copied run directory, or a run restarted from scratch,
holds another run's higher steps.
- A fresh run (nothing to resume) moves every checkpoint of another run aside, whole, to
  `<stage_dir>/checkpoints.superseded-<their run id>/` (`unknown` for checkpoints written
  before runs had ids) and logs which; the trainer moves that run's `best/` there too.
- Retention keeps the newest `keep` checkpoints by write order of the current run only;
  another run's checkpoint is never deleted (one in the way of a new one is moved aside).
- `resolve_resume("auto")` resumes the run that wrote last (the highest sequence number)
  from its newest checkpoint that verifies; older runs' checkpoints are never continued
  silently (resume one by naming its directory). If none of that run's checkpoints
  verifies, training starts afresh, which moves them aside.

Weights files (best-so-far weights, the reward model, aligned weights, baselines) carry a
sidecar manifest in the same format, listing that one file:

    best/model.safetensors
    best/model.safetensors.manifest.json   {"files": {name: sha256}, "sizes": {name: bytes},
                                            plus what the writer adds: run_id, step, ...}

`load_weights` verifies the file against it (CorruptFileError naming the file and what
failed) and refuses non-finite values; `save_weights` refuses to write non-finite weights.
A weights file without a manifest was written before weights carried one: it is loaded
with a warning (its values are still checked finite), and rerunning the stage that wrote
it adds the manifest. Model exports (onerec.export) use the same manifest code for their
whole directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from onerec.errors import CorruptFileError
from onerec.logging import write_json_atomic
from onerec.provenance import file_digest

log = logging.getLogger("onerec.checkpoint")

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
MANIFEST_FILE = "manifest.json"
RANK_STATE_FILE = "optimizer_rank{rank:05d}.pt"
WEIGHTS_MANIFEST_SUFFIX = ".manifest.json"
SUPERSEDED = "superseded"
UNKNOWN_RUN = "unknown"  # the run id of checkpoints written before runs had ids
# Run ids are uuid4 hex strings; anything else read from a manifest is never put in a path.
_RUN_ID = re.compile(r"[0-9a-f]{32}")


class CheckpointError(CorruptFileError, RuntimeError):
    """A checkpoint that is missing, incomplete or fails its checksum (RuntimeError: what
    callers caught before user errors had a common base)."""


# ------------------------------------------------------------------ manifests
def manifest_entries(files: Mapping[str, Path]) -> dict[str, dict[str, Any]]:
    """{"files": {name: sha256}, "sizes": {name: bytes}} of `files` (name -> the file now).

    The name is what the file is called where the manifest is read (a file may be hashed
    under a temporary name before it is renamed into place).
    """
    return {
        "files": {name: file_digest(path) for name, path in files.items()},
        "sizes": {name: path.stat().st_size for name, path in files.items()},
    }


def write_manifest(manifest_path: Path, directory: Path, names: Iterable[str], **fields: Any) -> dict:
    """Write (atomically) the manifest of the files `names` under `directory`, plus `fields`."""
    manifest = {**fields, **manifest_entries({name: directory / name for name in names})}
    write_json_atomic(manifest_path, manifest)
    return manifest


def read_manifest(manifest_path: Path, error: type[Exception] = CorruptFileError) -> dict:
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{manifest_path}: unreadable manifest ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise error(f"{manifest_path}: unreadable manifest (not a manifest object)")
    return manifest


def verify_files(directory: Path, manifest_path: Path, error: type[Exception] = CorruptFileError) -> dict:
    """Check every file the manifest lists (present, same size, same sha256); return the
    manifest, or raise `error` naming the first file that fails and how."""
    manifest = read_manifest(manifest_path, error)
    sizes = manifest.get("sizes", {})  # absent in checkpoints written before sizes were recorded
    for name, expected in manifest.get("files", {}).items():
        file_path = directory / name
        if not file_path.is_file():
            raise error(f"{file_path}: missing")
        size = file_path.stat().st_size
        if name in sizes and size != sizes[name]:
            raise error(f"{file_path}: truncated or corrupted file ({size} bytes, expected {sizes[name]})")
        if file_digest(file_path) != expected:
            raise error(f"{file_path}: checksum mismatch (truncated or corrupted file)")
    return manifest


def _non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    return [name for name, tensor in tensors
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def check_finite(weights: dict[str, torch.Tensor], what: str, error: type[Exception] = CheckpointError) -> None:
    """`error` naming the first non-finite tensors (call it on every rank: all see the same weights)."""
    bad = _non_finite(weights.items())
    if bad:
        raise error(f"refusing to write {what}: non-finite values in {', '.join(bad[:5])}")


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path))


# ---------------------------------------------------------------- checkpoints
def _step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_state_file(rank: int) -> str:
    return RANK_STATE_FILE.format(rank=rank)


def staging_dir(directory: Path, step: int) -> Path:
    """Where checkpoint `step` is assembled; every rank derives the same name."""
    return directory / f".tmp-{_step_dir_name(step)}"


def begin_checkpoint(directory: Path, step: int) -> Path:
    """Rank 0: an empty staging directory for checkpoint `step` (stale ones removed)."""
    directory.mkdir(parents=True, exist_ok=True)
    # One checkpoint is staged at a time, so any other staging directory was left by a
    # writer that was killed mid-save.
    for stale in directory.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = staging_dir(directory, step)
    staging.mkdir()
    return staging


def write_rank_state(staging: Path, rank: int, state: dict[str, Any]) -> None:
    """Every rank: its own share of the train state (tensors and plain values only)."""
    torch.save(state, staging / rank_state_file(rank))


def finish_checkpoint(
    staging: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    config: dict,
    keep: int,
    rank_files: int = 0,
    *,
    run_id: str,
) -> Path:
    """Rank 0: write weights, train state and manifest into `staging`, rename it into place,
    keep only the newest `keep` checkpoints of run `run_id` (by write order). `rank_files`
    per-rank files must already be there, and every rank must have run check_finite on the
    weights (so all of them stop together)."""
    missing = [rank_state_file(r) for r in range(rank_files) if not (staging / rank_state_file(r)).is_file()]
    if missing:
        raise CheckpointError(
            f"{staging}: {', '.join(missing[:3])} not written: every rank must see the checkpoint "
            "directory (put train checkpoints on a filesystem shared by all nodes)"
        )
    directory = staging.parent
    _save_tensors(weights, staging / MODEL_FILE)
    torch.save(train_state, staging / STATE_FILE)
    names = (MODEL_FILE, STATE_FILE, *(rank_state_file(r) for r in range(rank_files)))
    write_manifest(
        staging / MANIFEST_FILE, staging, names,
        step=step, run_id=run_id, seq=next_write_seq(directory), rank_files=rank_files, config=config,
    )
    final = directory / _step_dir_name(step)
    if final.exists():
        owner = checkpoint_info(final).run_id
        if owner == run_id:  # re-saving the same step of this run (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        else:  # another run's checkpoint is in the way: keep it, out of this run's directory
            moved = set_aside(final, directory, owner)
            log.warning("%s belonged to run %s; moved it aside to %s", final, owner or UNKNOWN_RUN, moved)
    os.rename(staging, final)
    mine = [info for info in checkpoints_by_write_order(directory) if info.run_id == run_id]
    for old in mine[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoint directories by step, lowest first (temporary ones are ignored)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step_"))


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    run_id: str  # "" when the manifest predates run ids or cannot be read
    seq: int  # write order within its directory; -1 when unknown (sorts first: oldest)


def checkpoint_info(path: Path) -> CheckpointInfo:
    """Who wrote the checkpoint and when, from its manifest (tolerant: nothing is verified here)."""
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
        run_id, seq = manifest.get("run_id", ""), manifest.get("seq", -1)
    except (OSError, ValueError, AttributeError):
        return CheckpointInfo(path, "", -1)
    return CheckpointInfo(path, run_id if isinstance(run_id, str) else "", seq if isinstance(seq, int) else -1)


def checkpoints_by_write_order(directory: Path) -> list[CheckpointInfo]:
    """Every checkpoint directory, oldest written first (by step among those with no sequence number)."""
    return sorted((checkpoint_info(p) for p in list_checkpoints(directory)), key=lambda i: (i.seq, i.path.name))


def next_write_seq(directory: Path) -> int:
    return 1 + max((info.seq for info in checkpoints_by_write_order(directory)), default=0)


def superseded_name(run_id: str) -> str:
    """The directory name suffix for another run's files: its id, `unknown` when it has none."""
    return f"{SUPERSEDED}-{run_id if _RUN_ID.fullmatch(run_id or '') else UNKNOWN_RUN}"


def set_aside(path: Path, directory: Path, run_id: str) -> Path:
    """Move `path` (a checkpoint, or a run's best/ directory) whole into
    `<directory>.superseded-<run_id>/`, next to `directory`; return where it went. A name
    already taken there (the same run set aside twice) goes to `...superseded-<id>.2/` etc."""
    base = directory.with_name(f"{directory.name}.{superseded_name(run_id)}")
    target, n = base, 1
    while (target / path.name).exists():
        n += 1
        target = base.with_name(f"{base.name}.{n}")
    target.mkdir(parents=True, exist_ok=True)
    os.rename(path, target / path.name)
    return target / path.name


def set_aside_other_runs(directory: Path, run_id: str) -> dict[str, list[Path]]:
    """Move every checkpoint in `directory` not written by `run_id` aside (see set_aside);
    return {their run id: where they went} and log each run's move."""
    moved: dict[str, list[Path]] = {}
    for info in checkpoints_by_write_order(directory):
        if info.run_id != run_id:
            moved.setdefault(info.run_id, []).append(set_aside(info.path, directory, info.run_id))
    for other, paths in moved.items():
        log.warning(
            "%s held %d checkpoint(s) of another run (%s: %s); moved them aside to %s",
            directory, len(paths), other or "written before runs had ids", ", ".join(p.name for p in paths),
            paths[0].parent,
        )
    return moved


def verify_checkpoint(path: Path) -> dict:
    """Return the manifest if every file is present and matches its checksum, else raise CheckpointError."""
    if not (path / MANIFEST_FILE).is_file():
        raise CheckpointError(f"{path}: no {MANIFEST_FILE} (incomplete checkpoint)")
    return verify_files(path, path / MANIFEST_FILE, CheckpointError)


def resolve_resume(resume: str, directory: Path) -> Optional[Path]:
    """`none` or `` -> None; else that path (verified); `auto` -> the newest checkpoint that
    verifies of the run that wrote last (warning about any skipped), or None.

    Only the run that wrote last is considered: falling back to an older run's checkpoint
    would silently continue a run the user started over from.
    """
    if resume in ("none", ""):
        return None
    if resume != "auto":
        path = Path(resume)
        verify_checkpoint(path)
        return path
    history = checkpoints_by_write_order(directory)
    if not history:
        return None
    newest_run = history[-1].run_id
    others = [info.path.name for info in history if info.run_id != newest_run]
    if others:
        log.warning("not resuming %s: written by an earlier run than %s", ", ".join(others), history[-1].path)
    for info in reversed(history):
        if info.run_id != newest_run:
            continue
        try:
            verify_checkpoint(info.path)
            return info.path
        except CheckpointError as err:
            log.warning("skipping checkpoint: %s; trying the previous one", err)
    return None


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    load_state: Optional[Callable[[torch.nn.Module, dict[str, torch.Tensor]], None]] = None,
) -> dict[str, Any]:
    """Load the full weights into `model` and return the train state (tensors and plain values only).

    `load_state(model, full_state)` replaces model.load_state_dict for models that hold only
    part of the weights (expert parallelism: each rank takes its experts' rows). The tensors
    are copied into the parameters in place: under ZeRO they are views into one flat buffer.
    """
    verify_checkpoint(path)
    full_state = load_file(str(path / MODEL_FILE))
    bad = _non_finite(full_state.items())
    if bad:
        raise CheckpointError(f"{path / MODEL_FILE}: non-finite values in {', '.join(bad[:5])}")
    if load_state is None:
        model.load_state_dict(full_state, strict=True)
    else:
        load_state(model, full_state)
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


def saved_rank_files(path: Path) -> int:
    """How many per-rank files a (verified) checkpoint holds: the world size that wrote them, or 0."""
    return int(json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8")).get("rank_files", 0))


def read_rank_states(path: Path) -> list[dict[str, Any]]:
    """Every rank's file of a (verified) checkpoint with per-rank state, in rank order.

    Memory-mapped: a rank of the resuming job touches only the parts it copies out. The
    tensors are views of the files, so copy what is kept (the optimizer loader does).
    """
    return [
        torch.load(path / rank_state_file(rank), map_location="cpu", weights_only=True, mmap=True)
        for rank in range(saved_rank_files(path))
    ]


def load_rank_state(path: Path, rank: int, world_size: int) -> dict[str, Any]:
    """This rank's own file of a checkpoint with per-rank state, for state that only the same
    number of ranks can load (torch's optimizer state_dict, as checkpoints written before the
    optimizer was saved by parameter name hold)."""
    saved = saved_rank_files(path)
    if saved != world_size:
        raise CheckpointError(
            f"{path}: the optimizer state is sharded over {saved} ranks in the per-rank format of an "
            f"older onerec, which only loads on the same number of ranks, but this job has {world_size}; "
            f"resume with {saved} processes (checkpoints written since load on any number), or start "
            "over with train.resume=none"
        )
    return torch.load(path / rank_state_file(rank), map_location="cpu", weights_only=True)


# -------------------------------------------------------------- weights files
def weights_manifest_path(path: Path) -> Path:
    """The sidecar manifest of a weights file: `<name>.manifest.json` beside it."""
    return path.with_name(path.name + WEIGHTS_MANIFEST_SUFFIX)


def save_weights(
    model: torch.nn.Module,
    path: Path,
    full_state: Optional[dict[str, torch.Tensor]] = None,
    provenance: Optional[dict[str, Any]] = None,
) -> None:
    """Model weights alone (best-so-far copy, reward model, aligned weights) with their
    sidecar manifest, through a temporary file and a rename; non-finite weights are refused
    before anything is written.

    `full_state` is written instead of the model's own state dict when the model holds only
    part of the weights (expert parallelism gathers the full set first). `provenance` goes
    into the manifest (the trainer records the run id and step of best weights there).
    """
    check_finite(full_state if full_state is not None else model.state_dict(), f"weights to {path}", CorruptFileError)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if full_state is None:
        save_model(model, str(tmp))
    else:
        _save_tensors(full_state, tmp)
    manifest = {**(provenance or {}), **manifest_entries({path.name: tmp})}
    sidecar = weights_manifest_path(path)
    # The old manifest goes first: a crash between the two renames then leaves complete
    # weights without a manifest (loaded with a warning), never new weights that fail an old
    # manifest's checksum.
    sidecar.unlink(missing_ok=True)
    os.replace(tmp, path)
    write_json_atomic(sidecar, manifest)


def weights_provenance(path: Path) -> dict[str, Any]:
    """What the writer recorded in a weights file's manifest ({} if it has none or it is unreadable)."""
    try:
        manifest = json.loads(weights_manifest_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a weights file written by save_weights into `model`, verified against its
    manifest (CorruptFileError naming the file and what failed) and checked finite."""
    if not path.is_file():
        raise CheckpointError(f"{path}: model weights not found")
    sidecar = weights_manifest_path(path)
    if sidecar.is_file():
        manifest = verify_files(path.parent, sidecar)
        if path.name not in manifest.get("files", {}):
            raise CorruptFileError(f"{sidecar}: does not list {path.name}, so {path} cannot be verified")
    else:
        log.warning(
            "%s has no checksum manifest (%s): written before weights carried one, so it is loaded "
            "unverified; rerun the stage that wrote it to add one", path, sidecar.name,
        )
    load_finite_weights(model, path)


def load_finite_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a weights file its caller has verified (or knowingly not) into `model`; refuse
    a file safetensors cannot parse and weights with NaN/inf, both with a CorruptFileError."""
    try:
        load_model(model, str(path), strict=True)
    except SafetensorError as err:
        raise CorruptFileError(f"{path}: not a readable safetensors file ({err})") from None
    bad = _non_finite(model.state_dict().items())
    if bad:
        raise CorruptFileError(
            f"{path}: non-finite values in {', '.join(bad[:5])} (a damaged file, or weights from a run "
            "that diverged); rerun the stage that wrote it"
        )
