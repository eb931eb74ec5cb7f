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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from onerec.data.readers import FLOAT32_MAX

# What Python's str.strip() removes (every c with str.isspace(), as RE2 escapes; RE2's \s is
# ASCII only). tests/unit/test_data_sources.py checks the list against str.isspace.
PYTHON_WHITESPACE = (
    r"\x{9}-\x{d}\x{1c}-\x{20}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"
)
_EDGE_WHITESPACE = f"^[{PYTHON_WHITESPACE}]|[{PYTHON_WHITESPACE}]$"
_ALL_WHITESPACE = f"^[{PYTHON_WHITESPACE}]*$"
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
    """The distinct values of an id column as the per-row readers read them (text stripped;
    other values as str() writes them), and which of them are empty. Integers stay int64:
    IdDictionary keeps integer ids as numbers (str(int) is the id they stand for)."""
    kind = dictionary.type
    if pa.types.is_integer(kind) and not pa.types.is_uint64(kind):
        return dictionary.cast(pa.int64()), np.zeros(len(dictionary), dtype=bool)
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


_CANONICAL_INTEGER = r"^(0|-?[1-9][0-9]{0,17})$"  # exactly what str(int) writes, within int64


def _canonical_integers(values: pa.Array) -> np.ndarray | None:
    """`values` (int64, or strings) as int64 when every one is an integer written as str(int)
    writes it ("7", not "07" or "+7", which are other ids), else None."""
    if pa.types.is_int64(values.type):
        return values.to_numpy(zero_copy_only=False)
    if is_text(values.type) and pc.all(pc.match_substring_regex(values, _CANONICAL_INTEGER)).as_py() is not False:
        return values.cast(pa.int64()).to_numpy(zero_copy_only=False)
    return None


class IdDictionary:
    """Raw ids -> int32 codes, shared by every batch and file of one column; each distinct id
    is stored once. While every id is an integer (the usual case in big logs) they are kept
    as a sorted int64 array and looked up with a binary search: a batch costs O(batch log
    ids), not a hash of every id seen so far. The first id that is not an integer turns the
    dictionary into Arrow text (ints as str() writes them), looked up by hash."""

    def __init__(self) -> None:
        self._ints: np.ndarray | None = np.zeros(0, dtype=np.int64)  # [ids] by code, while all are integers
        self._sorted = np.zeros(0, dtype=np.int64)  # the same, sorted
        self._sorted_codes = np.zeros(0, dtype=np.int32)  # the code of each sorted value
        self._text = pa.array([], type=pa.string())  # [ids] by code, once one is not an integer

    def __len__(self) -> int:
        return len(self._ints) if self._ints is not None else len(self._text)

    def codes(self, values: pa.Array) -> np.ndarray:
        """[len(values)] int32 code of each value (int64 or strings, repeats allowed), adding new ones."""
        if not len(values):
            return np.zeros(0, dtype=np.int32)
        if self._ints is not None:
            integers = _canonical_integers(values)
            if integers is not None:
                return self._integer_codes(integers)
            self._text, self._ints = pa.array(self._ints).cast(pa.string()), None
        return self._text_codes(values.cast(pa.string()))

    def _integer_codes(self, values: np.ndarray) -> np.ndarray:
        at = np.minimum(np.searchsorted(self._sorted, values), max(len(self._sorted) - 1, 0))
        known = (self._sorted[at] == values) if len(self._sorted) else np.zeros(len(values), dtype=bool)
        if not known.all():
            new = np.unique(values[~known])
            codes = np.arange(len(self._ints), len(self._ints) + len(new), dtype=np.int32)
            self._ints = np.concatenate([self._ints, new])
            slots = np.searchsorted(self._sorted, new)
            self._sorted = np.insert(self._sorted, slots, new)
            self._sorted_codes = np.insert(self._sorted_codes, slots, codes)
            at = np.searchsorted(self._sorted, values)
        return self._sorted_codes[at]

    def _text_codes(self, values: pa.Array) -> np.ndarray:
        found = pc.index_in(values, value_set=self._text)
        missing = found.is_null()
        if pc.any(missing).as_py():
            new = pc.unique(values.filter(missing))
            self._text = pa.concat_arrays([self._text, new])
            found = pc.index_in(values, value_set=self._text)
        return found.to_numpy(zero_copy_only=False).astype(np.int32)

    def tolist(self) -> list[str]:
        if self._ints is not None:
            return pa.array(self._ints).cast(pa.string()).to_pylist()
        return self._text.to_pylist()
