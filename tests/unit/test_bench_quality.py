"""bench/quality.py: its command line is checked before any work starts, and finished runs it
reads back are refused unless they match the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import quality  # noqa: E402  (bench/ is not a package)

from onerec.config import load_config, to_dict  # noqa: E402


@pytest.mark.parametrize("seconds, fragment", [("60,70", "2 values for 3 seeds"), ("60,x,70", "expected numbers")])
def test_pipeline_seconds_must_be_one_number_per_seed(seconds, fragment, capsys):
    with pytest.raises(SystemExit):
        quality.main(["--name", "x", "--seeds", "3", "--skip-pipeline", "--pipeline-seconds", seconds])
    assert fragment in capsys.readouterr().err


def _baseline_file(tmp_path: Path, config: dict, **extra) -> Path:
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"model": "sasrec_pp", "valid": {}, "test": {}, "config": config, **extra}))
    return path


def test_a_finished_baseline_is_read_only_with_the_settings_the_config_asks_for(tmp_path):
    """--skip-pipeline reads baselines trained earlier: one trained with other settings (here
    another epoch cap) or another seed is refused, naming the file and the key."""
    cfg = load_config(None, ["sasrec_pp.enabled=true", "sasrec_pp.max_epochs=75", "run.seed=1"])
    trained = to_dict(cfg.sasrec_pp)
    assert quality.finished_baseline(cfg, "sasrec_pp", _baseline_file(tmp_path, trained, seed=1))["config"] == trained
    assert quality.finished_baseline(cfg, "sasrec_pp", _baseline_file(tmp_path, trained))  # older files: no seed
    with pytest.raises(ValueError, match=r"metrics.json: .*sasrec_pp.max_epochs=300 \(config: 75\)"):
        quality.finished_baseline(cfg, "sasrec_pp", _baseline_file(tmp_path, {**trained, "max_epochs": 300}, seed=1))
    with pytest.raises(ValueError, match="run.seed=0, the config asks for 1"):
        quality.finished_baseline(cfg, "sasrec_pp", _baseline_file(tmp_path, trained, seed=0))


def test_the_table_says_when_its_runs_were_read_back_rather_than_timed_here():
    metrics = {m: 0.01 for m in quality.METRICS}
    result = {
        "name": "x", "command": "c", "date": "d", "device": "cpu", "published": {},
        "popularity": {"test": metrics}, "ours": {"valid": metrics, "test": metrics},
        "sasrec": {"valid": metrics, "test": metrics}, "seconds": {"pipeline": 600.0, "sasrec": 60.0},
        "sasrec_in_pipeline": True,
    }
    assert "SASRec 1.0 min (part of the pipeline's time)." in quality.markdown(result)
    read_back = quality.markdown({**result, "read_back": True})
    assert "part of the pipeline's time" not in read_back
    assert "SASRec 1.0 min. Every model was read back from a finished run (--skip-pipeline)" in read_back
