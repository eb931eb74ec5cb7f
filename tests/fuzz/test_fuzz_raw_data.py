"""`onerec data` on raw files with bad rows, extreme numbers, wrong types, bad encodings and huge
fields: it succeeds with exactly the counts of the valid rows, or stops with a one-line user
error (exit 2); never a traceback, never a changed file outside the run directory.

The oracle is plain Python. Each example is a set of valid rows (at least
data.min_user_interactions = 3 per user, all times distinct, so no two rows are duplicates)
plus injected bad rows, each with exactly one fault. With data.on_bad_rows=skip the run
succeeds; data/meta.json counts the valid rows' distinct users and items (ids compare after
stripping surrounding whitespace, as documented) and the valid rows themselves, and its
bad_rows add up to the injected rows that count as bad (blank lines do not). With
on_bad_rows=error it stops at the first bad row, or, when none was injected, gives the same
counts. Damage to a file as a whole (bytes that are not UTF-8, a date in a numeric time
column, a Parquet file cut short) is an error in both modes.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given
from hypothesis import strategies as st

from fuzz_helpers import (
    Long, Outcome, Workspace, assert_success, assert_success_or_user_error, assert_user_error, fuzz_settings,
    outside_unchanged, run_cli, workspace,
)

HUGE = 200_000  # characters: beyond csv's default field cap of 131,072
INT64_MAX = 2**63 - 1
EXACT_FLOAT = 2**53  # integers below this survive a trip through a float


# --------------------------------------------------------------------------- what is expected
@dataclass
class Expected:
    """The oracle: counts of the valid rows, and what was injected."""

    users: set[str] = field(default_factory=set)  # stripped ids
    items: set[str] = field(default_factory=set)
    interactions: int = 0
    bad_rows: int = 0  # injected rows that on_bad_rows=skip drops and counts
    fatal: Optional[str] = None  # damage that stops the run in both modes (what it was)
    # False when the damage may change values without a trace (flipped bytes in a Parquet
    # file, which carries no checksums): then only "success or a user error" is checked
    counts_known: bool = True


def run_data(space: Workspace, fmt: str, policy: str, extra: list[str]) -> tuple[Outcome, Path]:
    """`onerec data` into a fresh run directory; (outcome, run directory)."""
    run = space.root / f"run-{policy}"
    argv = ["data", f"data.format={fmt}", f"data.root={space.raw}", f"run.out_dir={run}",
            f"data.on_bad_rows={policy}", *extra]
    with outside_unchanged(space.raw, space.sentinel):
        outcome = run_cli(argv)
    return outcome, run


def check_both_modes(space: Workspace, fmt: str, expected: Expected, extra: list[str], files: tuple[str, ...]) -> None:
    """The property of this module, for one example (see the module docstring); an error
    message names the raw file at fault (one of `files`)."""
    for policy in ("skip", "error"):
        outcome, run = run_data(space, fmt, policy, extra)
        assert_success_or_user_error(outcome)
        fails = expected.fatal is not None or (policy == "error" and expected.bad_rows > 0)
        if fails:
            assert_user_error(outcome)
            assert any(name in outcome.message for name in files), f"{outcome}: names none of {files}"
            # nothing half-written: no data/ output, no temporary directory left behind
            assert not (run / "data").exists() and not list(run.glob(".data*")), sorted(p.name for p in run.iterdir())
            continue
        if not expected.counts_known:
            continue
        assert_success(outcome)
        meta = json.loads((run / "data" / "meta.json").read_text())
        counts = (meta["users"], meta["items"], meta["interactions"])
        assert counts == (len(expected.users), len(expected.items), expected.interactions), (
            f"{outcome}: meta.json counts {counts}, the valid rows hold "
            f"{(len(expected.users), len(expected.items), expected.interactions)}; bad rows {meta['bad_rows']}"
        )
        assert sum(meta["bad_rows"].values()) == expected.bad_rows, (meta["bad_rows"], expected.bad_rows)


# --------------------------------------------------------------------------- ids, times, values
def ids(style: str) -> st.SearchStrategy[str]:
    """Raw ids: decimal numbers (numeric order; a few in other scripts' digits), words, or any
    text a UTF-8 file can hold (commas, quotes, newlines, NUL...), non-empty after stripping."""
    if style == "digits":
        return st.integers(0, 10**6).map(str) | st.sampled_from(["0", "007", "00", "１２", "٣"])
    if style == "words":
        return st.from_regex(r"[a-z]{1,6}[0-9]{0,3}", fullmatch=True)
    wild = st.characters(codec="utf-8", exclude_categories=("Cs",))
    return st.text(wild, min_size=1, max_size=8).filter(lambda s: s.strip())


def huge_id(style: str) -> str:
    return Long(("9" if style == "digits" else "x") * HUGE)


def time_texts(value: int) -> st.SearchStrategy[str]:
    """Ways to write the time `value` that parse back to it: padding, a sign, a fraction
    (truncated toward zero), an exponent; -0 for zero."""
    forms = [str(value), f" {value} ", f"{value}\t"]
    if value >= 0:
        forms.append(f"+{value}")
    if abs(value) < EXACT_FLOAT:
        sign = "-" if value < 0 else ""
        forms += [f"{value}.0", f"{value}e0", f"{sign}{abs(value)}.9"]
    if value == 0:
        forms += ["-0", "-0.0", "-0.9"]
    return st.sampled_from(forms)


def click_texts() -> st.SearchStrategy[str]:
    """Finite feedback values within float32 (the type they are stored as), in several spellings."""
    return st.floats(width=32, allow_nan=False, allow_infinity=False).map(repr) | st.sampled_from(
        ["0", "1", "-0.0", " 1 ", "1.", ".5", "1E3", "1e-45", "3.4028234e38", "-3.4028234e38"])


# bad values of a time column, with the reason on_bad_rows=skip counts them under
BAD_TIMES = {
    "inf": "time out of range", "-inf": "time out of range", "nan": "time out of range",
    "NaN": "time out of range", "Infinity": "time out of range", "1e308": "time out of range",
    "-1e308": "time out of range", "1e19": "time out of range", "9223372036854775808": "time out of range",
    "-9223372036854775809": "time out of range", "99999999999999999999": "time out of range",
    Long("9" * HUGE): "time out of range",  # a 200 KB number
    "abc": "non-numeric field", "": "non-numeric field", " ": "non-numeric field", "[1, 2]": "non-numeric field",
    "1,5": "non-numeric field", "0x10": "non-numeric field", "5\x00": "non-numeric field",
    "\ufeff5": "non-numeric field", "2024-13-01": "non-numeric field", "05/01/2024": "non-numeric field",
    Long("x" * HUGE): "non-numeric field",
}
# bad values of a feedback column
BAD_CLICKS = {
    "inf": "non-finite number", "-inf": "non-finite number", "nan": "non-finite number",
    "Infinity": "non-finite number", "1e39": "number out of range", "-3.5e38": "number out of range",
    "1e308": "number out of range", "abc": "non-numeric field", "": "non-numeric field",
    "[1, 2]": "non-numeric field", "1 2": "non-numeric field", "0x1p3": "non-numeric field",
    "\x00": "non-numeric field", "true": "non-numeric field", Long("x" * HUGE): "non-numeric field",
}
EMPTY_IDS = ["", " ", "\t", "\u3000"]
BLANK_LINES = ["", "   ", ",,,", " , ,\t, "]  # no field holds anything: not a row at all

# Damage that no policy can skip: the file is wrong as a whole.
BAD_BYTES = {
    "latin-1 byte": b"\xe9",
    "invalid byte": b"\xff",
    "lone continuation byte": b"\x80",
    "encoded lone surrogate": b"\xed\xa0\x80",
}


@dataclass(frozen=True)
class Row:
    user: str
    item: str
    time: str
    click: str


# --------------------------------------------------------------------------- generic CSV / Parquet
@st.composite
def valid_logs(draw, time_bound: int = INT64_MAX) -> tuple[list[Row], str]:
    """Valid rows: 1-4 users with 3-6 rows each, over 1-5 items, all times distinct."""
    style = draw(st.sampled_from(["digits", "words", "wild"]))
    strip = str.strip
    users = draw(st.lists(ids(style), min_size=1, max_size=4, unique_by=strip))
    items = draw(st.lists(ids(style), min_size=1, max_size=5, unique_by=strip))
    if draw(st.integers(0, 9)) == 0:  # a 200 KB id
        users[0] = huge_id(style)
    per_user = [draw(st.integers(3, 6)) for _ in users]
    times = draw(st.lists(st.integers(-time_bound - 1, time_bound), min_size=sum(per_user), max_size=sum(per_user),
                          unique=True))
    rows, t = [], iter(times)
    for user, count in zip(users, per_user):
        for _ in range(count):
            value = next(t)
            rows.append(Row(user, draw(st.sampled_from(items)), draw(time_texts(value)), draw(click_texts())))
    return rows, style


def expected_of(rows: list[Row]) -> Expected:
    """The counts of valid rows: distinct users and items (ids compare stripped), and rows."""
    return Expected(users={r.user.strip() for r in rows}, items={r.item.strip() for r in rows}, interactions=len(rows))


FAULTS = ["missing field", "extra field", "bad time", "bad click", "no user", "no item", "duplicate", "blank line"]


@st.composite
def csv_faults(draw, rows: list[Row], style: str) -> tuple[str, Optional[list[str]], Optional[str]]:
    """(fault, the bad row's fields or None for a raw blank line, the blank line's text)."""
    fault = draw(st.sampled_from(FAULTS))
    if fault == "blank line":
        return fault, None, draw(st.sampled_from(BLANK_LINES))
    if fault == "duplicate":  # the same values as a valid row, maybe spelt otherwise
        row = draw(st.sampled_from(rows))
        return fault, [row.user, row.item, row.time.strip(), row.click], None
    base = [draw(ids(style)), draw(ids(style)), str(draw(st.integers(0, 10**9))), "1"]
    if fault == "missing field":
        del base[draw(st.integers(0, 3))]
        if not any(f.strip() for f in base):
            base[0] = "u"
    elif fault == "extra field":
        base.insert(draw(st.integers(0, 4)), draw(st.sampled_from(["", "x", "1"])))
    elif fault == "bad time":
        base[2] = draw(st.sampled_from(sorted(BAD_TIMES)))
    elif fault == "bad click":
        base[3] = draw(st.sampled_from(sorted(BAD_CLICKS)))
    elif fault == "no user":
        base[0] = draw(st.sampled_from(EMPTY_IDS))
    elif fault == "no item":
        base[1] = draw(st.sampled_from(EMPTY_IDS))
    return fault, base, None


def _csv_line(fields: list[str], terminator: str) -> str:
    """One CSV record. Written with a CRLF terminator so that csv quotes a field holding
    either character (with "\n" alone, Python 3.11 leaves a bare "\r" unquoted)."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(fields)
    return out.getvalue()[: -len("\r\n")] + terminator


@fuzz_settings(45)
@given(data=st.data())
def test_generic_csv_counts_the_valid_rows_or_stops_with_a_message(fuzz_dir, data):
    """Generic CSV with malformed rows (missing/extra fields, an unterminated quote, blank
    lines), non-finite, huge and mistyped times and feedback, empty ids, exact duplicates,
    quoted fields holding commas, quotes, newlines and NUL, 200 KB fields, a byte-order mark,
    CRLF line ends, and bytes that are not UTF-8: the counts of the valid rows, or a message."""
    rows, style = data.draw(valid_logs(), label="valid rows")
    expected = expected_of(rows)
    terminator = data.draw(st.sampled_from(["\n", "\r\n"]), label="line end")
    lines = [_csv_line([r.user, r.item, r.time, r.click], terminator) for r in rows]
    for _ in range(data.draw(st.integers(0, 5), label="bad rows")):
        fault, fields, blank = data.draw(csv_faults(rows, style), label="fault")
        line = blank + terminator if fields is None else _csv_line(fields, terminator)
        lines.insert(data.draw(st.integers(0, len(lines))), line)
        expected.bad_rows += fault != "blank line"
    if data.draw(st.integers(0, 7), label="date among numbers") == 0:
        lines.insert(data.draw(st.integers(0, len(lines))), _csv_line(["u", "i", "2024-05-01", "1"], terminator))
        expected.fatal = "a date in a numeric time column"
    if data.draw(st.booleans(), label="ends in an unterminated quote"):
        lines.append('"u1,i1,5,1.0' + terminator)  # one field that runs to the end of the file
        expected.bad_rows += 1
    body = ("u,i,t,click" + terminator + "".join(lines)).encode("utf-8")
    if data.draw(st.booleans(), label="byte-order mark"):
        body = b"\xef\xbb\xbf" + body
    if data.draw(st.integers(0, 7), label="bad bytes") == 0:
        kind = data.draw(st.sampled_from(sorted(BAD_BYTES)), label="bad bytes kind")
        at = data.draw(st.integers(0, len(body)), label="bad bytes at")
        body = body[:at] + BAD_BYTES[kind] + body[at:]
        expected.fatal = kind
    with workspace(fuzz_dir) as space:
        (space.raw / "log.csv").write_bytes(body)
        check_both_modes(space, "csv", expected, _generic_columns("log.csv"), ("log.csv",))


def _generic_columns(file: str) -> list[str]:
    return [f"data.interactions_file={file}", "data.user_column=u", "data.item_column=i",
            "data.time_column=t", "data.feedback_columns=[click]"]


# Parquet: each column is written as text, or natively typed (a bad value must then be one
# that type can hold: null, NaN, inf, a float beyond int64 or float32).
BAD_NATIVE_TIMES = {"float64": [(None, "non-numeric field"), (float("nan"), "time out of range"),
                                (float("inf"), "time out of range"), (-1e308, "time out of range"),
                                (2.0**63, "time out of range")],
                    "int64": [(None, "non-numeric field")]}
BAD_NATIVE_CLICKS = {"float64": [(None, "non-numeric field"), (float("nan"), "non-finite number"),
                                 (float("-inf"), "non-finite number"), (1e39, "number out of range")],
                     "float32": [(None, "non-numeric field"), (float("nan"), "non-finite number"),
                                 (float("inf"), "non-finite number")]}


@st.composite
def parquet_faults(draw, rows: list[Row], style: str, time_type: str, click_type: str):
    """(fault, a bad row as {column: value})."""
    fault = draw(st.sampled_from(["bad time", "bad click", "no user", "no item", "duplicate"]))
    if fault == "duplicate":
        return fault, draw(st.sampled_from(rows))
    row = {"u": draw(ids(style)), "i": draw(ids(style)), "t": str(draw(st.integers(0, 10**9))), "click": "1"}
    if fault == "bad time":
        row["t"] = (draw(st.sampled_from(sorted(BAD_TIMES))) if time_type == "string"
                    else draw(st.sampled_from(BAD_NATIVE_TIMES[time_type]))[0])
    elif fault == "bad click":
        row["click"] = (draw(st.sampled_from(sorted(BAD_CLICKS))) if click_type == "string"
                        else draw(st.sampled_from(BAD_NATIVE_CLICKS[click_type]))[0])
    else:
        row["u" if fault == "no user" else "i"] = draw(st.sampled_from([None, *EMPTY_IDS]))
    return fault, Row(row["u"], row["i"], row["t"], row["click"])


def _typed(values: list, kind: str, parse) -> pa.Array:
    if kind == "string":
        return pa.array(values, pa.string())
    return pa.array([v if v is None or not isinstance(v, str) else parse(v) for v in values], kind)


def _time_value(text: str) -> int:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return int(float(text))


@fuzz_settings(35)
@given(data=st.data())
def test_generic_parquet_counts_the_valid_rows_or_stops_with_a_message(fuzz_dir, data):
    """Generic Parquet with time and feedback columns written as text (any bad text) or typed
    (null, NaN, inf, beyond int64 or float32), null and empty ids, exact duplicates, 200 KB
    fields, a column of lists where numbers belong, and a file cut short or with bytes added:
    the counts of the valid rows, or a message. With bytes flipped anywhere in the file (no
    checksums: values may change unseen) it is a message or a success, never a traceback."""
    time_type = data.draw(st.sampled_from(["string", "int64", "float64"]), label="time column")
    click_type = data.draw(st.sampled_from(["string", "float64", "float32"]), label="feedback column")
    bound = EXACT_FLOAT - 1 if time_type == "float64" else INT64_MAX
    rows, style = data.draw(valid_logs(bound), label="valid rows")
    if click_type == "float32":  # float32 spellings only: a float64 value would round
        rows = [Row(r.user, r.item, r.time, repr(float(pa.array([float(r.click)], pa.float32())[0].as_py())))
                for r in rows]
    expected = expected_of(rows)
    for _ in range(data.draw(st.integers(0, 5), label="bad rows")):
        fault, row = data.draw(parquet_faults(rows, style, time_type, click_type), label="fault")
        rows.insert(data.draw(st.integers(0, len(rows))), row)
        expected.bad_rows += 1
    clicks = _typed([r.click for r in rows], click_type, float)
    if data.draw(st.integers(0, 9), label="a column of lists") == 0:
        clicks = pa.array([[1.0, 2.0]] * len(rows), pa.list_(pa.float64()))
        expected.fatal = "a column of lists where numbers belong"
    table = pa.table({"u": pa.array([r.user for r in rows], pa.string()), "i": pa.array([r.item for r in rows], pa.string()),
                      "t": _typed([r.time for r in rows], time_type, _time_value), "click": clicks})
    with workspace(fuzz_dir) as space:
        path = space.raw / "log.parquet"
        pq.write_table(table, path)
        damage = data.draw(st.sampled_from(["none"] * 7 + ["cut short", "bytes added", "bytes flipped"]),
                           label="file damage")
        if damage != "none":
            body = bytearray(path.read_bytes())
            if damage == "cut short":
                del body[data.draw(st.integers(0, len(body) - 1), label="cut at"):]
            elif damage == "bytes added":
                body += data.draw(st.binary(min_size=1, max_size=64), label="added bytes")
            else:
                for _ in range(data.draw(st.integers(1, 3), label="flips")):
                    at = data.draw(st.integers(0, len(body) - 1), label="flip at")
                    body[at] ^= data.draw(st.integers(1, 255), label="flip mask")
            path.write_bytes(bytes(body))
            if damage == "bytes flipped":
                expected.counts_known = False
            else:
                expected.fatal = f"a Parquet file {damage}"
        check_both_modes(space, "parquet", expected, _generic_columns("log.parquet"), ("log.parquet",))


# --------------------------------------------------------------------------- Amazon 2014
TOKEN = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), min_size=1,
                max_size=8).filter(lambda s: not any(c.isspace() for c in s))
# item tokens that are not usable item ids, each counted once (not a number, or a number the
# item table lacks)
BAD_ITEM_TOKENS = ["x1", "-3", "1.5", "1e3", "٣", "²", "0x10", Long("9" * 5000), "99999999"]
BAD_ITEM_LINES = [
    "{", "not json", "[1, 2]", "5", '"str"', "null", "{}", '{"title": "no id"}',
    '{"item_id": null}', '{"item_id": ""}', '{"item_id": "  "}', '{"item_id": [1]}', '{"item_id": {"a": 1}}',
    '{"item_id": 1.5}', '{"item_id": true}', '{"item_id": NaN}', '{"item_id": Infinity}', '{"item_id": 1e400}',
    Long('{"item_id": ' + "9" * 5000 + "}"),  # beyond Python's 4,300-digit int conversion limit
]
TITLES = (st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)
          | st.sampled_from([None, ["a", "b"], {"k": 1}, 5, 1.5, True, "\x1b[31mred\x1b[0m", Long("x" * HUGE)]))


@fuzz_settings(40)
@given(data=st.data())
def test_amazon2014_counts_the_valid_rows_or_stops_with_a_message(fuzz_dir, data):
    """Amazon 2014 sequences.txt and items.jsonl with lines of one field, a user on two lines,
    item tokens that are not numbers or not in the item table, blank lines, JSON that is not
    an object, ids that are null, empty, lists, floats, NaN or huger than Python converts,
    repeated item ids, titles of any type and 200 KB, a byte-order mark and bytes that are
    not UTF-8: the counts of the valid rows, or a message."""
    style = data.draw(st.sampled_from(["digits", "tokens"]), label="user ids")
    user_ids = st.integers(0, 10**6).map(str) if style == "digits" else TOKEN
    users = data.draw(st.lists(user_ids, min_size=1, max_size=4, unique=True), label="users")
    if data.draw(st.integers(0, 9), label="huge user id") == 0:
        users[0] = huge_id("digits" if style == "digits" else "words")
    item_ids = data.draw(st.lists(st.integers(0, 10**9), min_size=1, max_size=6, unique=True), label="items")
    if data.draw(st.integers(0, 9), label="huge item id") == 0:
        item_ids[0] = int("7" * 4000)  # a long id, still within Python's int conversion limit
    item_tokens = [Long(str(i)) if i > 10**100 else str(i) for i in item_ids]
    expected = Expected(items=set(item_tokens))

    # sequences.txt: one line per user, then bad lines and tokens
    lines, own_line = [], {}
    for user in users:
        tokens = data.draw(st.lists(st.sampled_from(item_tokens), min_size=3, max_size=6), label="history")
        expected.users.add(user)
        expected.interactions += len(tokens)
        for _ in range(data.draw(st.integers(0, 2), label="bad tokens")):
            bad = data.draw(st.sampled_from(BAD_ITEM_TOKENS).filter(lambda t: t not in item_tokens), label="token")
            tokens.insert(data.draw(st.integers(0, len(tokens))), bad)
            expected.bad_rows += 1
        own_line[user] = " ".join([user, *tokens])
        lines.append(own_line[user])
    for _ in range(data.draw(st.integers(0, 3), label="bad lines")):
        fault = data.draw(st.sampled_from(["one field", "user again", "blank"]), label="line fault")
        if fault == "blank":
            lines.insert(data.draw(st.integers(0, len(lines))), data.draw(st.sampled_from(["", "  ", "\t", "\x0c"])))
            continue
        if fault == "one field":
            lines.insert(data.draw(st.integers(0, len(lines))), data.draw(user_ids))
        else:  # after the user's own line, whose items it must not join
            user = data.draw(st.sampled_from(users))
            after = lines.index(own_line[user])
            lines.insert(data.draw(st.integers(after + 1, len(lines))), f"{user} {item_tokens[0]} {item_tokens[-1]}")
        expected.bad_rows += 1

    # items.jsonl: one record per item, then bad records and repeated ids
    records = []
    for item in item_ids:
        as_text = data.draw(st.booleans(), label="id as a string")
        record = {"item_id": f" {item} " if as_text else item, "title": data.draw(TITLES, label="title")}
        if data.draw(st.booleans(), label="short text"):
            record["short_text"] = data.draw(TITLES, label="short text")
        records.append(json.dumps(record))
    for _ in range(data.draw(st.integers(0, 3), label="bad records")):
        if data.draw(st.booleans(), label="repeated id"):
            records.append(json.dumps({"item_id": data.draw(st.sampled_from(item_tokens)), "title": "again"}))
        else:
            records.insert(data.draw(st.integers(0, len(records))), data.draw(st.sampled_from(BAD_ITEM_LINES)))
        expected.bad_rows += 1
    if data.draw(st.booleans(), label="blank record lines"):
        records.insert(data.draw(st.integers(0, len(records))), "   ")

    files = {"sequences.txt": "\n".join(lines) + "\n", "items.jsonl": "\n".join(records) + "\n"}
    encoded = {name: text.encode("utf-8") for name, text in files.items()}
    if data.draw(st.booleans(), label="byte-order marks"):
        encoded = {name: b"\xef\xbb\xbf" + body for name, body in encoded.items()}
    if data.draw(st.integers(0, 7), label="bad bytes") == 0:
        name = data.draw(st.sampled_from(sorted(encoded)), label="damaged file")
        kind = data.draw(st.sampled_from(sorted(BAD_BYTES)), label="bad bytes kind")
        at = data.draw(st.integers(0, len(encoded[name])), label="bad bytes at")
        encoded[name] = encoded[name][:at] + BAD_BYTES[kind] + encoded[name][at:]
        expected.fatal = f"{kind} in {name}"
    with workspace(fuzz_dir) as space:
        for name, body in encoded.items():
            (space.raw / name).write_bytes(body)
        check_both_modes(space, "amazon2014", expected, [], tuple(encoded))
