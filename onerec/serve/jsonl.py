"""Request files for `onerec recommend --input`: one JSON object per line in, one per line
out, in input order.

    in:  {"id": "r1", "history": ["B001", "B002"], "user_id": 7}
    out: {"id": "r1", "items": [{"item_id": "B013", "score": -0.41, "title": "..."}, ...]}

Input fields: "history" (raw item ids, oldest first; ints are read as their decimal string)
and/or "user_id" (int or string); optional "id" (any JSON value, echoed back, null when
absent), "k" (default --top-k) and "exclude_history" (default: the export's
eval.exclude_history). Any other field is an error, so a misspelt "histroy" is not silently
an empty history. Blank lines are skipped (no output line).

A line that cannot be answered (not JSON, a wrong type, an unknown item id, k above the beam
width) becomes {"id": ..., "error": "FILE:LINE: field: what is wrong"} in its place, and the
other lines are still answered: one bad request in a million does not cost the rest. So does
a request whose search fails alone (a failed batch is retried one request at a time). The
caller (onerec/stages/recommend.py) then reports the failures and exits nonzero; in strict
mode it stops at the first bad line before writing anything, and at the first failed search.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, TextIO

from onerec.errors import DataError
from onerec.inference.recommend import Recommender, Request

log = logging.getLogger("onerec.recommend")

FIELDS = ("id", "history", "user_id", "k", "exclude_history")
JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
STDIO = "-"


@dataclass
class Line:
    """One non-blank input line: its number (1-based), echoed id, and either a checked request
    or the error that takes its place in the output."""

    number: int
    id: Any = None
    request: Optional[Request] = None
    error: Optional[str] = None
    where: str = ""  # FILE:LINE, for the messages about this line


def source_name(path: str) -> str:
    return "<stdin>" if path == STDIO else path


def read_lines(path: str) -> list[tuple[int, str]]:
    """(line number, text) of every non-blank line of `path` ("-": standard input)."""
    try:
        if path == STDIO:
            text = sys.stdin.read()
        else:
            file = Path(path)
            if not file.is_file():
                raise FileNotFoundError(f"--input {path}: no such file")
            text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"--input {source_name(path)}: not UTF-8 text ({err})") from None
    # Split at newlines only: str.splitlines would also split inside a JSON string holding U+2028.
    return [(number, line) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]


def parse_line(text: str, number: int, source: str, recommender: Recommender, k: int, beam_width: int) -> Line:
    """The Line for one input line; never raises for a bad request (see the module docstring)."""
    where = f"{source}:{number}"
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as err:
        return Line(number, error=f"{where}: not a JSON object ({err.msg} at column {err.colno})")
    if not isinstance(fields, dict):
        kind = JSON_TYPES.get(type(fields), type(fields).__name__)
        return Line(number, error=f"{where}: a JSON {kind}, expected an object such as "
                                  '{"history": ["ITEM", ...], "user_id": 7, "id": "r1"}')
    line = Line(number, id=fields.get("id"), where=where)
    unknown = [name for name in fields if name not in FIELDS]
    if unknown:
        line.error = f"{where}: unknown field(s) {', '.join(map(repr, unknown))}: expected {', '.join(FIELDS)}"
        return line
    history, user_id = fields.get("history"), fields.get("user_id")
    if history is None and user_id is None:
        line.error = f"{where}: history: missing (give a history, a user_id, or both)"
        return line
    try:
        line.request = recommender.prepare(
            [] if history is None else history, user_id, fields.get("k", k), fields.get("exclude_history"),
            beam_width, where=where,
        )
    except (TypeError, ValueError) as err:
        line.error = str(err)
    return line


# Characters str.splitlines breaks at that json.dumps(ensure_ascii=False) leaves as they are.
_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def json_line(record: dict) -> str:
    """`record` as one line of JSON: titles stay readable (not \\u-escaped), but nothing a
    line reader could split at."""
    text = json.dumps(record, ensure_ascii=False)
    for char, escaped in _LINE_BREAKS.items():
        text = text.replace(char, escaped)
    return text + "\n"


def answer_lines(recommender: Recommender, lines: list[Line], out: TextIO, progress=None, strict: bool = False) -> int:
    """Write one output line per Line, in order, searching `recommender.batch_size` requests
    at a time; `progress` (a tqdm bar or None) advances by the requests answered.

    A search that fails (not enough memory for the batch, a model error) is retried one
    request at a time, as the server does, so only the requests that fail alone get an
    error line ("the search failed: ..."); strict: the first such request is a DataError
    naming its line instead.
    Returns the number of requests whose search failed."""
    pending: list[Line] = []
    failed = 0

    def search(requests: list) -> list:
        """Answers in order, or for a failed request the exception it raised alone."""
        try:
            return recommender.run(requests)
        except Exception as err:  # noqa: BLE001 - any failure of the search stays inside this batch
            if len(requests) == 1:
                return [err]
            log.warning("a search of %d requests failed (%s: %s): retrying them one by one",
                        len(requests), type(err).__name__, err)
            return [search([request])[0] for request in requests]

    def flush() -> None:
        nonlocal failed
        answers = iter(search([line.request for line in pending if line.request is not None]))
        for line in pending:
            if line.request is None:
                record = {"id": line.id, "error": line.error}
            else:
                answer = next(answers)
                if isinstance(answer, Exception):
                    failed += 1
                    message = f"{line.where}: the search failed: {type(answer).__name__}: {answer}"
                    if strict:
                        raise DataError(f"{message} (--strict: nothing was written)") from answer
                    record = {"id": line.id, "error": message}
                else:
                    record = {"id": line.id, "items": [item.to_dict() for item in answer]}
            out.write(json_line(record))
        if progress is not None:
            progress.update(sum(line.request is not None for line in pending))
        pending.clear()

    waiting = 0
    for line in lines:
        pending.append(line)
        waiting += line.request is not None
        if waiting == recommender.batch_size:
            flush()
            waiting = 0
    flush()
    return failed


@contextmanager
def output_stream(path: str) -> Iterator[TextIO]:
    """Standard output for "-"; for a path, a temporary file beside it, renamed into place
    when the block ends without an exception (removed otherwise), so a reader never sees a
    half-written file."""
    if path == STDIO:
        yield sys.stdout
        sys.stdout.flush()
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"--output {path} is a directory: give a file path")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"--output {path}: the directory {target.parent} does not exist")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
