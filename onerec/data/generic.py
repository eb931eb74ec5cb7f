"""A generic interaction log (CSV or Parquet) with a column mapping from DataConfig.

Interactions: user_column, item_column, optional time_column (numbers in any one unit, or
ISO 8601 dates/date-times, which become seconds since 1970 UTC: see readers.parse_time; one
file may not mix the two; empty means file order is time order) and feedback_columns
(numeric). Optional items_file with item_id_column and any text columns (named in
data.text_fields). Parquet errors name the row (1-based) instead of the line; Parquet
timestamp and date columns are read as the same ISO text a CSV would hold.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa

from onerec.config import DataConfig
from onerec.data.errors import BadRows, DataError
from onerec.data.readers import (
    allow_long_csv_fields, check_one_time_kind, open_text, parse_number, parse_time, read_parquet, require_file,
)
from onerec.data.schema import RawItems, RawLog


def _is_datetime(kind: pa.DataType) -> bool:
    return pa.types.is_timestamp(kind) or pa.types.is_date(kind)


def _rows(path: Path, cfg: DataConfig, required: list[str]):
    """(location, {column: str value}) for each row, plus a header check naming the missing column."""
    if path.suffix == ".parquet" or cfg.format == "parquet":
        table = read_parquet(path)
        if table.num_rows == 0:
            raise DataError(path.name, "", "*", "the file has no rows")
        missing = [c for c in required if c not in table.column_names]
        if missing:
            raise DataError(path.name, "header", missing[0], f"column not found; the file has {table.column_names}")
        # timestamps and dates as ISO text (what a CSV would hold), so both formats share parse_time
        columns = {name: (column.cast(pa.string()) if _is_datetime(column.type) else column).to_pylist()
                   for name, column in zip(table.column_names, table.columns)}
        for i in range(table.num_rows):
            yield f"row {i + 1}", {name: ("" if values[i] is None else str(values[i])) for name, values in columns.items()}
        return
    allow_long_csv_fields()
    with open_text(path) as handle:
        reader = csv.reader(handle, delimiter=cfg.csv_delimiter)
        header = next(reader, None)
        if header is None:
            raise DataError(path.name, 1, "*", "the file is empty")
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(path.name, 1, missing[0], f"column not found in the header {header}")
        for record in reader:
            if not record or not any(field.strip() for field in record):
                continue
            if len(record) != len(header):
                yield reader.line_num, None
                continue
            yield reader.line_num, dict(zip(header, record))


def load_generic(root: Path, cfg: DataConfig, bad: BadRows) -> RawLog:
    path = require_file(root / cfg.interactions_file, "interactions file")
    required = [cfg.user_column, cfg.item_column] + ([cfg.time_column] if cfg.time_column else []) + list(cfg.feedback_columns)
    users, items, times, lines = [], [], [], []
    feedback = {name: [] for name in cfg.feedback_columns}
    first_of_kind: dict[bool, object] = {}  # is_date -> where the time column first held that kind
    for position, (where, row) in enumerate(_rows(path, cfg, required)):
        if row is None:
            bad.bad("malformed line", path.name, where, "*", f"expected {len(required)}+ comma-separated fields")
            continue
        time = parse_time(row[cfg.time_column], bad, path.name, where, cfg.time_column) if cfg.time_column else (position, False)
        values = {name: parse_number(row[name], bad, path.name, where, name) for name in cfg.feedback_columns}
        if time is None or any(v is None for v in values.values()):
            continue
        if not row[cfg.user_column].strip() or not row[cfg.item_column].strip():
            field = cfg.user_column if not row[cfg.user_column].strip() else cfg.item_column
            bad.bad("missing id", path.name, where, field, "expected an id, got an empty or null value")
            continue
        users.append(row[cfg.user_column].strip())
        items.append(row[cfg.item_column].strip())
        times.append(time[0])
        first_of_kind.setdefault(time[1], where)
        for name in cfg.feedback_columns:
            feedback[name].append(values[name])
        lines.append(where if isinstance(where, int) else int(where.split()[1]))
    check_one_time_kind(first_of_kind, path.name, cfg.time_column)
    log = RawLog(
        users, items, np.asarray(times, dtype=np.int64),
        {k: np.asarray(v, dtype=np.float32) for k, v in feedback.items()},
        file=path.name, lines=np.asarray(lines, dtype=np.int64), has_time=bool(cfg.time_column),
    )
    if cfg.items_file:
        item_path = require_file(root / cfg.items_file, "items file")
        text_columns = [c for c in cfg.text_fields]
        ids, fields, item_lines = [], {c: [] for c in text_columns}, []
        for where, row in _rows(item_path, cfg, [cfg.item_id_column] + text_columns):
            if row is None:
                bad.bad("malformed line", item_path.name, where, "*", "wrong number of fields")
                continue
            if not row[cfg.item_id_column].strip():
                bad.bad("missing id", item_path.name, where, cfg.item_id_column, "expected an id, got an empty or null value")
                continue
            ids.append(row[cfg.item_id_column].strip())
            for column in text_columns:
                fields[column].append(row[column])
            item_lines.append(where if isinstance(where, int) else int(where.split()[1]))
        if "title" not in fields:
            fields["title"] = list(ids)
        log.item_table = RawItems(ids, fields, item_path.name, item_lines)
    return log
