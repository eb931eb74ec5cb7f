"""A generic interaction log (CSV or Parquet) with a column mapping from DataConfig, read in
columns, batch by batch, in memory bounded by the columns it keeps.

Interactions: user_column, item_column, optional time_column (numbers in any one unit, or
ISO 8601 dates/date-times, or Arrow timestamp/date columns, which become seconds since 1970
UTC: see readers.parse_time; one source may not mix numbers and dates; empty means file order
is time order) and feedback_columns (numeric). Optional items_file with item_id_column and any
text columns (named in data.text_fields). Both may be a file, a directory or glob of shards,
or a URL (files.py). Parquet errors name the row (1-based) instead of the line.

How a batch is read (columns.py): each column is converted in one vectorised step that also
flags the rows it cannot settle for certain (a null, "1_000", " 7 ", an ISO date in a CSV).
Only those rows go through the per-row rules of readers.py, which keep or report them exactly
as a row-by-row reader would. A CSV file that pyarrow cannot read as a clean table (a line
with the wrong number of fields, bytes that are not UTF-8, a quote left open), or whose bad
rows must be located while on_bad_rows=error, is read again by the row-by-row reader, which
knows every line number; bad input costs time, never a wrong answer.

Kept per interaction: two int32 id codes, the int64 time and the float32 feedback, so 100M
rows need about 1.6 GB plus feedback, whatever the ids look like.
"""

from __future__ import annotations

import bisect
import csv
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from onerec.config import DataConfig
from onerec.data import columns
from onerec.data.errors import BadRows, DataError
from onerec.data.files import SourceFile, resolve_files
from onerec.data.readers import PARQUET_DAMAGE, allow_long_csv_fields, decoding_error, parse_number, parse_time
from onerec.data.schema import Ids, RawItems, RawLog
from onerec.logging import progress_disabled

log = logging.getLogger("onerec.data")

BATCH_ROWS = 1 << 20  # rows converted at once: bounds the memory of one batch's temporaries
CSV_BLOCK_BYTES = 16 << 20
ROWS_PER_FLUSH = 1 << 16  # the row-by-row reader hands over its rows in batches of this size


class _ReadRowByRow(Exception):
    """The CSV fast path gives this file up: the row-by-row reader reads it again."""


@dataclass(frozen=True)
class _Record:
    """Record `index` of a CSV file read by the fast path, whose line is not known yet."""

    source: SourceFile
    index: int


# --------------------------------------------------------------------------- where rows came from
@dataclass
class _Span:
    """The rows one file contributed to the log: rows start..start+kept of the RawLog."""

    source: SourceFile
    start: int
    kept: int = 0
    lines: np.ndarray | None = None  # row-by-row reader: the line of each kept row
    dropped: list[int] = field(default_factory=list)  # fast path: record indices not kept, ascending


def _record_of(kept_row: int, dropped: np.ndarray) -> int:
    """The record index of the `kept_row`-th kept record, when records `dropped` were not kept."""
    record = kept_row
    while True:
        candidate = kept_row + int(np.searchsorted(dropped, record, side="right"))
        if candidate == record:
            return record
        record = candidate


def _csv_line_of_record(source: SourceFile, record: int, delimiter: str) -> int:
    """The line (where the record ends, as the csv module counts) of record `record`, counting
    every record pyarrow parses (it skips empty lines). Only for an error message."""
    allow_long_csv_fields()
    with source.open_text() as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        next(reader, None)  # the header
        seen = -1
        for fields in reader:
            if fields:
                seen += 1
                if seen == record:
                    return reader.line_num
    raise AssertionError(f"{source.name}: record {record} not found")


@dataclass
class StreamLocator:
    """Row -> (file, line or row, noun) for a log read from several files."""

    spans: list[_Span]
    delimiter: str

    def __call__(self, row: int) -> tuple[str, int, str]:
        span = self.spans[bisect.bisect_right([s.start for s in self.spans], row) - 1]
        kept_row = row - span.start
        noun = "row" if span.source.kind == "parquet" else "line"
        if span.lines is not None:
            return span.source.name, int(span.lines[kept_row]), noun
        record = _record_of(kept_row, np.asarray(span.dropped, dtype=np.int64))
        if span.source.kind == "parquet":
            return span.source.name, record + 1, noun
        return span.source.name, _csv_line_of_record(span.source, record, self.delimiter), noun


# --------------------------------------------------------------------------- the per-row rules
@dataclass
class _Row:
    user: str
    item: str
    time: int
    is_date: bool
    feedback: list[float]


def _check_row(where, row: dict[str, str] | None, position: int, cfg: DataConfig, bad: BadRows, file: str) -> _Row | None:
    """One row as the row-by-row reader always judged it: the row, or None after reporting."""
    if row is None:
        required = 2 + bool(cfg.time_column) + len(cfg.feedback_columns)
        bad.bad("malformed line", file, where, "*", f"expected {required}+ comma-separated fields")
        return None
    time = parse_time(row[cfg.time_column], bad, file, where, cfg.time_column) if cfg.time_column else (position, False)
    values = [parse_number(row[name], bad, file, where, name) for name in cfg.feedback_columns]
    if time is None or any(v is None for v in values):
        return None
    user, item = row[cfg.user_column].strip(), row[cfg.item_column].strip()
    if not user or not item:
        field_name = cfg.user_column if not user else cfg.item_column
        bad.bad("missing id", file, where, field_name, "expected an id, got an empty or null value")
        return None
    return _Row(user, item, time[0], time[1], values)


def _row_texts(batch: pa.RecordBatch, rows: np.ndarray, names: list[str]) -> list[dict[str, str]]:
    """The values of `rows` as the text a row-by-row reader saw: CSV text as is; Parquet
    values as str() writes them (timestamps and dates as Arrow's ISO text), null as ""."""
    picked = batch.take(pa.array(rows, type=pa.int64()))
    texts = {}
    for name in names:
        column = picked.column(name)
        if columns.is_datetime(column.type):
            column = column.cast(pa.string())
        texts[name] = ["" if v is None else str(v) for v in column.to_pylist()]
    return [{name: texts[name][i] for name in names} for i in range(len(rows))]


def _global_codes(dictionary: columns.IdDictionary, local_values: pa.Array, local_codes: np.ndarray) -> np.ndarray:
    """Rows' codes in `dictionary`, from their codes into a batch's own dictionary. Only the
    entries some row uses are looked up (not a flagged row's empty id, say)."""
    used = np.zeros(len(local_values), dtype=bool)
    used[local_codes] = True
    entries = np.flatnonzero(used)
    lookup = np.zeros(len(local_values), dtype=np.int32)
    lookup[entries] = dictionary.codes(local_values.take(pa.array(entries)))
    return lookup[local_codes]


# --------------------------------------------------------------------------- the log reader
class _Column:
    """A growing column: preallocated when the row count is known (Parquet footers say it),
    so the whole log is never held twice; else a list of batches joined at the end."""

    def __init__(self, dtype, capacity: int | None) -> None:
        self.dtype = dtype
        try:  # pages are only touched as rows arrive: a footer that over-announces costs address space
            self.buffer = np.empty(capacity, dtype=dtype) if capacity is not None else None
        except (MemoryError, ValueError):  # a damaged footer announcing terabytes
            self.buffer = None
        self.parts: list[np.ndarray] = []
        self.size = 0

    def append(self, values: np.ndarray) -> None:
        if self.buffer is not None and self.size + len(values) <= len(self.buffer):
            self.buffer[self.size : self.size + len(values)] = values
        else:
            if self.buffer is not None:  # more rows than announced: keep what is there, go on in parts
                self.parts, self.buffer = [self.buffer[: self.size]], None
            self.parts.append(values)
        self.size += len(values)

    def truncate(self, size: int) -> None:
        """Back to the first `size` rows (a file the fast path gave up)."""
        if self.buffer is None:
            joined = self.values()
            self.parts = [joined[:size]]
        self.size = size

    def values(self) -> np.ndarray:
        if self.buffer is not None:
            return self.buffer[: self.size]
        return np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=self.dtype)


class _LogReader:
    """Reads the files of one log into columns: int32 id codes, int64 time, float32 feedback."""

    def __init__(self, cfg: DataConfig, bad: BadRows, capacity: int | None = None) -> None:
        self.cfg, self.bad = cfg, bad
        self.names = [cfg.user_column, cfg.item_column] + ([cfg.time_column] if cfg.time_column else []) + list(
            cfg.feedback_columns)
        self.users, self.items = columns.IdDictionary(), columns.IdDictionary()
        self.columns = {"user": _Column(np.int32, capacity), "item": _Column(np.int32, capacity),
                        "order": _Column(np.int64, capacity),
                        **{name: _Column(np.float32, capacity) for name in cfg.feedback_columns}}
        self.rows = 0
        self.position = 0  # records so far (the time order when there is no time column)
        # is_date -> ((file number, record or line), file, where): the first row of each kind of time
        self.first_of_kind: dict[bool, tuple[tuple[int, int], str, object]] = {}
        self.spans: list[_Span] = []
        self.on_rows = lambda count: None  # progress

    # -- output
    def _append(self, user: np.ndarray, item: np.ndarray, order: np.ndarray, feedback: list[np.ndarray]) -> None:
        self.columns["user"].append(user)
        self.columns["item"].append(item)
        self.columns["order"].append(order)
        for name, values in zip(self.cfg.feedback_columns, feedback):
            self.columns[name].append(values)
        self.rows += len(order)
        self.on_rows(len(order))

    def _note_kind(self, is_date: bool, at: int, file: str, where) -> None:
        """Row `at` (a record index, or a line) of the current file holds a time of this kind."""
        key = (len(self.spans) - 1, at)
        if is_date not in self.first_of_kind or key < self.first_of_kind[is_date][0]:
            self.first_of_kind[is_date] = (key, file, where)

    def result(self, description: str) -> RawLog:
        if len(self.first_of_kind) == 2:
            self._refuse_mixed_kinds()
        user, item, order = (self.columns.pop(name).values() for name in ("user", "item", "order"))
        feedback = {name: self.columns.pop(name).values() for name in self.cfg.feedback_columns}
        return RawLog(
            Ids(user, self.users.tolist()), Ids(item, self.items.tolist()), order, feedback, file=description,
            locate=StreamLocator(self.spans, self.cfg.csv_delimiter), has_time=bool(self.cfg.time_column),
        )

    def _refuse_mixed_kinds(self) -> None:
        """A time column that holds both numbers and dates is refused (readers.check_one_time_kind)."""
        (first, (_, first_file, first_at)), (second, (_, second_file, second_at)) = sorted(
            self.first_of_kind.items(), key=lambda kind: kind[1][0])
        first_at, second_at = (at() if callable(at) else at for at in (first_at, second_at))
        first_at = f"line {first_at}" if isinstance(first_at, int) else first_at
        if first_file != second_file:
            first_at += f" of {first_file}"
        kind = {False: "number", True: "date"}
        raise DataError(second_file, second_at, self.cfg.time_column,
                        f"a {kind[second]}, but the column held a {kind[first]} first, on {first_at}; use one kind of time")

    # -- one batch, columnar
    def _convert(self, batch: pa.RecordBatch, span: _Span, first_record: int, bad: BadRows, where_of) -> None:
        """Adds the usable rows of `batch` (its records first_record.. of the file). Rows that
        are blank in every field are no records at all (as for the csv module)."""
        cfg = self.cfg
        n = batch.num_rows
        present = np.ones(n, dtype=bool)
        if span.source.kind == "csv":
            empty = np.ones(n, dtype=bool)
            for column in batch.columns:
                empty &= columns.blank(column)
            present = ~empty
        positions = self.position + np.cumsum(present) - 1
        self.position += int(present.sum())

        user_local, user_text, flag = columns.ids(batch.column(cfg.user_column))
        item_local, item_text, item_flag = columns.ids(batch.column(cfg.item_column))
        flag = flag | item_flag
        if cfg.time_column:
            order, is_date, time_flag = columns.times(batch.column(cfg.time_column))
            flag |= time_flag
        else:
            order, is_date = positions, False
        feedback = []
        for name in cfg.feedback_columns:
            values, value_flag = columns.numbers(batch.column(name))
            feedback.append(values)
            flag |= value_flag
        flag &= present

        fast = present & ~flag
        fast_rows = np.flatnonzero(fast)
        user = _global_codes(self.users, user_text, user_local[fast_rows])
        item = _global_codes(self.items, item_text, item_local[fast_rows])
        if len(fast_rows):
            row = int(fast_rows[0])
            self._note_kind(is_date, first_record + row, span.source.name, where_of(row, first_record))
        out = [user, item, order[fast_rows], [v[fast_rows] for v in feedback]]

        slow_rows = np.flatnonzero(flag)
        if len(slow_rows):
            checked = self._check_rows(batch, slow_rows, positions, span, first_record, bad, where_of)
            if checked is not None:
                out, keep_slow = self._merge(out, fast_rows, slow_rows, checked)
                fast = fast.copy()
                fast[slow_rows[keep_slow]] = True
        span.dropped.extend((first_record + np.flatnonzero(~fast)).tolist())
        self._append(out[0], out[1], out[2], out[3])
        span.kept += len(out[2])

    def _check_rows(self, batch, rows, positions, span, first_record, bad, where_of):
        """The per-row rules on `rows` of `batch`: (row indices kept, their _Rows)."""
        texts = _row_texts(batch, rows, self.names)
        kept, parsed = [], []
        for row, text in zip(rows.tolist(), texts):
            where = where_of(row, first_record)
            checked = _check_row(where, text, int(positions[row]), self.cfg, bad, span.source.name)
            if checked is not None:
                kept.append(row)
                parsed.append(checked)
                self._note_kind(checked.is_date, first_record + row, span.source.name, where)
        return (np.asarray(kept, dtype=np.int64), parsed) if kept else None

    def _merge(self, out, fast_rows, slow_rows, checked):
        """The fast rows and the kept slow rows together, in file order."""
        kept_rows, parsed = checked
        user = self.users.codes(pa.array([r.user for r in parsed], type=pa.string()))
        item = self.items.codes(pa.array([r.item for r in parsed], type=pa.string()))
        order = np.asarray([r.time for r in parsed], dtype=np.int64)
        feedback = [np.asarray([r.feedback[j] for r in parsed], dtype=np.float32) for j in range(len(self.cfg.feedback_columns))]
        in_file_order = np.argsort(np.concatenate([fast_rows, kept_rows]), kind="stable")
        merged = [np.concatenate([a, b])[in_file_order] for a, b in zip(out[:3], (user, item, order))]
        merged_feedback = [np.concatenate([a, b])[in_file_order] for a, b in zip(out[3], feedback)]
        return [*merged, merged_feedback], np.isin(slow_rows, kept_rows)

    # -- Parquet
    def read_parquet(self, source: SourceFile, only_file: bool) -> None:
        handle = _open_parquet(source, self.names)
        if handle.metadata.num_rows == 0 and only_file:
            raise DataError(source.name, "", "*", "the file has no rows")
        span = _Span(source, self.rows)
        self.spans.append(span)
        record = 0
        for batch in _parquet_batches(source, handle, self.names):
            self._convert(batch, span, record, self.bad, lambda row, first: f"row {first + row + 1}")
            record += batch.num_rows

    # -- CSV
    def read_csv(self, source: SourceFile) -> None:
        """The fast path, or the row-by-row reader when the file needs it (see the docstring)."""
        # what to roll back to (ids the fast path added to the dictionaries may stay: unused codes are harmless)
        rows, position, spans, kinds = self.rows, self.position, len(self.spans), dict(self.first_of_kind)
        try:
            self._read_csv_columnar(source)
        except _ReadRowByRow:
            self.rows, self.position, self.first_of_kind = rows, position, kinds
            del self.spans[spans:]
            for column in self.columns.values():
                column.truncate(rows)
            self._read_csv_rows(source)

    def _read_csv_columnar(self, source: SourceFile) -> None:
        # a record with the wrong number of fields is an ArrowInvalid: the row-by-row reader takes over
        parse = pacsv.ParseOptions(delimiter=self.cfg.csv_delimiter, newlines_in_values=True)
        try:
            with source.open_arrow() as stream:
                header = pacsv.open_csv(stream, read_options=pacsv.ReadOptions(block_size=1 << 16), parse_options=parse).schema.names
        except (pa.ArrowException, OSError, ValueError):
            raise _ReadRowByRow from None
        if len(set(header)) != len(header) or any(c not in header for c in self.names):
            raise _ReadRowByRow
        convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in header}, strings_can_be_null=False,
                                       quoted_strings_can_be_null=False, check_utf8=True)
        local_bad = BadRows("skip")  # the fast path cannot name lines: an error is located row by row
        span = _Span(source, self.rows)
        self.spans.append(span)
        record = 0
        try:
            with source.open_arrow() as stream:
                reader = pacsv.open_csv(stream, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                                        parse_options=parse, convert_options=convert)
                for batch in reader:
                    self._convert(batch, span, record, local_bad, lambda row, first: _Record(source, first + row))
                    if local_bad.counts and self.bad.policy == "error":
                        raise _ReadRowByRow
                    record += batch.num_rows
        except (pa.ArrowException, OSError, ValueError):
            raise _ReadRowByRow from None
        self.bad.merge(local_bad)
        for is_date, (key, file, where) in list(self.first_of_kind.items()):
            if isinstance(where, _Record):  # its line is found only if an error needs it
                self.first_of_kind[is_date] = (key, file, lambda at=where: _csv_line_of_record(
                    at.source, at.index, self.cfg.csv_delimiter))

    def _read_csv_rows(self, source: SourceFile) -> None:
        """The row-by-row reader: every line number known, every rule applied in file order."""
        span = _Span(source, self.rows)
        self.spans.append(span)
        pending: list[_Row] = []
        lines: list[int] = []

        def flush() -> None:
            if not pending:
                return
            self._append(
                self.users.codes(pa.array([r.user for r in pending], type=pa.string())),
                self.items.codes(pa.array([r.item for r in pending], type=pa.string())),
                np.asarray([r.time for r in pending], dtype=np.int64),
                [np.asarray([r.feedback[j] for r in pending], dtype=np.float32) for j in range(len(self.cfg.feedback_columns))],
            )
            pending.clear()

        for where, row in _csv_rows(source, self.cfg, self.names):
            checked = _check_row(where, row, self.position, self.cfg, self.bad, source.name)
            self.position += 1
            if checked is None:
                continue
            pending.append(checked)
            lines.append(where)
            self._note_kind(checked.is_date, where, source.name, where)
            if len(pending) >= ROWS_PER_FLUSH:
                flush()
        flush()
        span.kept = len(lines)
        span.lines = np.asarray(lines, dtype=np.int64)


def _unreadable_parquet(source: SourceFile, err: BaseException) -> DataError:
    reason = " ".join(str(err).split()) or type(err).__name__
    return DataError(source.name, "", "*", f"not a readable Parquet file ({reason[:300]})")


def _parquet_file(source: SourceFile) -> pq.ParquetFile:
    return pq.ParquetFile(source.path if source.is_local else source.fs.open(source.path, "rb"))


def _open_parquet(source: SourceFile, required: list[str]) -> pq.ParquetFile:
    """The file with its footer read and every required column present, or a DataError naming it."""
    try:
        handle = _parquet_file(source)
        names = handle.schema_arrow.names
    except PARQUET_DAMAGE as err:
        raise _unreadable_parquet(source, err) from None
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(source.name, "header", missing[0], f"column not found; the file has {names}")
    return handle


def _parquet_batches(source: SourceFile, handle: pq.ParquetFile, columns: list[str]):
    """The file's record batches of `columns`, each fully validated (offsets, and UTF-8 in
    string columns, which pyarrow does not check on read); damage is a DataError naming it."""
    batches = handle.iter_batches(batch_size=BATCH_ROWS, columns=list(dict.fromkeys(columns)))
    while True:
        try:
            batch = next(batches, None)
            if batch is not None:
                batch.validate(full=True)
        except PARQUET_DAMAGE as err:
            raise _unreadable_parquet(source, err) from None
        if batch is None:
            return
        yield batch


def _csv_rows(source: SourceFile, cfg: DataConfig, required: list[str]):
    """(line, {column: text}) per non-blank record, or (line, None) for a record with the
    wrong number of fields; the header must name every required column."""
    allow_long_csv_fields()
    try:
        with source.open_text() as handle:
            reader = csv.reader(handle, delimiter=cfg.csv_delimiter)
            header = next(reader, None)
            if header is None:
                raise DataError(source.name, 1, "*", "the file is empty")
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(source.name, 1, missing[0], f"column not found in the header {header}")
            for record in reader:
                if not record or not any(value.strip() for value in record):
                    continue
                if len(record) != len(header):
                    yield reader.line_num, None
                    continue
                yield reader.line_num, dict(zip(header, record))
    except UnicodeDecodeError:
        raise decoding_error(source.name, source.open_binary, "utf-8") from None


def _parquet_rows(source: SourceFile, required: list[str]):
    """(where, {column: text}) per row of a Parquet file, as _row_texts writes values."""
    columns = list(dict.fromkeys(required))
    row = 0
    for batch in _parquet_batches(source, _open_parquet(source, columns), columns):
        for text in _row_texts(batch, np.arange(batch.num_rows), columns):
            row += 1
            yield f"row {row}", text
    if row == 0:
        raise DataError(source.name, "", "*", "the file has no rows")


def _item_table(cfg: DataConfig, bad: BadRows) -> RawItems:
    """The items file(s): ids and text fields as Python lists (sized by the catalogue)."""
    sources = resolve_files(cfg.items_file, cfg.root, "items file", cfg.format)
    text_columns = list(cfg.text_fields)
    required = [cfg.item_id_column] + text_columns
    ids, fields, lines, files = [], {c: [] for c in text_columns}, [], []
    for source in sources:
        rows = _csv_rows(source, cfg, required) if source.kind == "csv" else _parquet_rows(source, required)
        for where, row in rows:
            if row is None:
                bad.bad("malformed line", source.name, where, "*", "wrong number of fields")
                continue
            if not row[cfg.item_id_column].strip():
                bad.bad("missing id", source.name, where, cfg.item_id_column, "expected an id, got an empty or null value")
                continue
            ids.append(row[cfg.item_id_column].strip())
            for column in text_columns:
                fields[column].append(row[column])
            lines.append(where if isinstance(where, int) else int(where.split()[1]))
            files.append(source.name)
    if "title" not in fields:
        fields["title"] = list(ids)
    return RawItems(ids, fields, sources[0].name if len(sources) == 1 else cfg.items_file, lines,
                    files=files if len(sources) > 1 else None)


def _parquet_rows_announced(sources: list[SourceFile]) -> int | None:
    """The rows the Parquet footers announce, when every file is Parquet and readable (a
    damaged one is reported when it is read)."""
    if any(source.kind != "parquet" for source in sources):
        return None
    try:
        return sum(_parquet_file(source).metadata.num_rows for source in sources)
    except PARQUET_DAMAGE:
        return None


def load_generic(cfg: DataConfig, bad: BadRows) -> RawLog:
    default_kind = "parquet" if cfg.format == "parquet" else "csv"
    sources = resolve_files(cfg.interactions_file, cfg.root, "interactions file", default_kind)
    reader = _LogReader(cfg, bad, capacity=_parquet_rows_announced(sources))
    with tqdm(desc="data: reading", unit=" rows", unit_scale=True, disable=progress_disabled()) as bar:
        reader.on_rows = bar.update
        for source in sources:
            if source.kind == "parquet":
                reader.read_parquet(source, only_file=len(sources) == 1)
            else:
                reader.read_csv(source)
    description = sources[0].name if len(sources) == 1 else cfg.interactions_file
    raw = reader.result(description)
    if cfg.items_file:
        raw.item_table = _item_table(cfg, bad)
    return raw
