"""Resumable training checkpoints and model exports, written atomically, loaded without unpickling.

A checkpoint is a directory:

    checkpoints/step_00000500/
        model.safetensors       model weights, always the full model (an expert-parallel run
                                gathers every rank's experts first)
        train_state.pt          scheduler, progress, RNG states and, when every rank holds the
                                same optimizer state, the optimizer: only tensors and plain
                                Python values, so it loads with torch.load(weights_only=True)
        optimizer_rank00000.pt  one per rank when the optimizer state is sharded (ZeRO 1/2
        optimizer_rank00001.pt  partitions, or experts sharded by expert parallelism)
        manifest.json           step, sha256 and size of each file, the resolved config

It is staged in a hidden temporary directory and renamed into place, so a crash (even a
SIGKILL) never leaves a half-written `step_*` directory. With per-rank files every rank
writes its own file into the staging directory (which must then be on a filesystem all
ranks share, as resuming needs anyway) and rank 0 seals it with the manifest and the rename.
The manifest's sizes and checksums catch a file that was damaged afterwards (say, truncated
by a full disk or a partial copy), and `resolve_resume("auto")` falls back to the previous
checkpoint. Weights with a NaN/inf in them are refused: a checkpoint is never written from
a poisoned state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from onerec.logging import write_json_atomic

log = logging.getLogger("onerec.checkpoint")

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
MANIFEST_FILE = "manifest.json"
RANK_STATE_FILE = "optimizer_rank{rank:05d}.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or fails its checksum."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_state_file(rank: int) -> str:
    return RANK_STATE_FILE.format(rank=rank)


def check_finite(weights: dict[str, torch.Tensor], what: str) -> None:
    """CheckpointError naming the first non-finite tensors (call it on every rank: all see the same weights)."""
    bad = [name for name, tensor in weights.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise CheckpointError(f"refusing to write {what}: non-finite values in {', '.join(bad[:5])}")


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path))


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
) -> Path:
    """Rank 0: write weights, train state and manifest into `staging`, rename it into place,
    keep only the newest `keep` checkpoints. `rank_files` per-rank files must already be there,
    and every rank must have run check_finite on the weights (so all of them stop together)."""
    missing = [rank_state_file(r) for r in range(rank_files) if not (staging / rank_state_file(r)).is_file()]
    if missing:
        raise CheckpointError(
            f"{staging}: {', '.join(missing[:3])} not written: every rank must see the checkpoint "
            "directory (put train checkpoints on a filesystem shared by all nodes)"
        )
    _save_tensors(weights, staging / MODEL_FILE)
    torch.save(train_state, staging / STATE_FILE)
    names = (MODEL_FILE, STATE_FILE, *(rank_state_file(r) for r in range(rank_files)))
    manifest = {
        "step": step,
        "files": {name: _sha256(staging / name) for name in names},
        "sizes": {name: (staging / name).stat().st_size for name in names},
        "rank_files": rank_files,
        "config": config,
    }
    write_json_atomic(staging / MANIFEST_FILE, manifest)
    final = staging.parent / _step_dir_name(step)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.rename(staging, final)
    for old in list_checkpoints(staging.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (temporary ones are ignored)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step_"))


def verify_checkpoint(path: Path) -> dict:
    """Return the manifest if every file is present and matches its checksum, else raise CheckpointError."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST_FILE} (incomplete checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({err})") from None
    sizes = manifest.get("sizes", {})  # absent in checkpoints written before sizes were recorded
    for name, expected in manifest.get("files", {}).items():
        file_path = path / name
        if not file_path.is_file():
            raise CheckpointError(f"{file_path}: missing")
        size = file_path.stat().st_size
        if name in sizes and size != sizes[name]:
            raise CheckpointError(f"{file_path}: truncated or corrupted file ({size} bytes, expected {sizes[name]})")
        if _sha256(file_path) != expected:
            raise CheckpointError(f"{file_path}: checksum mismatch (truncated or corrupted file)")
    return manifest


def resolve_resume(resume: str, directory: Path) -> Optional[Path]:
    """`none` -> None; `auto` -> newest checkpoint that verifies (warning about any skipped); else that path."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        verify_checkpoint(path)
        return path
    for candidate in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(candidate)
            return candidate
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
    if load_state is None:
        model.load_state_dict(full_state, strict=True)
    else:
        load_state(model, full_state)
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


def load_rank_state(path: Path, rank: int, world_size: int) -> dict[str, Any]:
    """This rank's own file of a checkpoint with per-rank state (same world size only)."""
    saved = int(json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8")).get("rank_files", 0))
    if saved != world_size:
        raise CheckpointError(
            f"{path}: the optimizer state is sharded over {saved} ranks (ZeRO stage > 0 or expert "
            f"parallelism) but this job has {world_size}; resume with {saved} processes, or start "
            "over with train.resume=none"
        )
    return torch.load(path / rank_state_file(rank), map_location="cpu", weights_only=True)


def save_weights(model: torch.nn.Module, path: Path, full_state: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Model weights alone (best-so-far copy, exports), through a temporary file and a rename.

    `full_state` is written instead of the model's own state dict when the model holds only
    part of the weights (expert parallelism gathers the full set first).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if full_state is None:
        save_model(model, str(tmp))
    else:
        _save_tensors(full_state, tmp)
    os.replace(tmp, path)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: model weights not found")
    load_model(model, str(path), strict=True)
