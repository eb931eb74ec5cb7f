"""What every fuzz test shares: hypothesis settings with a fixed seed, a CLI call that records
what the user sees, and snapshots of the folders that no command may change.

The property every fuzz test holds, for each generated input:
- `onerec.cli.main` returns 0 (and the test checks the result), or returns 2 having logged
  exactly one error, on one line; no exception escapes and nothing prints a traceback;
- no file outside the run directory changes: the raw inputs, and a sentinel folder beside
  the run directory, keep their names and bytes.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from hypothesis import HealthCheck, Phase, settings

from onerec import cli

FUZZ_EXAMPLES_ENV = "ONEREC_FUZZ_EXAMPLES"  # set by `pytest --fuzz-examples N` (tests/conftest.py)
FUZZ_SHRINK_ENV = "ONEREC_FUZZ_SHRINK"  # 1: shrink a failing example (can take minutes)


def fuzz_settings(examples: int) -> settings:
    """Hypothesis settings of a fuzz test: `examples` examples in CI (sized so that all of
    tests/fuzz stays under three minutes on two cores), or N with --fuzz-examples N; always
    the same examples (derandomize), no deadline, no example database. A failing example is
    reported as drawn (each draw is labelled); ONEREC_FUZZ_SHRINK=1 shrinks it first, which
    can take minutes on these inputs."""
    override = os.environ.get(FUZZ_EXAMPLES_ENV)
    phases = [Phase.explicit, Phase.generate]
    if os.environ.get(FUZZ_SHRINK_ENV) == "1":
        phases.append(Phase.shrink)
    return settings(
        max_examples=int(override) if override else examples,
        phases=phases,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


class Long(str):
    """A long string (a 200 KB field) that a failing example reports by its length and start."""

    def __repr__(self) -> str:
        return f"<{len(self):,} characters: {str.__repr__(self[:8])}...>"


# ----------------------------------------------------------------------------- the CLI
@dataclass
class Outcome:
    """What one `onerec ...` call did, as a user would see it."""

    argv: list[str]
    code: int
    stdout: str
    stderr: str
    errors: list[str] = field(default_factory=list)  # messages the `onerec` loggers logged as errors

    @property
    def message(self) -> str:
        return self.errors[0] if self.errors else ""

    def __str__(self) -> str:
        return f"onerec {' '.join(a[:80] for a in self.argv)} -> exit {self.code}: {self.message[:500]!r}"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def run_cli(argv: list[str]) -> Outcome:
    """`onerec <argv>` in this process, stdout and stderr captured. An exception that escapes
    the CLI (a bug: user errors are caught and reported) propagates and fails the test."""
    records = _Records()
    logger = logging.getLogger("onerec")
    logger.addHandler(records)
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as exit_:  # argparse reports its own errors this way
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        logger.removeHandler(records)
    return Outcome(argv, code, out.getvalue(), err.getvalue(), [r.getMessage() for r in records.records])


def assert_success_or_user_error(outcome: Outcome) -> None:
    """Exit 0, or exit 2 with exactly one error message on one line; never a traceback."""
    assert "Traceback" not in outcome.stderr, f"{outcome}\n{outcome.stderr[-3000:]}"
    assert outcome.code in (0, 2), f"{outcome}\n{outcome.stderr[-3000:]}"
    if outcome.code == 2:
        assert len(outcome.errors) == 1, f"{outcome}: expected one error message, got {outcome.errors}"
        assert outcome.message.strip(), f"{outcome}: empty error message"
        assert "\n" not in outcome.message, f"{outcome}: the message spans several lines"


def assert_user_error(outcome: Outcome, *mentions: str) -> None:
    """Exit 2 with a one-line message that contains each of `mentions`."""
    assert_success_or_user_error(outcome)
    assert outcome.code == 2, f"expected a user error, got {outcome}\n{outcome.stderr[-2000:]}"
    for text in mentions:
        assert text in outcome.message, f"{outcome}: the message does not mention {text!r}"


def assert_success(outcome: Outcome) -> None:
    assert_success_or_user_error(outcome)
    assert outcome.code == 0, f"expected success, got {outcome}"


# ----------------------------------------------------------------------------- folders
def snapshot(*folders: Path) -> dict[str, Optional[bytes]]:
    """Every entry under `folders`: path -> bytes (None for a directory). Equal snapshots
    mean the same names, sizes and contents."""
    entries: dict[str, Optional[bytes]] = {}
    for folder in folders:
        entries[str(folder)] = None if folder.exists() else b"<missing>"
        for path in sorted(folder.rglob("*")):
            entries[str(path)] = None if path.is_dir() else path.read_bytes()
    return entries


def describe_changes(before: dict, after: dict) -> str:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return f"added {added[:5]}, removed {removed[:5]}, changed {changed[:5]}"


SENTINEL_FILES = {
    "notes.txt": b"a user's notes beside the run directory\n",
    "data/events.csv": b"user,item,ts\nu1,i1,1\n",  # a folder with the data stage's output name
    "metrics.json": b'{"mine": true}\n',
}


@dataclass
class Workspace:
    """One example's folder: raw/ (the inputs), run/ (run.out_dir, not created: onerec makes
    it) and sentinel/ (files a user keeps beside the run)."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def sentinel(self) -> Path:
        return self.root / "sentinel"


@contextmanager
def workspace(parent: Path) -> Iterator[Workspace]:
    """A fresh Workspace under `parent` with its sentinel files written, removed afterwards.
    Wrap the commands in `outside_unchanged(space.raw, space.sentinel)`."""
    root = Path(tempfile.mkdtemp(prefix="ex-", dir=parent))
    try:
        space = Workspace(root)
        space.raw.mkdir()
        for name, content in SENTINEL_FILES.items():
            path = space.sentinel / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        yield space
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def outside_unchanged(*folders: Path) -> Iterator[None]:
    """Fails when the block changes anything under `folders` (names, sizes, bytes)."""
    before = snapshot(*folders)
    yield
    after = snapshot(*folders)
    assert after == before, f"a file outside the run directory changed: {describe_changes(before, after)}"
