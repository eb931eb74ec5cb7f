"""Resumable training checkpoints and model exports, written atomically, loaded without unpickling.

A checkpoint is a directory:

    checkpoints/step_00000500/
        model.safetensors     model weights
        train_state.pt        optimizer, scheduler, progress and RNG state: only tensors and
                              plain Python values, so it loads with torch.load(weights_only=True)
        manifest.json         step, sha256 and size of each file, the resolved config

It is written into a hidden temporary directory and renamed into place, so a crash (even
a SIGKILL) never leaves a half-written `step_*` directory; the manifest's sizes and
checksums catch a file that was damaged afterwards (say, truncated by a full disk or a
partial copy), and `resolve_resume("auto")` falls back to the previous checkpoint.
Weights with a NaN/inf in them are refused: a checkpoint is never written from a
poisoned state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_model, save_model

from onerec.logging import write_json_atomic

log = logging.getLogger("onerec.checkpoint")

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
MANIFEST_FILE = "manifest.json"


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


def save_checkpoint(
    directory: Path,
    step: int,
    model: torch.nn.Module,
    train_state: dict[str, Any],
    config: dict,
    keep: int,
) -> Path:
    """Write checkpoint `step` under `directory` atomically and keep only the newest `keep`."""
    bad = [name for name, tensor in model.state_dict().items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise CheckpointError(
            f"refusing to write checkpoint step {step} to {directory}: non-finite values in {', '.join(bad[:5])}"
        )
    directory.mkdir(parents=True, exist_ok=True)
    # One writer per stage directory (rank 0), so any other temporary directory was left
    # by a writer that was killed mid-save.
    for stale in directory.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = directory / _step_dir_name(step)
    tmp = directory / f".tmp-{_step_dir_name(step)}-{os.getpid()}"
    tmp.mkdir()
    save_model(model, str(tmp / MODEL_FILE))
    torch.save(train_state, tmp / STATE_FILE)
    names = (MODEL_FILE, STATE_FILE)
    manifest = {
        "step": step,
        "files": {name: _sha256(tmp / name) for name in names},
        "sizes": {name: (tmp / name).stat().st_size for name in names},
        "config": config,
    }
    write_json_atomic(tmp / MANIFEST_FILE, manifest)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in list_checkpoints(directory)[:-keep]:
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


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load weights into `model` and return the train state (tensors and plain values only)."""
    verify_checkpoint(path)
    load_model(model, str(path / MODEL_FILE), strict=True)
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Model weights alone (best-so-far copy, exports), through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_model(model, str(tmp))
    os.replace(tmp, path)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: model weights not found")
    load_model(model, str(path), strict=True)
