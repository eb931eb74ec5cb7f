"""Weights files and model exports carry a checksum manifest and finite values: damage is a
CorruptFileError naming the file (exit 2 in the CLI), never silently wrong results."""

import importlib.util
import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from onerec.checkpoint import CheckpointError, load_weights, save_weights, weights_manifest_path, weights_provenance
from onerec.cli import main as cli_main
from onerec.config import load_config
from onerec.errors import CorruptFileError, UserError
from onerec.export import export_model, load_export
from onerec.tokenizer.semantic_ids import SemanticIds


def _flip_middle(path: Path, count: int = 64) -> None:
    """Invert `count` bytes in the middle of the file: same size, different content."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


@contextmanager
def _onerec_log():
    """Records of the `onerec` loggers (the CLI stops them propagating to the root logger)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("onerec")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _text(records) -> str:
    return "\n".join(record.getMessage() for record in records)


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))


# ------------------------------------------------------------------ weights files
def test_saved_weights_carry_a_manifest_and_a_flipped_middle_is_named_on_load(tmp_path):
    path = tmp_path / "best" / "model.safetensors"
    save_weights(Toy(), path, provenance={"run_id": "r", "step": 3})
    manifest = json.loads(weights_manifest_path(path).read_text())
    assert set(manifest["files"]) == set(manifest["sizes"]) == {"model.safetensors"}
    assert manifest["sizes"]["model.safetensors"] == path.stat().st_size
    assert weights_provenance(path)["step"] == 3
    load_weights(Toy(), path)  # intact: loads

    _flip_middle(path)
    with pytest.raises(CorruptFileError, match="checksum mismatch") as err:
        load_weights(Toy(), path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, UserError)

    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptFileError, match=r"truncated or corrupted file \(\d+ bytes, expected \d+\)"):
        load_weights(Toy(), path)


def test_non_finite_weights_are_never_written(tmp_path):
    model = Toy()
    with torch.no_grad():
        model.net[0].weight[3, 5] = float("nan")
    path = tmp_path / "best" / "model.safetensors"
    with pytest.raises(CorruptFileError, match=r"refusing to write weights to .*non-finite values in net.0.weight"):
        save_weights(model, path)
    assert not path.exists() and not weights_manifest_path(path).exists()
    full_state = {k: v.clone() for k, v in Toy().state_dict().items()}
    full_state["net.2.bias"][0] = float("inf")
    with pytest.raises(CorruptFileError, match="net.2.bias"):
        save_weights(Toy(), path, full_state)
    assert not path.exists()


def test_loaded_non_finite_weights_are_refused_with_or_without_a_manifest(tmp_path):
    path = tmp_path / "model.safetensors"
    state = {k: v.clone() for k, v in Toy().state_dict().items()}
    state["net.0.bias"][0] = float("nan")
    save_file(state, str(path))  # an older file: no manifest
    with pytest.raises(CorruptFileError, match=r"model.safetensors: non-finite values in net.0.bias"):
        load_weights(Toy(), path)
    # ...and one whose manifest matches (its writer hashed the NaN in).
    from onerec.checkpoint import write_manifest

    write_manifest(weights_manifest_path(path), tmp_path, ["model.safetensors"])
    with pytest.raises(CorruptFileError, match="non-finite"):
        load_weights(Toy(), path)


def test_weights_written_before_manifests_load_with_a_warning(tmp_path, caplog):
    path = tmp_path / "model.safetensors"
    original = Toy()
    save_weights(original, path)
    weights_manifest_path(path).unlink()
    loaded = Toy()
    with caplog.at_level("WARNING", logger="onerec.checkpoint"):
        load_weights(loaded, path)
    assert "has no checksum manifest" in caplog.text and "loaded unverified" in caplog.text
    for a, b in zip(original.parameters(), loaded.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    path.write_bytes(b"\x00" * 100)  # not even a safetensors file: still a user error, not a traceback
    with pytest.raises(CorruptFileError, match="not a readable safetensors file"):
        load_weights(Toy(), path)


def test_checkpoint_error_is_a_corrupt_file_error_and_still_a_runtime_error():
    assert issubclass(CheckpointError, CorruptFileError) and issubclass(CheckpointError, RuntimeError)


# -------------------------------------------------------------------- exports
def _tiny_cfg():
    return load_config(None, [
        "model.d_model=16", "model.num_heads=2", "model.encoder_layers=1", "model.decoder_layers=1",
        "model.d_ff=32", "data.max_history=4",
    ])


def _semantic_ids():
    return SemanticIds(torch.tensor([[0, 1], [1, 0], [2, 2], [3, 1]]), [4, 4], 2)


def _best_weights(tmp_path: Path, cfg, nan: bool = False) -> Path:
    from onerec.export import build_model

    torch.manual_seed(0)
    model = build_model(cfg, _semantic_ids())
    path = tmp_path / "pretrain" / "best" / "model.safetensors"
    save_weights(model, path)
    if nan:  # weights that went bad after they were written: damaged, with a consistent manifest
        from onerec.checkpoint import write_manifest
        from safetensors.torch import load_file

        state = load_file(str(path))
        name = next(k for k, v in state.items() if v.is_floating_point())
        state[name] = state[name].clone().fill_(float("nan"))
        save_file(state, str(path))
        write_manifest(weights_manifest_path(path), path.parent, [path.name])
    return path


def _export(tmp_path: Path, weights: Path, cfg) -> Path:
    ids = _semantic_ids()
    return export_model(tmp_path / "pretrain" / "export", weights, cfg, ids, ["a", "b", "c", "d"], ["A", "B", "C", "D"])


def test_an_export_carries_a_manifest_of_every_file_and_loads(tmp_path):
    cfg = _tiny_cfg()
    export = _export(tmp_path, _best_weights(tmp_path, cfg), cfg)
    manifest = json.loads((export / "manifest.json").read_text())
    on_disk = {p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert {"model.safetensors", "config.json", "items.parquet", "semantic_ids/codes.safetensors"} <= on_disk
    assert not weights_manifest_path(export / "model.safetensors").exists()  # one manifest for the export
    exported = load_export(export)
    assert exported.raw_ids == ["a", "b", "c", "d"]


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "items.parquet", "semantic_ids/codes.safetensors"])
def test_a_damaged_export_file_is_named_on_load(tmp_path, name):
    cfg = _tiny_cfg()
    export = _export(tmp_path, _best_weights(tmp_path, cfg), cfg)
    _flip_middle(export / name, count=min(64, (export / name).stat().st_size // 4))
    with pytest.raises(CorruptFileError, match="checksum mismatch") as err:
        load_export(export)
    assert str(export / name) in str(err.value)
    (export / name).unlink()
    with pytest.raises(CorruptFileError, match=f"{name}: missing"):
        load_export(export)


def test_an_export_without_a_manifest_loads_with_a_warning_and_its_weights_checked_finite(tmp_path, caplog):
    cfg = _tiny_cfg()
    export = _export(tmp_path, _best_weights(tmp_path, cfg), cfg)
    (export / "manifest.json").unlink()
    with caplog.at_level("WARNING", logger="onerec.export"):
        load_export(export)
    assert "written before exports carried checksums" in caplog.text and "onerec pretrain --resume" in caplog.text
    from safetensors.torch import load_file

    state = load_file(str(export / "model.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name].fill_(float("inf"))
    save_file(state, str(export / "model.safetensors"))
    with pytest.raises(CorruptFileError, match=f"non-finite values in {name}"):
        load_export(export)


def test_a_manifest_that_leaves_out_the_weights_does_not_verify_the_export(tmp_path):
    cfg = _tiny_cfg()
    export = _export(tmp_path, _best_weights(tmp_path, cfg), cfg)
    manifest = json.loads((export / "manifest.json").read_text())
    del manifest["files"]["model.safetensors"]
    (export / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptFileError, match="does not list model.safetensors"):
        load_export(export)


def test_export_model_refuses_damaged_or_non_finite_source_weights_and_keeps_the_old_export(tmp_path):
    cfg = _tiny_cfg()
    weights = _best_weights(tmp_path, cfg)
    export = _export(tmp_path, weights, cfg)
    before = {p: p.read_bytes() for p in export.rglob("*") if p.is_file()}

    _flip_middle(weights)
    with pytest.raises(CorruptFileError, match="checksum mismatch") as err:
        _export(tmp_path, weights, cfg)
    assert str(weights) in str(err.value)

    nan_weights = _best_weights(tmp_path / "nan", cfg, nan=True)
    with pytest.raises(CorruptFileError, match="non-finite"):
        _export(tmp_path, nan_weights, cfg)
    assert {p: p.read_bytes() for p in export.rglob("*") if p.is_file()} == before  # untouched
    assert not list(export.parent.glob(".export.tmp-*"))


# ------------------------------------------------------- through the CLI, end to end
def _pipeline_helpers():
    """_write_log and _overrides of tests/integration/test_pipeline.py (a tiny synthetic run)."""
    path = Path(__file__).parents[1] / "integration" / "test_pipeline.py"
    spec = importlib.util.spec_from_file_location("_pipeline_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    helpers = _pipeline_helpers()
    tmp = tmp_path_factory.mktemp("integrity")
    helpers._write_log(tmp / "raw")
    overrides = [o for o in helpers._overrides(tmp) if not o.startswith(("sasrec.", "train.max_epochs="))]
    overrides.append("train.max_epochs=3")  # a model is all these tests need, not a good one
    assert cli_main(["pipeline", *overrides]) == 0
    return tmp / "run", overrides


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A fresh copy of the finished run (same raw data and config, another run.out_dir)."""
    run, overrides = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy, [o for o in overrides if not o.startswith("run.out_dir=")] + [f"run.out_dir={copy}"]


def test_a_corrupt_export_stops_evaluate_and_recommend_with_exit_2_and_leaves_metrics_alone(run_copy):
    run, overrides = run_copy
    metrics_before = (run / "metrics.json").read_bytes()
    export = run / "pretrain" / "export"
    _flip_middle(export / "model.safetensors")
    with _onerec_log() as records:
        assert cli_main(["evaluate", *overrides]) == 2
    assert f"{export / 'model.safetensors'}: checksum mismatch" in _text(records)
    assert (run / "metrics.json").read_bytes() == metrics_before
    with _onerec_log() as records:
        assert cli_main(["recommend", "--model", str(export), "--history", "i3 i4 i5", "--top-k", "5",
                         "--beam-width", "10"]) == 2
    assert f"{export / 'model.safetensors'}: checksum mismatch" in _text(records)


def test_corrupt_best_weights_stop_a_resumed_pretrain_before_it_rebuilds_the_export(run_copy):
    run, overrides = run_copy
    export_before = {p: p.read_bytes() for p in (run / "pretrain" / "export").rglob("*") if p.is_file()}
    best = run / "pretrain" / "best" / "model.safetensors"
    _flip_middle(best)
    with _onerec_log() as records:
        assert cli_main(["pretrain", *overrides, "train.resume=auto"]) == 2
    assert f"{best}: checksum mismatch" in _text(records)
    assert {p: p.read_bytes() for p in (run / "pretrain" / "export").rglob("*") if p.is_file()} == export_before
