"""The one schema every loader produces, before ids are made dense.

RawLog.interactions: one row per interaction, in file order:
    user (raw id str), item (raw id str), order (int64 timestamp, or position when the format
    has none), feedback columns (float32), and where it came from (file, line) for errors.
RawLog.items: the item table when the format has one: raw id, title, text fields, and
    for items without text (KuaiRand) a numeric feature matrix.
RawLog.sequence_column: when set, only interactions whose feedback in that column is > 0
    (e.g. clicked impressions) enter the user sequences the generator trains on; every
    interaction stays in the table for the reward model.
RawLog.keep_duplicate_rows: exact duplicate rows (same user, item, time and feedback) are
    bad rows unless the reader sets this because its source is known to log some events
    twice and its published results were made with them (KuaiRand); then they are kept,
    counted and logged (build.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RawItems:
    ids: list[str]
    fields: dict[str, list[str]]  # text fields by name ("title", "genres", ...), "" when missing
    file: str
    lines: list[int]
    features: np.ndarray | None = None  # [items, F] float32, rows aligned with ids


@dataclass
class RawLog:
    users: list[str]
    items: list[str]
    order: np.ndarray  # int64
    feedback: dict[str, np.ndarray] = field(default_factory=dict)  # float32 per column
    file: str = ""
    lines: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    has_time: bool = True
    item_table: RawItems | None = None
    sequence_column: str | None = None
    keep_duplicate_rows: bool = False

    def __len__(self) -> int:
        return len(self.users)

    def select(self, keep: np.ndarray) -> "RawLog":
        """Rows where `keep` is True (a boolean mask), everything else unchanged."""
        index = np.flatnonzero(keep)
        return RawLog(
            users=[self.users[i] for i in index],
            items=[self.items[i] for i in index],
            order=self.order[index],
            feedback={k: v[index] for k, v in self.feedback.items()},
            file=self.file,
            lines=self.lines[index],
            has_time=self.has_time,
            item_table=self.item_table,
            sequence_column=self.sequence_column,
            keep_duplicate_rows=self.keep_duplicate_rows,
        )
