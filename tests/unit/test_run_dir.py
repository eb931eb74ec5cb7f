"""Output safety: onerec writes only into run directories it created or adopted, never over
raw data or foreign files (onerec/run_dir.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onerec.cli import main as cli_main
from onerec.errors import ConfigError, ResourceError
from onerec.run_dir import OUTPUT_MARKER, RUN_MARKER, check_out_dir, open_run_dir, replace_directory


def _raw_log(folder: Path) -> dict[str, bytes]:
    """A tiny generic CSV log; returns each file's bytes to compare against later."""
    folder.mkdir(parents=True)
    rows = ["user,item,ts"] + [f"u{u},i{(u + t) % 12},{100 * u + t}" for u in range(10) for t in range(6)]
    (folder / "events.csv").write_text("\n".join(rows) + "\n")
    (folder / "items.csv").write_text("item_id,title\n" + "".join(f"i{i},Item {i}\n" for i in range(12)))
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _data_args(root: str, out: str) -> list[str]:
    return ["data", "data.format=csv", f"data.root={root}", "data.interactions_file=events.csv",
            "data.items_file=items.csv", "data.user_column=user", "data.item_column=item",
            "data.time_column=ts", f"run.out_dir={out}"]


@pytest.mark.parametrize("out_dir", [".", ""])
def test_a_run_in_the_working_directory_never_replaces_the_raw_data(tmp_path, monkeypatch, out_dir):
    """The reported loss: `onerec data data.root=data run.out_dir=.` replaced ./data's raw files
    with the stage's Arrow output."""
    monkeypatch.chdir(tmp_path)
    before = _raw_log(tmp_path / "data")
    assert cli_main(_data_args("data", out_dir)) == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == before
    assert not (tmp_path / RUN_MARKER).exists()


def test_run_dir_holding_the_raw_data_is_refused(tmp_path):
    _raw_log(tmp_path / "run" / "raw")
    with pytest.raises(ConfigError, match="contains data.root"):
        check_out_dir(str(tmp_path / "run"), str(tmp_path / "run" / "raw"))
    with pytest.raises(ConfigError, match="contains data.root"):
        check_out_dir(str(tmp_path / "run" / "raw"), str(tmp_path / "run" / "raw"))


def test_a_directory_with_foreign_files_is_refused_and_left_alone(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("do not touch")
    with pytest.raises(ConfigError, match="holds files onerec did not write.*thesis.tex"):
        open_run_dir(str(tmp_path / "mine"))
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["thesis.tex"]


def test_new_runs_get_a_marker_and_older_runs_are_adopted(tmp_path):
    run_id = open_run_dir(str(tmp_path / "fresh"))
    marker = json.loads((tmp_path / "fresh" / RUN_MARKER).read_text())
    assert marker["run_id"] == run_id and len(run_id) == 32
    assert open_run_dir(str(tmp_path / "fresh")) == run_id  # the same run on every later stage

    (tmp_path / "old" / "data").mkdir(parents=True)
    (tmp_path / "old" / "config.yaml").write_text("run: {}\n")
    assert open_run_dir(str(tmp_path / "old"))
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == [RUN_MARKER, "config.yaml", "data"]


def test_other_ranks_never_create_the_marker(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert open_run_dir(str(tmp_path / "run")) is None
    assert not (tmp_path / "run").exists()


def test_an_unwritable_run_directory_is_refused_before_any_work(tmp_path, monkeypatch):
    open_run_dir(str(tmp_path / "run"))
    real_write = Path.write_bytes

    def read_only(self, data):  # the run directory behaves as read-only (tests run as root)
        if self.parent == tmp_path / "run":
            raise PermissionError(13, "Permission denied")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(ResourceError, match="not writable"):
        open_run_dir(str(tmp_path / "run"))


def test_replace_directory_replaces_only_onerec_outputs(tmp_path):
    def staged(text: str) -> Path:
        folder = tmp_path / f"staged-{text}"
        folder.mkdir()
        (folder / "meta.json").write_text(text)
        return folder

    target = tmp_path / "data"
    replace_directory(staged("one"), target, "data", "meta.json")  # absent: created
    assert json.loads((target / OUTPUT_MARKER).read_text()) == {"kind": "data"}
    replace_directory(staged("two"), target, "data", "meta.json")  # ours: replaced
    assert (target / "meta.json").read_text() == "two"

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ConfigError, match="not written by onerec"):
        replace_directory(staged("three"), foreign, "data", "meta.json")
    assert [p.name for p in foreign.iterdir()] == ["cat.jpg"]
    with pytest.raises(ConfigError, match="not written by onerec"):  # another stage's output
        replace_directory(staged("four"), target, "semantic_ids", "semantic_ids.json")
