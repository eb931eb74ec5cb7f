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
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from onerec.config import DataConfig
from onerec.data.errors import BadRows
from onerec.data.readers import strip_control
from onerec.data.schema import RawLog
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


@dataclass
class Tables:
    items: dict  # item_index, raw_id, title, text
    interactions: dict  # user_index, item_index, order, feedback...; sorted by user then order
    users: dict  # user_index, raw_id
    meta: dict


def _dedup_item_table(raw: RawLog, bad: BadRows) -> tuple[list[str], dict[str, int]]:
    table = raw.item_table
    first_row: dict[str, int] = {}
    for row, item in enumerate(table.ids):
        if item in first_row:
            bad.bad("duplicate item id", table.file, table.lines[row], "item_id",
                    f"item {item!r} is already defined on line {table.lines[first_row[item]]}")
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
        parts = [fields[f][row].strip() for f in cfg.text_fields if fields[f][row].strip()]
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


def _duplicate_rows(raw: RawLog) -> tuple[np.ndarray, np.ndarray]:
    """(repeat, first): each row that repeats an earlier one exactly (same user, item, time and
    feedback), in file order, and the earliest row it repeats. Columnar: the feedback is
    compared only among the few rows that already share user, item and time."""
    user, item = (pa.array(ids, type=pa.string()).dictionary_encode().indices.to_numpy().astype(np.int64)
                  for ids in (raw.users, raw.items))
    ids = [(user << 32) | item, raw.order]  # dictionary indices are int32: the pair fits one int64
    repeat, first = _repeats(ids)
    rows = np.unique(np.concatenate([repeat, first]))
    # float bits, so NaN equals NaN (KuaiRand's unknown watch_ratio); +0.0 folds -0.0 into 0.0
    feedback = [(np.asarray(values[rows], dtype=np.float32) + np.float32(0)).view(np.int32)
                for _, values in sorted(raw.feedback.items())]
    repeat, first = _repeats([key[rows] for key in ids] + feedback)
    repeat, first = rows[repeat], rows[first]
    in_file_order = np.argsort(repeat, kind="stable")
    return repeat[in_file_order], first[in_file_order]


def _drop_duplicate_rows(raw: RawLog, bad: BadRows, meta: dict) -> RawLog:
    if not raw.has_time:
        return raw  # the order is a position in the file: no two rows can share it
    repeat, first = _duplicate_rows(raw)
    if not len(repeat):
        return raw
    if raw.keep_duplicate_rows:
        meta["duplicate_rows_kept"] = int(len(repeat))
        log.warning("kept %d exact duplicate row(s) (same user, item, time and feedback) of %s; the first: %s:%d repeats %d",
                    len(repeat), raw.file, raw.file, raw.lines[repeat[0]], raw.lines[first[0]])
        return raw
    noun = "row" if raw.file.endswith(".parquet") else "line"
    for row, earlier in zip(repeat.tolist(), first.tolist()):
        bad.bad("duplicate row", raw.file, int(raw.lines[row]), "*",
                f"same user, item, time and feedback as {noun} {int(raw.lines[earlier])}")
    keep = np.ones(len(raw), dtype=bool)
    keep[repeat] = False
    return raw.select(keep)


def build_tables(raw: RawLog, cfg: DataConfig, bad: BadRows) -> Tables:
    if len(raw) == 0:
        raise DataError(f"{raw.file}: no usable interactions")
    keep = np.ones(len(raw), dtype=bool)
    table_row: dict[str, int] = {}
    if raw.item_table is not None:
        catalogue, table_row = _dedup_item_table(raw, bad)
        for row, item in enumerate(raw.items):
            if item not in table_row:
                bad.bad("unknown item id", raw.file, int(raw.lines[row]), "item",
                        f"item {item!r} is not in the item table {raw.item_table.file}")
                keep[row] = False
    raw = raw.select(keep) if not keep.all() else raw
    extra_meta: dict = {}
    raw = _drop_duplicate_rows(raw, bad, extra_meta)

    user_codes, first_row, user_index_of_row = np.unique(
        np.asarray(raw.users, dtype=object), return_index=True, return_inverse=True
    )
    counts = np.bincount(user_index_of_row)
    short_users = np.flatnonzero(counts < cfg.min_user_interactions)
    if len(short_users):
        for u in short_users:
            bad.bad("user with too few interactions", raw.file, int(raw.lines[first_row[u]]), "user",
                    f"user {user_codes[u]!r} has {counts[u]} interactions; data.min_user_interactions={cfg.min_user_interactions}")
        raw = raw.select(~np.isin(user_index_of_row, short_users))
    if len(raw) == 0:
        raise DataError(f"{raw.file}: no user has at least {cfg.min_user_interactions} interactions")

    if raw.item_table is None:
        catalogue = natural_order(sorted(set(raw.items)))
    else:
        catalogue = natural_order(catalogue)
    item_index = {item: i for i, item in enumerate(catalogue)}
    users = natural_order(sorted(set(raw.users)))
    user_index = {user: i for i, user in enumerate(users)}
    user_col = np.fromiter((user_index[u] for u in raw.users), dtype=np.int64, count=len(raw))
    item_col = np.fromiter((item_index[i] for i in raw.items), dtype=np.int64, count=len(raw))
    # time order within a user; ties keep file order (lexsort is stable on the last key)
    order = np.lexsort((np.arange(len(raw)), raw.order, user_col))
    titles, texts = _item_texts(raw, catalogue, table_row, cfg)
    item_columns = {"item_index": np.arange(len(catalogue), dtype=np.int64), "raw_id": catalogue, "title": titles, "text": texts}
    if raw.item_table is not None and raw.item_table.features is not None:
        rows = np.fromiter((table_row[item] for item in catalogue), dtype=np.int64, count=len(catalogue))
        item_columns["features"] = raw.item_table.features[rows]
    interactions = {"user_index": user_col[order], "item_index": item_col[order], "order": raw.order[order]}
    interactions.update({name: values[order] for name, values in raw.feedback.items()})
    return Tables(
        items=item_columns,
        interactions=interactions,
        users={"user_index": np.arange(len(users), dtype=np.int64), "raw_id": users},
        meta={
            "format": cfg.format,
            "users": len(users),
            "items": len(catalogue),
            "interactions": int(len(raw)),
            "has_time": raw.has_time,
            "feedback_columns": sorted(raw.feedback),
            "sequence_column": raw.sequence_column,
            "bad_rows": bad.summary(),
            **extra_meta,
        },
    )
