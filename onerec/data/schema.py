"""The one schema every loader produces, before ids are made dense: columns, not Python rows.

RawLog, one row per interaction, in file order:
    users, items   raw ids, dictionary-encoded (`Ids`): an int32 code per row and the
                   distinct id strings once, so 100M rows cost 8 bytes of ids, not 100M strings
    order          int64 timestamp, or the position in the file when the format has none
    feedback       float32 columns by name
    locate         where a row came from (file, line or row), for error messages
RawLog.items: the item table when the format has one: raw id, title, text fields, and
    for items without text (KuaiRand) a numeric feature matrix. Python lists: it is sized by
    the catalogue, not by the log.
RawLog.sequence_column: when set, only interactions whose feedback in that column is > 0
    (e.g. clicked impressions) enter the user sequences the generator trains on; every
    interaction stays in the table for the reward model.
RawLog.keep_duplicate_rows: exact duplicate rows (same user, item, time and feedback) are
    bad rows unless the reader sets this because its source is known to log some events
    twice and its published results were made with them (KuaiRand); then they are kept,
    counted and logged (build.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import pyarrow as pa


@dataclass
class Ids:
    """Raw ids as codes into a dictionary: row r holds `values[codes[r]]`. A value may be
    unused by every row (rows were dropped); each distinct id appears once in `values`."""

    codes: np.ndarray  # [rows] int32
    values: list[str]  # [distinct]

    @classmethod
    def encode(cls, ids: list[str]) -> "Ids":
        """Dictionary-encode a list of id strings (the small formats' loaders build lists)."""
        if not ids:
            return cls(np.zeros(0, dtype=np.int32), [])
        encoded = pa.array(ids, type=pa.string()).dictionary_encode()
        return cls(encoded.indices.to_numpy().astype(np.int32, copy=False), encoded.dictionary.to_pylist())

    def __len__(self) -> int:
        return len(self.codes)


class Locator(Protocol):
    """Where row `row` of a RawLog came from: (file, line or row number, noun), the noun
    being "line" for text files and "row" for Parquet."""

    def __call__(self, row: int) -> tuple[str, int, str]: ...


@dataclass
class LineLocator:
    """Explicit 1-based line (or entry) numbers per row of one file: the small formats."""

    file: str
    lines: np.ndarray  # [rows] int64
    noun: str = "line"

    def __call__(self, row: int) -> tuple[str, int, str]:
        return self.file, int(self.lines[row]), self.noun

    def select(self, index: np.ndarray) -> "LineLocator":
        return LineLocator(self.file, self.lines[index], self.noun)


@dataclass
class SelectedLocator:
    """A locator after rows were dropped: row r is row `np.flatnonzero(keep)[r]` of `base`.
    Keeps the 1-byte mask rather than an 8-byte index per row: it is only asked for the
    location of the one row an error names."""

    base: Locator
    keep: np.ndarray  # [base rows] bool

    def __call__(self, row: int) -> tuple[str, int, str]:
        return self.base(int(np.flatnonzero(self.keep)[row]))


@dataclass
class RawItems:
    ids: list[str]
    fields: dict[str, list[str]]  # text fields by name ("title", "genres", ...), "" when missing
    file: str
    lines: list[int]
    features: np.ndarray | None = None  # [items, F] float32, rows aligned with ids
    files: list[str] | None = None  # the file of each row, when the table came from several

    def where(self, row: int) -> tuple[str, int]:
        return (self.files[row] if self.files else self.file), self.lines[row]


@dataclass
class RawLog:
    users: Ids
    items: Ids
    order: np.ndarray  # [rows] int64
    feedback: dict[str, np.ndarray] = field(default_factory=dict)  # float32 per column
    file: str = ""  # the source as a whole, for messages about no row in particular
    locate: Locator | None = None
    has_time: bool = True
    item_table: RawItems | None = None
    sequence_column: str | None = None
    keep_duplicate_rows: bool = False

    @classmethod
    def from_lists(cls, users: list[str], items: list[str], order: np.ndarray, feedback: dict | None = None, *,
                   file: str, lines: np.ndarray, noun: str = "line", **options) -> "RawLog":
        """A RawLog from row-wise id lists (the small formats' readers)."""
        return cls(Ids.encode(users), Ids.encode(items), np.asarray(order, dtype=np.int64), feedback or {}, file=file,
                   locate=LineLocator(file, np.asarray(lines, dtype=np.int64), noun), **options)

    def __len__(self) -> int:
        return len(self.order)

    def select(self, keep: np.ndarray) -> "RawLog":
        """Rows where `keep` is True (a boolean mask), everything else unchanged."""
        index = np.flatnonzero(keep)
        return replace(
            self,
            users=Ids(self.users.codes[index], self.users.values),
            items=Ids(self.items.codes[index], self.items.values),
            order=self.order[index],
            feedback={k: v[index] for k, v in self.feedback.items()},
            locate=self.locate.select(index) if isinstance(self.locate, LineLocator) else SelectedLocator(self.locate, keep),
        )
