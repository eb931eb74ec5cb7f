"""Columnar conversions of raw values, each the vectorised twin of a per-row rule in readers.py.

Every function takes an Arrow column of one batch and returns numpy values plus a `flag`
mask: the rows it could not settle with certainty. The caller hands the flagged rows to the
per-row parser (readers.parse_time / parse_number and the id rules), which decides exactly as
before and writes the located message. So the fast path never has to agree with Python's
float() or int() on odd input ("1_000", " 7 ", "٣", "nan"): it only claims the plain cases.

IdDictionary turns raw ids into int32 codes across batches and files, holding each distinct
id once.
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from onerec.data.readers import FLOAT32_MAX

# Python's str.strip() removes these (str.isspace); RE2's \s is ASCII only, so list them.
_PY_WHITESPACE = "".join(f"\\x{{{c:x}}}" for c in range(sys.maxunicode + 1) if chr(c).isspace())
_EDGE_WHITESPACE = f"^[{_PY_WHITESPACE}]|[{_PY_WHITESPACE}]$"
_ALL_WHITESPACE = f"^[{_PY_WHITESPACE}]*$"
_PLAIN_INTEGER = r"^-?[0-9]{1,18}$"  # fits int64 whatever the digits
_PLAIN_DECIMAL = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,3})?$"

_SECONDS_PER = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
# datetime (and so the text path) covers years 1..9999: seconds of 0001-01-01 and 9999-12-31T23:59:59
_FIRST_SECOND, _LAST_SECOND = -62_135_596_800, 253_402_300_799


def _mask(array) -> np.ndarray:
    """An Arrow boolean array as numpy, null as False."""
    return pc.fill_null(array, False).to_numpy(zero_copy_only=False)


def is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def is_datetime(kind: pa.DataType) -> bool:
    return pa.types.is_timestamp(kind) or pa.types.is_date(kind)


def blank(column: pa.Array) -> np.ndarray:
    """[rows] bool: text that str.strip() would leave empty (a CSV column, all strings)."""
    return _mask(pc.match_substring_regex(column, _ALL_WHITESPACE))


def normalised_ids(dictionary: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """The distinct values of an id column as the strings the per-row readers make of them
    (text stripped; numbers as str() writes them), and which of them are empty."""
    kind = dictionary.type
    if is_text(kind):
        text = dictionary.cast(pa.string())
        edges = np.flatnonzero(_mask(pc.match_substring_regex(text, _EDGE_WHITESPACE)))
        if len(edges):
            values = text.to_pylist()
            for i in edges.tolist():
                values[i] = values[i].strip()
            text = pa.array(values, type=pa.string())
    elif pa.types.is_integer(kind):
        text = dictionary.cast(pa.string())  # Arrow writes integers exactly as str(int) does
    else:
        source = dictionary.cast(pa.string()) if is_datetime(kind) else dictionary
        text = pa.array([str(v).strip() for v in source.to_pylist()], type=pa.string())
    return text, _mask(pc.equal(pc.utf8_length(text), 0))


def ids(column: pa.Array) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """(local code per row, the local dictionary's normalised strings, flag per row): an id
    column dictionary-encoded, flagged where null or empty after stripping."""
    encoded = pc.dictionary_encode(column)
    text, empty = normalised_ids(encoded.dictionary)
    indices = encoded.indices
    null = indices.is_null().to_numpy(zero_copy_only=False)
    local = pc.fill_null(indices, 0).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    flag = null | (empty[local] if len(empty) else null)
    return local, text, flag


def times(column: pa.Array) -> tuple[np.ndarray, bool, np.ndarray]:
    """(int64 time per row, is_date, flag per row), as readers.parse_time reads the values:
    numbers exactly (decimals truncated toward zero), dates and timestamps as seconds since
    1970 UTC, floored."""
    kind, n = column.type, len(column)
    null = column.is_null().to_numpy(zero_copy_only=False)
    if is_text(kind):
        plain = _mask(pc.match_substring_regex(column, _PLAIN_INTEGER))
        values = pc.if_else(pa.array(plain), column, "0").cast(pa.int64()).to_numpy(zero_copy_only=False)
        return values, False, ~plain
    if pa.types.is_integer(kind):
        fits = ~null
        if pa.types.is_uint64(kind):
            fits &= _mask(pc.less_equal(column, pa.scalar(2**63 - 1, pa.uint64())))
        values = pc.if_else(pa.array(fits), column, pa.scalar(0, kind)).cast(pa.int64(), safe=False).to_numpy(zero_copy_only=False)
        return values, False, ~fits
    if pa.types.is_floating(kind):
        values = pc.fill_null(column, 0).cast(pa.float64()).to_numpy(zero_copy_only=False)
        fits = ~null & np.isfinite(values) & (values >= -(2.0**63)) & (values < 2.0**63)
        return np.trunc(np.where(fits, values, 0.0)).astype(np.int64), False, ~fits
    if is_datetime(kind):
        if pa.types.is_timestamp(kind):
            raw, per_second = pc.fill_null(column.cast(pa.int64()), 0).to_numpy(zero_copy_only=False), _SECONDS_PER[kind.unit]
        elif pa.types.is_date32(kind):
            raw, per_second = pc.fill_null(column.cast(pa.int32()), 0).to_numpy(zero_copy_only=False).astype(np.int64) * 86_400, 1
        else:  # date64: milliseconds
            raw, per_second = pc.fill_null(column.cast(pa.int64()), 0).to_numpy(zero_copy_only=False), 1_000
        seconds = np.floor_divide(raw, per_second)
        fits = ~null & (seconds >= _FIRST_SECOND) & (seconds <= _LAST_SECOND)
        return np.where(fits, seconds, 0), True, ~fits
    return np.zeros(n, dtype=np.int64), False, np.ones(n, dtype=bool)  # lists, booleans...: the per-row rules


def numbers(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(float32 per row, flag per row), as readers.parse_number reads the values: finite
    and within float32, converted through float64 (as float() then float32 did)."""
    kind, n = column.type, len(column)
    if is_text(kind):
        plain = _mask(pc.match_substring_regex(column, _PLAIN_DECIMAL))
        values = pc.if_else(pa.array(plain), column, "0").cast(pa.float64()).to_numpy(zero_copy_only=False)
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind):
        plain = ~column.is_null().to_numpy(zero_copy_only=False)
        values = pc.fill_null(column, 0).cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False)
    else:
        return np.zeros(n, dtype=np.float32), np.ones(n, dtype=bool)
    fits = plain & np.isfinite(values) & (np.abs(values) <= FLOAT32_MAX)
    return np.where(fits, values, 0.0).astype(np.float32), ~fits


class IdDictionary:
    """Raw id strings -> int32 codes, shared by every batch and file of one column. Codes are
    given in order of first appearance; each distinct id is stored once, as Arrow text."""

    def __init__(self) -> None:
        self._values = pa.array([], type=pa.string())

    def __len__(self) -> int:
        return len(self._values)

    def codes(self, values: pa.Array) -> np.ndarray:
        """[len(values)] int32 code of each value (strings, repeats allowed), adding new ones."""
        if not len(values):
            return np.zeros(0, dtype=np.int32)
        found = pc.index_in(values, value_set=self._values)
        missing = found.is_null()
        if pc.any(missing).as_py():
            new = pc.unique(values.filter(missing))
            self._values = pa.concat_arrays([self._values, new])
            found = pc.index_in(values, value_set=self._values)
        return found.to_numpy(zero_copy_only=False).astype(np.int32)

    def tolist(self) -> list[str]:
        return self._values.to_pylist()
