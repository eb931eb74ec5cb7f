"""Fixtures for the multi-process tests: the synthetic data prepared once per session, and a
fresh run directory with it for each test (helpers live in distributed_helpers.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from distributed_helpers import REPO, TINY_TRAIN, pipeline_test, process_env, run_logged


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A run directory holding data/ and semantic_ids/ for the synthetic log."""
    from onerec.cli import main as cli_main

    tmp = tmp_path_factory.mktemp("distributed")
    pipeline_test._write_log(tmp / "raw")
    overrides = pipeline_test._overrides(tmp)
    assert cli_main(["data", *overrides]) == 0
    assert cli_main(["tokenize", *overrides]) == 0
    return tmp


def _make_run(prepared: Path, out: Path) -> tuple[Path, list[str]]:
    out.mkdir()
    for part in ("data", "semantic_ids"):
        shutil.copytree(prepared / "run" / part, out / part)
    overrides = [o for o in pipeline_test._overrides(prepared) if not o.startswith("run.out_dir=")]
    return out, [f"run.out_dir={out}", *overrides, *TINY_TRAIN]


@pytest.fixture
def new_run(prepared, tmp_path):
    """new_run(name) -> (run directory with data ready, the overrides that train in it)."""
    return lambda name: _make_run(prepared, tmp_path / name)


@pytest.fixture(scope="session")
def reference_run(prepared, tmp_path_factory) -> Path:
    """The tiny config trained once, uninterrupted, by launch/torchrun.sh with 2 gloo workers:
    what a restarted job and the other launchers must reproduce."""
    out, overrides = _make_run(prepared, tmp_path_factory.mktemp("reference") / "run")
    run_logged([str(REPO / "launch" / "torchrun.sh"), *overrides], out.parent / "reference.log", 600,
               process_env(NPROC_PER_NODE="2"))
    return out
