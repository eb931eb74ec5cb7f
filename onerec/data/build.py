"""Validate a RawLog and turn it into dense-id tables.

Rules (each bad case raises DataError naming file, line and field, or with
on_bad_rows: skip is dropped and counted):
- the item table may not define an id twice (skip keeps the first definition);
- an interaction may not name an item that the item table lacks;
- an exact duplicate row (same user, item, time and feedback) is a bad row ("duplicate row",
  skip keeps the first), unless the reader keeps them (RawLog.keep_duplicate_rows: KuaiRand),
  when they are counted in meta["duplicate_rows_kept"] and logged;
- a user needs at least `min_user_interactions` interactions (skip drops the user).
Item titles and text lose control characters (readers.strip_control).
The catalogue is the item table when the format has one (items nobody interacted with
stay rankable), else the set of interacted items. Dense ids follow the raw ids' natural
order: numerically when every id is a number, else lexicographically.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from onerec.config import DataConfig
from onerec.data.errors import BadRows
from onerec.data.readers import strip_control
from onerec.data.schema import Ids, RawLog
from onerec.errors import ConfigError, DataError

log = logging.getLogger("onerec.data")


def _number_key(raw_id: str) -> tuple[int, str]:
    """Sorts decimal ids in their integer order at any length: int() refuses strings of more
    than 4,300 digits (a 200 KB numeric id is data, not a reason to fail). Digits of other
    scripts (Arabic-Indic, full-width) count by their value, as int() reads them."""
    if not raw_id.isascii():
        raw_id = "".join(str(unicodedata.decimal(c)) for c in raw_id)
    digits = raw_id.lstrip("0")
    return len(digits), digits


def natural_order(ids: list[str]) -> list[str]:
    """Numerically when every id is a decimal number, else lexicographically. Equal numbers
    ("7", "007") keep their order in `ids`. Only decimal digits make a number: "²" passes
    str.isdigit() but is no integer."""
    if all(i.isdecimal() for i in ids):
        return sorted(ids, key=_number_key)
    return sorted(ids)


def natural_ranking(ids: list[str]) -> np.ndarray:
    """[len(ids)] int64: the indices that put distinct `ids` in natural order, as
    natural_order(sorted(ids)) lists them (equal numbers such as "7" and "007" as strings)."""
    ranking = sorted(range(len(ids)), key=ids.__getitem__)
    if all(i.isdecimal() for i in ids):
        ranking.sort(key=lambda i: _number_key(ids[i]))
    return np.asarray(ranking, dtype=np.int64)


class SortedInteractions(Mapping):
    """The interactions table in its final order (by user, then time; ties in file order),
    without building it: columns are gathered through `rows` when asked for, whole
    (`table["item_index"]`) or a slice at a time (`batches`), so writing 100M rows never
    holds a second copy of every column at once."""

    def __init__(self, rows: np.ndarray, sources: dict[str, tuple[np.ndarray, np.ndarray | None]]) -> None:
        self.rows = rows  # [kept] int64 positions in the RawLog, in output order
        self._sources = sources  # name -> (values per RawLog row, or codes; dense lookup per code or None)

    def __len__(self) -> int:
        return len(self._sources)

    def __iter__(self):
        return iter(self._sources)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.column(name, self.rows)

    def column(self, name: str, rows: np.ndarray) -> np.ndarray:
        values, lookup = self._sources[name]
        return values[rows] if lookup is None else lookup[values[rows]]

    def batches(self, size: int = 1 << 22):
        """{column: array} for consecutive slices of at most `size` rows."""
        for start in range(0, len(self.rows), size):
            rows = self.rows[start : start + size]
            yield {name: self.column(name, rows) for name in self._sources}


@dataclass
class Tables:
    items: dict  # item_index, raw_id, title, text
    interactions: SortedInteractions  # user_index, item_index, order, feedback...; sorted by user then order
    users: dict  # user_index, raw_id
    meta: dict


def _dedup_item_table(raw: RawLog, bad: BadRows) -> tuple[list[str], dict[str, int]]:
    table = raw.item_table
    first_row: dict[str, int] = {}
    for row, item in enumerate(table.ids):
        if item in first_row:
            file, earlier = table.where(first_row[item])
            earlier = f"line {earlier}" + (f" of {file}" if file != table.where(row)[0] else "")
            bad.bad("duplicate item id", *table.where(row), "item_id", f"item {item!r} is already defined on {earlier}")
            continue
        first_row[item] = row
    return list(first_row), first_row


def _item_texts(raw: RawLog, catalogue: list[str], table_row: dict[str, int], cfg: DataConfig) -> tuple[list[str], list[str]]:
    if raw.item_table is None:
        return list(catalogue), [f"item {i}" for i in catalogue]
    fields = raw.item_table.fields
    unknown = [f for f in cfg.text_fields if f not in fields]
    if unknown:
        raise ConfigError(f"data.text_fields: {unknown[0]!r} is not an item field of this format; available: {sorted(fields)}")
    fields = {name: strip_control(fields[name]) for name in {"title", *cfg.text_fields} if name in fields}
    titles, texts = [], []
    for item in catalogue:
        row = table_row[item]
        # Each distinct non-empty field once: a reader that fills a missing title from another
        # field (amazon2014: short_text) must not make that text count twice in the embedding.
        parts = list(dict.fromkeys(fields[f][row].strip() for f in cfg.text_fields if fields[f][row].strip()))
        title = fields["title"][row].strip() if "title" in fields else ""
        titles.append(title or item)
        texts.append("; ".join(parts) or f"item {item}")
    return titles, texts


def _repeats(keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(repeat, first): positions equal on every key to an earlier position, and the earliest
    such position. One sort; lexsort is stable, so each group starts with its first row."""
    n = len(keys[0])
    if n < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    by_key = np.lexsort(keys[::-1])
    same = np.ones(n - 1, dtype=bool)
    for key in keys:
        ordered = key[by_key]
        same &= ordered[1:] == ordered[:-1]
    group_start = np.maximum.accumulate(np.where(np.r_[True, ~same], np.arange(n), 0))
    return by_key[1:][same], by_key[group_start][1:][same]


def _same_user_and_time(raw: RawLog, by_user_time: np.ndarray, chunk: int = 1 << 23) -> np.ndarray:
    """The rows (ascending) that share user and time with another row: the only ones that can
    be exact duplicates. Such rows are neighbours in `by_user_time`; compared a slice at a time."""
    ties = []
    for start in range(0, max(len(by_user_time) - 1, 0), chunk):
        rows = by_user_time[start : start + chunk + 1]
        user, order = raw.users.codes[rows], raw.order[rows]
        at = np.flatnonzero((user[1:] == user[:-1]) & (order[1:] == order[:-1]))
        ties.append(rows[np.union1d(at, at + 1)])
    return np.unique(np.concatenate(ties)) if ties else np.zeros(0, dtype=np.int64)


def _duplicate_rows(raw: RawLog, by_user_time: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(repeat, first): each kept row that repeats an earlier kept one exactly (same user,
    item, time and feedback), in file order, and the earliest row it repeats. Columnar: item
    and feedback are compared only among the few rows that already share user and time."""
    rows = _same_user_and_time(raw, by_user_time)
    rows = rows[keep[rows]]
    # float bits, so NaN equals NaN (KuaiRand's unknown watch_ratio); +0.0 folds -0.0 into 0.0
    feedback = [(np.asarray(values[rows], dtype=np.float32) + np.float32(0)).view(np.int32)
                for _, values in sorted(raw.feedback.items())]
    repeat, first = _repeats([raw.users.codes[rows], raw.items.codes[rows], raw.order[rows], *feedback])
    repeat, first = rows[repeat], rows[first]
    in_file_order = np.argsort(repeat, kind="stable")
    return repeat[in_file_order], first[in_file_order]


def _drop_duplicate_rows(raw: RawLog, by_user_time: np.ndarray, keep: np.ndarray, bad: BadRows, meta: dict) -> None:
    """Clears `keep` for exact duplicate rows (or counts them, when the reader keeps them)."""
    if not raw.has_time:
        return  # the order is a position in the file: no two rows can share it
    repeat, first = _duplicate_rows(raw, by_user_time, keep)
    if not len(repeat):
        return
    if raw.keep_duplicate_rows:
        meta["duplicate_rows_kept"] = int(len(repeat))
        (file, line, _), (_, earlier, _) = raw.locate(repeat[0]), raw.locate(first[0])
        log.warning("kept %d exact duplicate row(s) (same user, item, time and feedback) of %s; the first: %s:%d repeats %d",
                    len(repeat), raw.file, file, line, earlier)
        return

    def first_duplicate():
        (file, line, noun), (_, earlier, _) = raw.locate(repeat[0]), raw.locate(first[0])
        return file, line, "*", f"same user, item, time and feedback as {noun} {earlier}"

    bad.bad_many("duplicate row", len(repeat), first_duplicate)
    keep[repeat] = False


def _drop_unknown_items(raw: RawLog, known: set[str], keep: np.ndarray, bad: BadRows) -> None:
    """Clears `keep` for interactions with an item the item table does not define."""
    known_code = np.fromiter((item in known for item in raw.items.values), dtype=bool, count=len(raw.items.values))
    unknown = np.flatnonzero(~known_code[raw.items.codes])

    def first_unknown():
        file, line, _ = raw.locate(unknown[0])
        item = raw.items.values[raw.items.codes[unknown[0]]]
        return file, line, "item", f"item {item!r} is not in the item table {raw.item_table.file}"

    bad.bad_many("unknown item id", len(unknown), first_unknown)
    keep[unknown] = False


def _drop_short_users(raw: RawLog, keep: np.ndarray, cfg: DataConfig, bad: BadRows) -> None:
    """Clears `keep` for every interaction of a user with fewer than data.min_user_interactions."""
    codes = raw.users.codes
    counts = np.bincount(codes[keep], minlength=len(raw.users.values))
    short = (counts > 0) & (counts < cfg.min_user_interactions)
    if not short.any():
        return

    def first_short_user():  # the error names the user whose id sorts first, at its first row
        user = min(np.flatnonzero(short).tolist(), key=raw.users.values.__getitem__)
        file, line, _ = raw.locate(int(np.flatnonzero(keep & (codes == user))[0]))
        return (file, line, "user", f"user {raw.users.values[user]!r} has {counts[user]} interactions; "
                f"data.min_user_interactions={cfg.min_user_interactions}")

    bad.bad_many("user with too few interactions", int(short.sum()), first_short_user)
    keep &= ~short[codes]


def _dense_index(ids: Ids, present: np.ndarray, ranking: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
    """(the present ids in natural order, [codes] int64 dense index of each code, -1 if
    absent). `ranking`: the natural order of every code, when already known and still valid."""
    if ranking is None:
        codes = np.flatnonzero(present)
        ranking = codes[natural_ranking([ids.values[c] for c in codes.tolist()])]
    else:
        ranking = ranking[present[ranking]]
    dense = np.full(len(ids.values), -1, dtype=np.int64)
    dense[ranking] = np.arange(len(ranking), dtype=np.int64)
    return [ids.values[c] for c in ranking.tolist()], dense


def _all_decimal(values: list[str], codes: np.ndarray) -> bool:
    return all(values[c].isdecimal() for c in codes.tolist())


def build_tables(raw: RawLog, cfg: DataConfig, bad: BadRows) -> Tables:
    if len(raw) == 0:
        raise DataError(f"{raw.file}: no usable interactions")
    keep = np.ones(len(raw), dtype=bool)
    table_row: dict[str, int] = {}
    if raw.item_table is not None:
        catalogue, table_row = _dedup_item_table(raw, bad)
        _drop_unknown_items(raw, table_row.keys(), keep, bad)
    # One stable sort of every row by (user in natural order, time), ties in file order: it
    # finds the duplicate candidates (neighbours) and, filtered, is the output order.
    user_ranking = natural_ranking(raw.users.values)
    user_rank = np.empty(len(user_ranking), dtype=np.int32)
    user_rank[user_ranking] = np.arange(len(user_ranking), dtype=np.int32)
    by_user_time = np.lexsort((raw.order, user_rank[raw.users.codes]))
    del user_rank
    extra_meta: dict = {}
    _drop_duplicate_rows(raw, by_user_time, keep, bad, extra_meta)
    _drop_short_users(raw, keep, cfg, bad)
    if not keep.any():
        raise DataError(f"{raw.file}: no user has at least {cfg.min_user_interactions} interactions")

    present = np.bincount(raw.users.codes[keep], minlength=len(raw.users.values)) > 0
    everyone = np.arange(len(raw.users.values))
    # natural order is numeric only when every id is a number: dropping users can change that
    same_rule = _all_decimal(raw.users.values, everyone) == _all_decimal(raw.users.values, np.flatnonzero(present))
    users, user_dense = _dense_index(raw.users, present, user_ranking if same_rule else None)
    rows = by_user_time[keep[by_user_time]]
    del by_user_time
    if not same_rule:  # re-sort by the new user order; lexsort is stable, so time and file order stay
        rows = rows[np.lexsort((raw.order[rows], user_dense[raw.users.codes[rows]]))]
    if raw.item_table is None:
        catalogue, item_dense = _dense_index(raw.items, np.bincount(raw.items.codes[keep], minlength=len(raw.items.values)) > 0)
    else:
        catalogue = natural_order(catalogue)
        position = {item: i for i, item in enumerate(catalogue)}
        item_dense = np.fromiter((position.get(item, -1) for item in raw.items.values), dtype=np.int64,
                                 count=len(raw.items.values))
    titles, texts = _item_texts(raw, catalogue, table_row, cfg)
    item_columns = {"item_index": np.arange(len(catalogue), dtype=np.int64), "raw_id": catalogue, "title": titles, "text": texts}
    if raw.item_table is not None and raw.item_table.features is not None:
        table_rows = np.fromiter((table_row[item] for item in catalogue), dtype=np.int64, count=len(catalogue))
        item_columns["features"] = raw.item_table.features[table_rows]
    interactions = SortedInteractions(rows, {
        "user_index": (raw.users.codes, user_dense),
        "item_index": (raw.items.codes, item_dense),
        "order": (raw.order, None),
        **{name: (values, None) for name, values in raw.feedback.items()},
    })
    return Tables(
        items=item_columns,
        interactions=interactions,
        users={"user_index": np.arange(len(users), dtype=np.int64), "raw_id": users},
        meta={
            "format": cfg.format,
            "users": len(users),
            "items": len(catalogue),
            "interactions": int(len(rows)),
            "has_time": raw.has_time,
            "feedback_columns": sorted(raw.feedback),
            "sequence_column": raw.sequence_column,
            "bad_rows": bad.summary(),
            **extra_meta,
        },
    )
