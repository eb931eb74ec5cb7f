"""Bad input: a clear error naming file, line and field, or (on_bad_rows: skip) a counted skip."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

from onerec import errors

log = logging.getLogger("onerec.data")


class DataError(errors.DataError):
    """Input that cannot be used, located precisely: `file:line: field 'x': what was expected`.

    A subclass of onerec.errors.DataError, so the CLI reports it as a message with exit code 2
    (and, like every DataError, it is still a ValueError for callers that catch that)."""

    def __init__(self, file: str, line: int | str, field: str, message: str) -> None:
        self.file, self.line, self.field = file, line, field
        where = f"{file}:{line}" if line != "" else file
        super().__init__(f"{where}: field '{field}': {message}")


class BadRows:
    """Applies `on_bad_rows`: raise at the first bad row ("error") or count it by reason ("skip")."""

    def __init__(self, policy: str) -> None:
        if policy not in ("error", "skip"):
            raise errors.ConfigError(f"on_bad_rows={policy!r}: expected 'error' or 'skip'")
        self.policy = policy
        self.counts: Counter[str] = Counter()

    def bad(self, reason: str, file: str, line: int | str, field: str, message: str) -> None:
        if self.policy == "error":
            raise DataError(file, line, field, message + " (set data.on_bad_rows=skip to drop such rows)")
        self.counts[reason] += 1

    def bad_many(self, reason: str, count: int, first: Callable[[], tuple[str, int | str, str, str]]) -> None:
        """`count` bad rows of one kind at once: raise for the first, whose (file, line, field,
        message) `first()` works out only then, or count them all. Columnar checks use it, so
        skipping a million bad rows costs no per-row Python and no location lookups."""
        if not count:
            return
        if self.policy == "error":
            self.bad(reason, *first())
        self.counts[reason] += count

    def merge(self, other: "BadRows") -> None:
        self.counts.update(other.counts)

    def summary(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def log_summary(self) -> None:
        for reason, count in self.summary().items():
            log.warning("skipped %d bad row(s): %s", count, reason)
