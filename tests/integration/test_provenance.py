"""Provenance on a tiny real run: `onerec pipeline` reruns exactly the stages whose inputs
changed, and a stage never reads an earlier stage's output that is stale."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from onerec.cli import main as cli_main
from onerec.provenance import fingerprint

_spec = importlib.util.spec_from_file_location("pipeline_test", Path(__file__).with_name("test_pipeline.py"))
pipeline_test = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pipeline_test)

SHORT = ["train.max_steps=6", "train.eval_every=6", "train.checkpoint_every=6"]


@pytest.fixture
def finished_run(tmp_path):
    pipeline_test._write_log(tmp_path / "raw")
    overrides = pipeline_test._overrides(tmp_path) + SHORT
    assert cli_main(["pipeline", *overrides]) == 0
    return tmp_path, overrides


def _stages_run(run: Path) -> list[str]:
    return list(json.loads((run / "metrics.json").read_text())["stage_seconds"])


def test_a_rerun_after_editing_the_learning_rate_starts_at_pretrain(finished_run):
    tmp, overrides = finished_run
    assert _stages_run(tmp / "run") == ["data", "tokenize", "pretrain", "evaluate"]
    assert cli_main(["pipeline", *overrides, "train.lr=1e-3"]) == 0
    assert _stages_run(tmp / "run") == ["pretrain", "evaluate"]
    metrics = (tmp / "run" / "metrics.json").read_bytes()
    assert cli_main(["pipeline", *overrides, "train.lr=1e-3"]) == 0  # nothing changed: nothing runs
    assert (tmp / "run" / "metrics.json").read_bytes() == metrics
    assert cli_main(["pipeline", *overrides, "train.lr=1e-3", "--force"]) == 0
    assert _stages_run(tmp / "run") == ["data", "tokenize", "pretrain", "evaluate"]


def test_evaluate_refuses_an_export_made_from_data_that_was_remade(finished_run, caplog):
    """The reported case: rerunning `onerec data` on other data into a finished run, then
    `onerec evaluate`, evaluated the old export against re-indexed items and replaced
    metrics.json with meaningless numbers."""
    tmp, overrides = finished_run
    metrics = (tmp / "run" / "metrics.json").read_bytes()
    log = tmp / "raw" / "log.csv"
    log.write_text("\n".join(log.read_text().splitlines()[:-40]) + "\n")  # other data
    assert cli_main(["data", *overrides]) == 0
    assert cli_main(["evaluate", *overrides]) == 2
    assert "`onerec tokenize`" in caplog.text and "stale" in caplog.text
    assert (tmp / "run" / "metrics.json").read_bytes() == metrics
    # The data stage alone is fresh again; tokenize and pretrain are what must rerun.
    assert cli_main(["pipeline", *overrides]) == 0
    assert _stages_run(tmp / "run") == ["tokenize", "pretrain", "evaluate"]


def test_a_changed_stage_config_is_named_when_a_later_stage_reads_it(finished_run, caplog):
    tmp, overrides = finished_run
    assert cli_main(["pretrain", *overrides, "tokenizer.codebook_size=4"]) == 2
    assert "`onerec tokenize`" in caplog.text and "tokenizer.codebook_size" in caplog.text


def _data_record(tmp: Path) -> dict:
    return json.loads((tmp / "run" / ".onerec" / "provenance" / "data.json").read_text())


def _touch(path: Path) -> None:
    """A new modification time, the same bytes (what a copy without timestamps does)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_the_same_raw_files_copied_again_leave_the_run_fresh(finished_run):
    """The reported case: the shared data set was copied again (same bytes, new modification
    times) and every stage of an hour-long run counted as stale."""
    tmp, overrides = finished_run
    log = tmp / "raw" / "log.csv"
    recorded = _data_record(tmp)["raw_files"]
    assert [entry[0] for entry in recorded] == ["items.csv", "log.csv"]
    assert all(len(entry) == 4 and len(entry[3]) == 64 for entry in recorded)  # path, size, time, sha256
    _touch(log)
    metrics = (tmp / "run" / "metrics.json").read_bytes()
    assert cli_main(["pipeline", *overrides]) == 0  # every stage fresh: nothing runs
    assert (tmp / "run" / "metrics.json").read_bytes() == metrics
    assert cli_main(["evaluate", *overrides]) == 0  # not refused as stale


def test_raw_files_with_other_bytes_of_the_same_size_make_the_run_stale(finished_run, caplog):
    tmp, overrides = finished_run
    log = tmp / "raw" / "log.csv"
    text = log.read_text()
    edited = text.replace("1", "2", 1)
    assert edited != text and len(edited) == len(text)
    log.write_text(edited)
    assert cli_main(["evaluate", *overrides]) == 2
    assert "`onerec data`" in caplog.text and "changed since it ran" in caplog.text
    assert cli_main(["pipeline", *overrides]) == 0
    assert _stages_run(tmp / "run") == ["data", "tokenize", "pretrain", "evaluate"]


def test_a_record_from_before_digests_is_compared_by_size_and_time(finished_run, caplog):
    """Runs made before records kept digests stay fresh while their raw files are untouched;
    with only times to go by, a copy with new times counts as a change."""
    tmp, overrides = finished_run
    path = tmp / "run" / ".onerec" / "provenance" / "data.json"
    record = json.loads(path.read_text())
    record["raw_files"] = [entry[:3] for entry in record["raw_files"]]
    record["fingerprint"] = fingerprint("data", record["config"], record["upstream"], record["raw_files"])
    path.write_text(json.dumps(record))
    metrics = (tmp / "run" / "metrics.json").read_bytes()
    assert cli_main(["pipeline", *overrides]) == 0
    assert (tmp / "run" / "metrics.json").read_bytes() == metrics
    _touch(tmp / "raw" / "log.csv")
    assert cli_main(["evaluate", *overrides]) == 2
    assert "other sizes or times than when it ran" in caplog.text
