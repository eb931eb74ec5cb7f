"""The bad-input fuzzer: hypothesis generates raw data, configs and damaged weights files, and
each test holds, for every example, that onerec either succeeds with the right result or stops
with a one-line user error (exit 2), never a traceback, never a changed file outside the run
directory, never a metrics file computed from corrupt weights (see fuzz_helpers.py).

CI runs a fixed set of examples (derandomized, no example database) within three minutes;
`python -m pytest tests/fuzz --fuzz-examples 500` (or ONEREC_FUZZ_EXAMPLES=500) searches longer.
"""

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    """A folder for one test module's examples (each example works in a fresh subfolder)."""
    return tmp_path_factory.mktemp("fuzz")
