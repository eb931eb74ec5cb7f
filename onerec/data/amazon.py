"""Amazon reviews in the two formats the generative-recommendation papers publish.

- 2014 (P5 / S3-Rec / TIGER): sequences.txt, `user item item ...` a line, already in time
  order (position is the order), plus items.jsonl with title and short_text.
- 2018 (LC-Rec / LETTER): <Name>.inter.json `{"user": [item, ...]}` in time order, plus
  <Name>.item.json `{"item": {"title", "description", "brand", "categories"}}`.
The item table is the catalogue in both.

A user must appear once: on one line of sequences.txt, under one key of the inter.json
object (a JSON parser would silently keep only the last). A repeat is an error naming both
places; with on_bad_rows: skip the first is kept and each repeat counted ("duplicate user
id"): the first line is the one the published sequence files are built from, and keeping it
whole is the only choice that never splices two histories together. Item ids may not be null
or empty.
"""

from __future__ import annotations

import json
from pathlib import Path

from onerec.data.errors import BadRows, DataError
from onerec.data.readers import open_text, read_text, require_file, split_lines
from onerec.data.schema import RawItems, RawLog


def load_amazon2014(root: Path, bad: BadRows) -> RawLog:
    seq_path = require_file(root / "sequences.txt", "sequences")
    users, items, order, lines = [], [], [], []
    first_line: dict[str, int] = {}
    for number, fields in split_lines(seq_path, None, 2, bad):
        user = fields[0]
        if user in first_line:
            bad.bad("duplicate user id", seq_path.name, number, "user",
                    f"user {user!r} is already on line {first_line[user]}; a user's items belong on one line")
            continue
        first_line[user] = number
        for position, item in enumerate(fields[1:]):
            if not item.isdecimal():
                bad.bad("non-numeric field", seq_path.name, number, f"item #{position + 1}", f"expected an integer item id, got {item!r}")
                continue
            users.append(user)
            items.append(item)
            order.append(position)
            lines.append(number)
    log = RawLog.from_lists(users, items, order, file=seq_path.name, lines=lines, has_time=False)
    items_path = root / "items.jsonl"
    if items_path.is_file():
        require_file(items_path, "items")
        ids, titles, short_texts, item_lines = [], [], [], []
        with open_text(items_path, newline=None) as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                    item_id = record["item_id"]
                # JSONDecodeError is a ValueError, and so is a number past int()'s 4,300 digits
                except (ValueError, KeyError, TypeError) as err:
                    bad.bad("malformed line", items_path.name, number, "item_id", f"expected a JSON object with item_id ({err})")
                    continue
                if not _usable_id(item_id, bad, items_path.name, number, "item_id"):
                    continue
                ids.append(str(item_id).strip())
                short = _text(record.get("short_text"))
                titles.append(_text(record.get("title")) or short)  # a few items have no title
                short_texts.append(short)
                item_lines.append(number)
        log.item_table = RawItems(ids, {"title": titles, "short_text": short_texts}, items_path.name, item_lines)
    return log


def _usable_id(value, bad: BadRows, file: str, line: int | str, field: str) -> bool:
    """An id must be an integer or a non-empty string: str(None) would become an item "None"
    (and its non-numeric id would switch the dense-id order to lexicographic)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        bad.bad("missing id", file, line, field, f"expected an id, got {json.dumps(value)}")
        return False
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        bad.bad("malformed line", file, line, field, f"expected an integer or string id, got {json.dumps(value)}")
        return False
    return True


def _text(value) -> str:
    """A text field as a string: null is empty, a list is its items joined with spaces."""
    if value is None:
        return ""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


class _RepeatedKeys(dict):
    """A JSON object that named a key twice; `pairs` keeps every (key, value) in file order."""

    def __init__(self, pairs: list) -> None:
        super().__init__(pairs)
        self.pairs = pairs


def _object_pairs(pairs: list) -> dict:
    keys = {key for key, _ in pairs}
    return _RepeatedKeys(pairs) if len(keys) < len(pairs) else dict(pairs)


def _read_json(path: Path):
    text = read_text(path)  # bytes that are not UTF-8: its own located DataError
    try:
        return json.loads(text, object_pairs_hook=_object_pairs)
    except json.JSONDecodeError as err:
        raise DataError(path.name, err.lineno, "*", f"invalid JSON: {err.msg}") from None
    except ValueError as err:  # a number past int()'s 4,300 digits: valid JSON Python cannot read
        raise DataError(path.name, "", "*", f"unreadable JSON: {err}") from None


def _entries(document: dict) -> list:
    """The top-level (key, value) pairs in file order, repeats included."""
    return document.pairs if isinstance(document, _RepeatedKeys) else list(document.items())


def _single(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if len(found) != 1:
        raise FileNotFoundError(f"{root}: expected exactly one {pattern}, found {[p.name for p in found]}")
    return require_file(found[0], pattern)


def load_amazon2018(root: Path, bad: BadRows) -> RawLog:
    inter_path = _single(root, "*.inter.json")
    sequences = _read_json(inter_path)
    if not isinstance(sequences, dict):
        raise DataError(inter_path.name, 1, "*", "expected a JSON object {user: [items]}")
    users, items, order, entries = [], [], [], []
    first_entry: dict[str, int] = {}
    for entry, (user, seq) in enumerate(_entries(sequences), start=1):
        if user in first_entry:
            bad.bad("duplicate user id", inter_path.name, f"entry {entry}", user,
                    f"user {user!r} is already entry {first_entry[user]}; a JSON object keeps only the last")
            continue
        first_entry[user] = entry
        if not isinstance(seq, list):
            bad.bad("malformed line", inter_path.name, f"entry {entry}", user, "expected a list of item ids")
            continue
        for position, item in enumerate(seq):
            if isinstance(item, bool) or not isinstance(item, (int, str)) or not str(item).isdecimal():
                bad.bad("non-numeric field", inter_path.name, f"entry {entry}", f"{user}[{position}]",
                        f"expected an integer item id, got {item!r}")
                continue
            users.append(str(user))
            items.append(str(item))
            order.append(position)
            entries.append(entry)
    log = RawLog.from_lists(users, items, order, file=inter_path.name, lines=entries, has_time=False)
    item_path = _single(root, "*.item.json")
    table = _read_json(item_path)
    if not isinstance(table, dict):
        raise DataError(item_path.name, 1, "*", "expected a JSON object {item: {title, ...}}")
    names = ("title", "description", "brand", "categories")
    ids, fields, entries_items = [], {n: [] for n in names}, []
    # a repeated item key reaches the item table twice; build_tables reports it (duplicate item id)
    for entry, (item, record) in enumerate(_entries(table), start=1):
        if not item.strip():
            bad.bad("missing id", item_path.name, f"entry {entry}", "item", "expected an id, got an empty key")
            continue
        record = record if isinstance(record, dict) else {}
        ids.append(str(item))
        for name in names:
            fields[name].append(_text(record.get(name) or ""))
        entries_items.append(entry)
    log.item_table = RawItems(ids, fields, item_path.name, entries_items)
    return log
