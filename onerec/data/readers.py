"""Line-level reading helpers shared by the loaders: text files, field counts, numbers, times.

Decisions every reader shares:
- Text files are UTF-8; a byte-order mark at the start is dropped ("utf-8-sig"), so the first
  header column keeps its name. Bytes that are not UTF-8 are an error in both on_bad_rows
  modes, naming the file, line and byte offset: a file in another encoding is wrong as a
  whole, and skipping its lines would drop rows silently.
- CSV fields may be of any length (csv's default cap is 131,072 characters).
- Numbers (feedback) must be finite and within float32, the type they are stored as.
- Times: see `parse_time`.
- Ids may not be empty or null.
- Item text: control characters are removed at load time, see `strip_control`.
"""

from __future__ import annotations

import csv
import math
import re
import sys
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from onerec.data.errors import BadRows, DataError
from onerec.errors import MissingInputError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise MissingInputError(f"{path}: {what} not found")
    if path.stat().st_size == 0:
        raise DataError(path.name, 1, "*", "the file is empty")
    return path


def decoding_error(name: str, open_binary, encoding: str) -> DataError:
    """Where the first undecodable byte is: the decoder's own message has only a position in
    its internal buffer. Runs only after a decode failed, one line at a time in binary
    (`open_binary()` opens the file's bytes again)."""
    offset = 0
    with open_binary() as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as err:
                byte = raw[err.start : err.start + 1].hex()
                return DataError(
                    name, number, "*",
                    f"not valid {encoding.upper()} at byte offset {offset + err.start} (byte 0x{byte}, column "
                    f"{len(raw[: err.start].decode(encoding, 'replace')) + 1}); save the file as UTF-8",
                )
            offset += len(raw)
    return DataError(name, "", "*", f"not valid {encoding.upper()}; save the file as UTF-8")


def _decoding_error(path: Path, encoding: str) -> DataError:
    return decoding_error(path.name, lambda: open(path, "rb"), encoding)


@contextmanager
def open_text(path: Path, encoding: str = "utf-8", newline: str | None = "") -> Iterator[IO[str]]:
    """A text file opened for reading. UTF-8 drops a leading byte-order mark; a decoding
    error anywhere while the caller reads becomes a DataError with the line and byte offset."""
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        with open(path, encoding=codec, newline=newline) as handle:
            yield handle
    except UnicodeDecodeError:
        raise _decoding_error(path, "utf-8" if codec == "utf-8-sig" else encoding) from None


# How pyarrow reports a damaged Parquet file: ArrowInvalid, OSError (a footer it cannot
# deserialize), NotImplementedError (an encoding or type it does not know), MemoryError (a
# length field that asks for terabytes).
PARQUET_DAMAGE = (pa.ArrowException, OSError, ValueError, NotImplementedError, MemoryError)


def read_parquet(path: Path) -> pa.Table:
    """The whole Parquet file `path`, fully validated (offsets, and UTF-8 in string columns,
    which pyarrow does not check on read). A file that is not Parquet, or is damaged, is a
    DataError naming it, with pyarrow's reason on one line: pyarrow reports damage as
    ArrowInvalid, OSError (a footer it cannot deserialize), NotImplementedError (an encoding
    or type it does not know) or MemoryError (a length field that asks for terabytes)."""
    try:
        table = pq.read_table(path)
        table.validate(full=True)
    except PARQUET_DAMAGE as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataError(path.name, "", "*", f"not a readable Parquet file ({reason[:300]})") from None
    return table


def read_text(path: Path) -> str:
    """The whole of a UTF-8 file (for JSON documents), with open_text's BOM and error handling."""
    with open_text(path) as handle:
        return handle.read()


def allow_long_csv_fields() -> None:
    """Lift the csv module's field cap (131,072 characters) to the platform maximum: a long
    item description is data, not an error. The cap is a C long, smaller than sys.maxsize on
    some platforms (Windows), hence the halving."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 2


def split_lines(
    path: Path, sep: str | None, min_fields: int, bad: BadRows, encoding: str = "utf-8", skip_header: bool = False
) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, fields) for each non-blank line with at least `min_fields` fields."""
    produced = False
    with open_text(path, encoding) as handle:
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
    """A feedback value: a finite number within float32 (the type it is stored as; a larger
    one would become inf there). None, after reporting it, for anything else."""
    try:
        value = float(text)
    except ValueError:
        bad.bad("non-numeric field", file, line, field, f"expected a number, got {text!r}")
        return None
    if not math.isfinite(value):
        bad.bad("non-finite number", file, line, field, f"expected a finite number, got {text!r}")
        return None
    if abs(value) > FLOAT32_MAX:
        bad.bad("number out of range", file, line, field, f"expected a number within float32 (|x| <= 3.4e38), got {text!r}")
        return None
    return value


# ISO 8601 calendar dates and date-times, in the forms logs and Arrow write them: a date; or a
# date, 'T' or a space, hh:mm[:ss[.fraction]]; then optionally Z or an offset +hh[[:]mm].
_ISO_TIME = re.compile(
    r"(\d{4}-\d{2}-\d{2})"
    r"(?:[T ](\d{2}:\d{2})(:\d{2})?(?:[.,](\d{1,9}))?)?"
    r"\s*(Z|z|[+-]\d{2}(?::?\d{2})?)?"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _iso_seconds(text: str) -> int | None:
    """Seconds since 1970-01-01 UTC for an ISO 8601 date or date-time, else None. Written out
    rather than left to datetime.fromisoformat, which accepts different forms on 3.10 and 3.11."""
    match = _ISO_TIME.fullmatch(text)
    if match is None:
        return None
    day, clock, seconds, fraction, zone = match.groups()
    iso = day + (f"T{clock}{seconds or ':00'}" if clock else "T00:00:00")
    if fraction:
        iso += "." + fraction[:6].ljust(6, "0")  # microseconds; finer digits cannot change the second
    if zone and zone not in "Zz":
        hours, minutes = zone[:3], zone[3:].lstrip(":") or "00"
        iso += f"{hours}:{minutes}"
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:  # e.g. month 13, 25:00, offset +25:00
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - _EPOCH) // timedelta(seconds=1)


def parse_time(text: str, bad: BadRows, file: str, line: int | str, field: str) -> tuple[int, bool] | None:
    """A time-column value as (int64, is_date); None, after reporting it, when unusable.

    Accepted:
    - a number, in any unit (seconds, milliseconds...): an integer is taken exactly, a decimal
      is truncated toward zero (as int(float(x)) always did);
    - an ISO 8601 date or date-time (2024-05-01, 2024-05-01T12:30:00, 2024-05-01 12:30:00.5,
      with Z or an offset such as +02:00 / +0200): seconds since 1970-01-01 UTC, fractions
      dropped (floor); without an offset the time is taken as UTC.
    Other layouts (05/01/2024, 1 May 2024) are refused: day and month order is ambiguous.
    The value must be finite and within int64, the type the order column is stored as.
    """
    text = text.strip()
    try:
        value = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            seconds = _iso_seconds(text)
            if seconds is None:
                bad.bad("non-numeric field", file, line, field,
                        f"expected a number, got {text!r} (or an ISO 8601 date/time such as 2024-05-01T12:30:00Z)")
                return None
            return seconds, True
        if not math.isfinite(number):
            bad.bad("time out of range", file, line, field, f"expected a finite time, got {text!r}")
            return None
        value = int(number)
    if not INT64_MIN <= value <= INT64_MAX:
        bad.bad("time out of range", file, line, field, f"expected a time within int64 (|t| < 9.2e18), got {text!r}")
        return None
    return value, False


def check_one_time_kind(first_of_kind: dict[bool, int | str], file: str, field: str) -> None:
    """Refuse a time column that holds both numbers and dates (whatever on_bad_rows says):
    dates become seconds while numbers keep their own unit, so ordered together they would
    interleave wrongly. `first_of_kind` maps is_date to where each kind first appeared, in
    the order they appeared."""
    if len(first_of_kind) < 2:
        return
    (first, first_at), (second, second_at) = first_of_kind.items()
    kind = {False: "number", True: "date"}
    first_at = f"line {first_at}" if isinstance(first_at, int) else first_at
    raise DataError(file, second_at, field,
                    f"a {kind[second]}, but the column held a {kind[first]} first, on {first_at}; use one kind of time")


def times_in_range(values: np.ndarray) -> np.ndarray:
    """Boolean mask over float64 `values` (times read as numbers): finite and within int64.
    2**63 itself is out: it is the first float64 above INT64_MAX."""
    return np.isfinite(values) & (values >= -(2.0**63)) & (values < 2.0**63)


# ANSI escape sequences as a whole (CSI "ESC [ ... final", OSC "ESC ] ... BEL or ESC \", and
# two-character escapes), so none of their parameters are left behind as text; then every
# other C0/C1 control character except tab and newline, which are layout, not terminal commands.
_CONTROL = (
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[@-Z\\-_]"
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"
)


def strip_control(values: list[str]) -> list[str]:
    """Item text without terminal control sequences: titles reach the terminal through
    `onerec recommend`, and an ESC in a title would let a data file drive it. Text without
    control characters is returned unchanged (the shipped data sets have none outside tabs)."""
    if not values:
        return values
    array = pa.array(values, type=pa.string())
    if not pc.any(pc.match_substring_regex(array, _CONTROL)).as_py():
        return values
    return pc.replace_substring_regex(array, _CONTROL, "").to_pylist()
