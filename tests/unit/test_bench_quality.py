"""bench/quality.py's command line: per-seed wall times are checked before any work starts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import quality  # noqa: E402  (bench/ is not a package)


@pytest.mark.parametrize("seconds, fragment", [("60,70", "2 values for 3 seeds"), ("60,x,70", "expected numbers")])
def test_pipeline_seconds_must_be_one_number_per_seed(seconds, fragment, capsys):
    with pytest.raises(SystemExit):
        quality.main(["--name", "x", "--seeds", "3", "--skip-pipeline", "--pipeline-seconds", seconds])
    assert fragment in capsys.readouterr().err
