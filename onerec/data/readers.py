"""Line-level reading helpers shared by the loaders: empty files, field counts, numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from onerec.data.errors import BadRows, DataError


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    if path.stat().st_size == 0:
        raise DataError(path.name, 1, "*", "the file is empty")
    return path


def split_lines(
    path: Path, sep: str | None, min_fields: int, bad: BadRows, encoding: str = "utf-8", skip_header: bool = False
) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, fields) for each non-blank line with at least `min_fields` fields."""
    produced = False
    with open(path, encoding=encoding, newline="") as handle:
        for number, raw in enumerate(handle, start=1):
            if skip_header and number == 1:
                continue
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split(sep) if sep is not None else line.split()
            if len(fields) < min_fields:
                bad.bad(
                    "malformed line", path.name, number, f"#{len(fields) + 1}",
                    f"expected at least {min_fields} fields, got {len(fields)}: {line[:80]!r}",
                )
                continue
            produced = True
            yield number, fields
    if not produced and bad.policy == "error":
        raise DataError(path.name, 1, "*", "no data rows in the file")


def parse_number(text: str, bad: BadRows, file: str, line: int | str, field: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        bad.bad("non-numeric field", file, line, field, f"expected a number, got {text!r}")
        return None
    if value != value:  # NaN
        bad.bad("non-numeric field", file, line, field, f"expected a number, got {text!r}")
        return None
    return value
