"""Damaged weights: bytes flipped, cut off or added anywhere in a model export, best weights or
a checkpoint of a small trained run. Every change to a weights, config or data file is caught
(exit 2, a one-line message naming the file), never an empty recommendation, never a
metrics.json or an export made from the damaged bytes, never a traceback, never a change
outside the run directory.

A manifest (export/manifest.json, a checkpoint's manifest.json, best weights' sidecar) is the
one file whose damage may be harmless: when it still parses and lists the same checksums and
sizes (a flip inside JSON whitespace, or in a field the loader does not read), the command may
succeed, and then its result must be exactly the undamaged run's (the same metrics, the same
recommendations, a byte-identical export).

The run is trained once per module (the integration pipeline's log and model, 4 steps); each
example damages one file of a fresh copy.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_helpers import (
    SENTINEL_FILES, Outcome, assert_success_or_user_error, assert_user_error, fuzz_settings, outside_unchanged,
    run_cli, snapshot,
)

STEPS = 4  # train.max_steps; checkpoints at steps 2 and 4, validation at both
CHECKPOINT = f"pretrain/checkpoints/step_{STEPS:08d}"
HISTORY = ["--history", "i3 i4 i5", "--top-k", "5", "--beam-width", "10"]

# what `onerec evaluate` and `onerec recommend` read: the export
EXPORT_FILES = [
    "pretrain/export/model.safetensors",
    "pretrain/export/config.json",
    "pretrain/export/semantic_ids/codes.safetensors",
    "pretrain/export/semantic_ids/semantic_ids.json",
    "pretrain/export/items.parquet",
    "pretrain/export/manifest.json",
]
# what `onerec pretrain --resume` reads to rebuild the export
TRAINING_FILES = [
    "pretrain/best/model.safetensors",
    "pretrain/best/model.safetensors.manifest.json",
    f"{CHECKPOINT}/model.safetensors",
    f"{CHECKPOINT}/train_state.pt",
    f"{CHECKPOINT}/manifest.json",
]
MANIFESTS = {"pretrain/export/manifest.json", "pretrain/best/model.safetensors.manifest.json", f"{CHECKPOINT}/manifest.json"}


def _pipeline_helpers():
    """tests/integration/test_pipeline.py's tiny learnable log and model (loaded by path: the
    integration folder is not on sys.path when tests/fuzz runs alone)."""
    path = Path(__file__).resolve().parents[1] / "integration" / "test_pipeline.py"
    spec = importlib.util.spec_from_file_location("fuzz_pipeline_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._write_log, module._overrides


@dataclass(repr=False)
class TrainedRun:
    """The run every example copies, and what its commands gave before any damage."""

    root: Path  # raw/ and run/
    overrides: list[str]
    metrics: bytes  # metrics.json as `onerec evaluate` wrote it
    recommendations: str  # what `onerec recommend` printed
    export: dict  # pretrain/export as export_files() sees it

    def __repr__(self) -> str:  # a failing example prints this
        return f"TrainedRun({self.root})"

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def overrides_for(self, run: Path) -> list[str]:
        return [o for o in self.overrides if not o.startswith("run.out_dir=")] + [f"run.out_dir={run}"]


def _relative(entries: dict, folder: Path) -> dict:
    return {str(Path(name).relative_to(folder)): content for name, content in entries.items() if name != str(folder)}


def export_files(run: Path) -> dict:
    """pretrain/export by relative name, without what names the run directory (config.json,
    and the manifest's source path and checksum of config.json)."""
    files = _relative(snapshot(run / "pretrain" / "export"), run / "pretrain" / "export")
    files.pop("config.json")
    manifest = json.loads(files.pop("manifest.json"))
    files["manifest.json"] = {part: {k: v for k, v in manifest[part].items() if k != "config.json"}
                              for part in ("files", "sizes")}
    return files


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TrainedRun:
    """data, tokenize, 4 steps of pretrain and evaluate through the CLI, once per module."""
    write_log, pipeline_overrides = _pipeline_helpers()
    root = tmp_path_factory.mktemp("trained")
    write_log(root / "raw")
    overrides = pipeline_overrides(root) + [f"train.max_steps={STEPS}", "train.checkpoint_every=2",
                                            "train.eval_every=2", "train.warmup_steps=0"]
    for stage in ("data", "tokenize", "pretrain", "evaluate"):
        outcome = run_cli([stage, *overrides])
        assert outcome.code == 0, outcome
    run = root / "run"
    for path in EXPORT_FILES + TRAINING_FILES:
        assert (run / path).is_file(), path
    recommended = run_cli(["recommend", "--model", str(run / "pretrain" / "export"), *HISTORY])
    assert recommended.code == 0 and len(recommended.stdout.splitlines()) == 6, recommended
    return TrainedRun(root, overrides, (run / "metrics.json").read_bytes(), recommended.stdout, export_files(run))


@contextmanager
def run_copy(trained: TrainedRun, parent: Path) -> Iterator[tuple[Path, Path]]:
    """(a fresh copy of the trained run, a sentinel folder beside it), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="ex-", dir=parent))
    try:
        shutil.copytree(trained.run, root / "run")
        for name, content in SENTINEL_FILES.items():
            (root / "sentinel" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "sentinel" / name).write_bytes(content)
        yield root / "run", root / "sentinel"
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- damage
@dataclass(frozen=True)
class Damage:
    """Bytes flipped (xor), the file cut short, or bytes added at its end. Positions are drawn
    from a wide range and taken modulo the file's length: about uniform over the file, where
    hypothesis's own small-number bias would mostly hit the first bytes (the header)."""

    kind: str  # flip | cut | extend
    flips: tuple[tuple[int, int], ...] = ()  # (position, xor mask 1..255)
    keep: int = 0  # cut: bytes kept, modulo the length
    added: bytes = b""  # extend

    def apply(self, content: bytes) -> bytes:
        if self.kind == "flip":
            data = bytearray(content)
            for where, mask in self.flips:
                data[where % len(data)] ^= mask
            return bytes(data)
        if self.kind == "cut":
            return content[: self.keep % len(content)]
        return content + self.added


POSITION = st.integers(0, 2**40)
DAMAGE = st.one_of(
    st.builds(Damage, st.just("flip"), st.lists(st.tuples(POSITION, st.integers(1, 255)), min_size=1,
                                                max_size=3).map(tuple)),
    st.builds(Damage, st.just("cut"), keep=POSITION),
    st.builds(Damage, st.just("extend"), added=st.binary(min_size=1, max_size=64) | st.sampled_from([b" ", b"\n", b"\x00"])),
)


def damage_file(path: Path, damage: Damage) -> bytes:
    """Write the damaged bytes over `path`; returns the original bytes."""
    original = path.read_bytes()
    damaged = damage.apply(original)
    if damaged == original:  # flips that cancel out: damage the first byte instead
        damaged = bytes([damaged[0] ^ 0xFF]) + damaged[1:]
    path.write_bytes(damaged)
    return original


def manifest_unchanged_in_effect(original: bytes, damaged: bytes) -> bool:
    """Whether a damaged manifest still parses and lists the same checksums (and the same
    sizes, or none), so that it verifies exactly what the original verified."""
    try:
        before, after = json.loads(original), json.loads(damaged)
    except (ValueError, UnicodeDecodeError):
        return False
    if not isinstance(after, dict) or after.get("files") != before["files"]:
        return False
    return after.get("sizes", before["sizes"]) == before["sizes"]


def check_refusal(outcome: Outcome, run: Path, target: str, harmless: bool) -> None:
    """Exit 2 naming the damaged file (for a manifest: it, or a file it lists, so its folder),
    unless the damage is harmless, when exit 0 is allowed as well."""
    assert_success_or_user_error(outcome)
    if outcome.code == 0 and harmless:
        return
    named = str((run / target).parent) if target in MANIFESTS else Path(target).name
    assert_user_error(outcome, named)


# --------------------------------------------------------------------------- the tests
@fuzz_settings(30)
@given(target=st.sampled_from(EXPORT_FILES), damage=DAMAGE)
def test_damaged_export_is_refused_by_evaluate_and_recommend(trained, fuzz_dir, target, damage):
    """A byte flipped, the file cut short or bytes added in any file of the export: `onerec
    evaluate` and `onerec recommend` exit 2 naming the file, metrics.json keeps its bytes and
    nothing is recommended; a manifest whose damage changes nothing it checks may instead give
    exactly the undamaged run's metrics and recommendations."""
    with run_copy(trained, fuzz_dir) as (run, sentinel):
        original = damage_file(run / target, damage)
        harmless = target in MANIFESTS and manifest_unchanged_in_effect(original, (run / target).read_bytes())
        with outside_unchanged(trained.raw, trained.run, sentinel):
            evaluated = run_cli(["evaluate", *trained.overrides_for(run)])
            recommended = run_cli(["recommend", "--model", str(run / "pretrain" / "export"), *HISTORY])
        check_refusal(evaluated, run, target, harmless)
        check_refusal(recommended, run, target, harmless)
        if evaluated.code == 2:
            assert (run / "metrics.json").read_bytes() == trained.metrics, "metrics.json changed after a refusal"
        else:
            metrics = json.loads((run / "metrics.json").read_text())
            expected = json.loads(trained.metrics)
            assert (metrics["valid"], metrics["test"]) == (expected["valid"], expected["test"])
        assert recommended.stdout == (trained.recommendations if recommended.code == 0 else "")


@fuzz_settings(16)
@given(target=st.sampled_from(TRAINING_FILES), damage=DAMAGE)
def test_damaged_training_weights_never_reach_the_export(trained, fuzz_dir, target, damage):
    """A byte flipped, the file cut short or bytes added in the best weights or in the newest
    checkpoint (resumed by name): `onerec pretrain --resume` exits 2 naming the file, and the
    export and metrics.json keep their bytes; a manifest whose damage changes nothing it checks
    may instead succeed, rebuilding a byte-identical export."""
    with run_copy(trained, fuzz_dir) as (run, sentinel):
        original = damage_file(run / target, damage)
        harmless = target in MANIFESTS and manifest_unchanged_in_effect(original, (run / target).read_bytes())
        resume = ["--resume", str(run / CHECKPOINT)] if target.startswith(CHECKPOINT) else ["--resume"]
        with outside_unchanged(trained.raw, trained.run, sentinel):
            outcome = run_cli(["pretrain", *resume, *trained.overrides_for(run)])
        check_refusal(outcome, run, target, harmless)
        assert export_files(run) == trained.export, f"{outcome}: the export changed"
        assert (run / "metrics.json").read_bytes() == trained.metrics


def _flip_a_level0_code(path: Path) -> None:
    """Change one item's first-level code to another valid code (v -> v xor 1, still below the
    codebook size of 8): the file stays a well-formed safetensors file, the codes are wrong."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header] ^= 0x01  # item 0, level 0: the low byte of an int64
    path.write_bytes(bytes(data))


def _flip_the_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[20] ^= 0x41  # inside the JSON header
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_flip_a_level0_code, _flip_the_header], ids=["codes changed", "header damaged"])
def test_damaged_semantic_ids_never_reach_the_export(trained, fuzz_dir, damage):
    """The tokenize stage's codes, damaged: `onerec pretrain --resume` should refuse them (exit
    2 naming the file) and leave the export as it was."""
    with run_copy(trained, fuzz_dir) as (run, sentinel):
        damage(run / "semantic_ids" / "codes.safetensors")
        with outside_unchanged(trained.raw, trained.run, sentinel):
            outcome = run_cli(["pretrain", "--resume", *trained.overrides_for(run)])
        check_refusal(outcome, run, "semantic_ids/codes.safetensors", harmless=False)
        assert export_files(run) == trained.export, f"{outcome}: the export changed"
