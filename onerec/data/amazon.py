"""Amazon reviews in the two formats the generative-recommendation papers publish.

- 2014 (P5 / S3-Rec / TIGER): sequences.txt, `user item item ...` a line, already in time
  order (position is the order), plus items.jsonl with title and short_text.
- 2018 (LC-Rec / LETTER): <Name>.inter.json `{"user": [item, ...]}` in time order, plus
  <Name>.item.json `{"item": {"title", "description", "brand", "categories"}}`.
The item table is the catalogue in both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from onerec.data.errors import BadRows, DataError
from onerec.data.readers import require_file, split_lines
from onerec.data.schema import RawItems, RawLog


def load_amazon2014(root: Path, bad: BadRows) -> RawLog:
    seq_path = require_file(root / "sequences.txt", "sequences")
    users, items, order, lines = [], [], [], []
    for number, fields in split_lines(seq_path, None, 2, bad):
        user = fields[0]
        for position, item in enumerate(fields[1:]):
            if not item.isdigit():
                bad.bad("non-numeric field", seq_path.name, number, f"item #{position + 1}", f"expected an integer item id, got {item!r}")
                continue
            users.append(user)
            items.append(item)
            order.append(position)
            lines.append(number)
    log = RawLog(users, items, np.asarray(order, dtype=np.int64), file=seq_path.name,
                 lines=np.asarray(lines, dtype=np.int64), has_time=False)
    items_path = root / "items.jsonl"
    if items_path.is_file():
        require_file(items_path, "items")
        ids, titles, short_texts, item_lines = [], [], [], []
        with open(items_path, encoding="utf-8") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                    item_id = record["item_id"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    bad.bad("malformed line", items_path.name, number, "item_id", f"expected a JSON object with item_id ({err})")
                    continue
                ids.append(str(item_id))
                short = record.get("short_text") or ""
                titles.append(record.get("title") or short)  # a few items have no title
                short_texts.append(short)
                item_lines.append(number)
        log.item_table = RawItems(ids, {"title": titles, "short_text": short_texts}, items_path.name, item_lines)
    return log


def _single(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if len(found) != 1:
        raise FileNotFoundError(f"{root}: expected exactly one {pattern}, found {[p.name for p in found]}")
    return require_file(found[0], pattern)


def load_amazon2018(root: Path, bad: BadRows) -> RawLog:
    inter_path = _single(root, "*.inter.json")
    try:
        sequences = json.loads(inter_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(inter_path.name, err.lineno, "*", f"invalid JSON: {err.msg}") from None
    if not isinstance(sequences, dict):
        raise DataError(inter_path.name, 1, "*", "expected a JSON object {user: [items]}")
    users, items, order, entries = [], [], [], []
    for entry, (user, seq) in enumerate(sequences.items(), start=1):
        if not isinstance(seq, list):
            bad.bad("malformed line", inter_path.name, f"entry {entry}", user, "expected a list of item ids")
            continue
        for position, item in enumerate(seq):
            if isinstance(item, bool) or not isinstance(item, (int, str)) or not str(item).isdigit():
                bad.bad("non-numeric field", inter_path.name, f"entry {entry}", f"{user}[{position}]",
                        f"expected an integer item id, got {item!r}")
                continue
            users.append(str(user))
            items.append(str(item))
            order.append(position)
            entries.append(entry)
    log = RawLog(users, items, np.asarray(order, dtype=np.int64), file=inter_path.name,
                 lines=np.asarray(entries, dtype=np.int64), has_time=False)
    item_path = _single(root, "*.item.json")
    try:
        table = json.loads(item_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(item_path.name, err.lineno, "*", f"invalid JSON: {err.msg}") from None
    names = ("title", "description", "brand", "categories")
    ids, fields, entries_items = [], {n: [] for n in names}, []
    for entry, (item, record) in enumerate(table.items(), start=1):
        record = record if isinstance(record, dict) else {}
        ids.append(str(item))
        for name in names:
            value = record.get(name) or ""
            fields[name].append(" ".join(value) if isinstance(value, list) else str(value))
        entries_items.append(entry)
    log.item_table = RawItems(ids, fields, item_path.name, entries_items)
    return log
