"""`onerec recommend --input requests.jsonl`: a request file answered line by line in input
order with the model loaded once; bad lines become error lines (exit 2 with a summary), or
stop the command before anything is written with --strict; stdin/stdout; and the old
`--history` form still prints its table."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest
from export_helpers import RAW_IDS as ID

from onerec.cli import main as cli_main
from onerec.inference.recommend import Recommender

GOOD = [
    {"id": "a", "history": [ID[1], ID[2]], "user_id": 7},
    {"id": 2, "history": []},
    {"history": [ID[3]], "user_id": "alice", "k": 2},
    {"id": ["any", "json"], "user_id": 5, "exclude_history": True},
    {"id": "e", "history": [ID[4], ID[5], ID[6], ID[7], ID[8]], "exclude_history": True},
]


@pytest.fixture(scope="module")
def expected(recommender):
    """What the Python API answers for GOOD, with the CLI's defaults (top-k 3, beam width 20)."""
    answers = []
    for line in GOOD:
        request = recommender.prepare(line.get("history", []), line.get("user_id"), line.get("k", 3),
                                      line.get("exclude_history"), beam_width=20)
        answers.append([r.to_dict() for r in recommender.run([request])[0]])
    return answers


def _write(path, lines: list) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def _check_items(got: list[dict], want: list[dict]) -> None:
    assert [item["item_id"] for item in got] == [item["item_id"] for item in want]
    assert [item["title"] for item in got] == [item["title"] for item in want]
    assert [item["score"] for item in got] == pytest.approx([item["score"] for item in want], abs=1e-5)


def _run(export_dir, *extra) -> int:
    return cli_main(["recommend", "--model", str(export_dir), "--top-k", "3", "--device", "cpu", *extra])


def test_good_lines_are_answered_in_input_order(export_dir, expected, tmp_path):
    requests, out = tmp_path / "requests.jsonl", tmp_path / "out.jsonl"
    _write(requests, GOOD[:2] + ["", "   "] + GOOD[2:])  # blank lines get no output line
    assert _run(export_dir, "--input", str(requests), "--output", str(out), "--batch-size", "2") == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["id"] for a in answers] == ["a", 2, None, ["any", "json"], "e"]
    for answer, want, line in zip(answers, expected, GOOD):
        assert set(answer) == {"id", "items"} and len(answer["items"]) == line.get("k", 3)
        _check_items(answer["items"], want)
    assert not {item["item_id"] for item in answers[4]["items"]} & set(GOOD[4]["history"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


BAD = [
    ("not json", r"requests.jsonl:2: not a JSON object \(Expecting value at column 1\)"),
    ('["a list"]', r"requests.jsonl:3: a JSON array, expected an object"),
    ({"id": "unknown", "history": [ID[1], "nope"]}, r"requests.jsonl:4: history: unknown item id\(s\) 'nope'"),
    ({"id": "typo", "histroy": [ID[1]]}, r"requests.jsonl:5: unknown field\(s\) 'histroy': expected id, history"),
    ({"id": "neither"}, r"requests.jsonl:6: history: missing \(give a history, a user_id, or both\)"),
    ({"id": "string", "history": ID[1]}, r"requests.jsonl:7: history: 'B001' is a str: expected a list"),
    ({"id": "float", "history": [ID[1], 1.5]}, r"requests.jsonl:8: history\[1\]: 1.5 is a float"),
    ({"id": "k0", "history": [ID[1]], "k": 0}, r"requests.jsonl:9: k=0: expected an integer >= 1"),
    ({"id": "wide", "history": [ID[1]], "k": 30}, r"requests.jsonl:10: k=30 is above the beam width 20"),
    ({"id": "user", "history": [ID[1]], "user_id": [1]}, r"requests.jsonl:11: user_id: \[1\] is a list"),
    ({"id": "flag", "history": [ID[1]], "exclude_history": 1}, r"requests.jsonl:12: exclude_history: 1 is not a bool"),
    ({"id": "long", "history": ID * 4}, r"requests.jsonl:13: history: 48 items, above the limit of 40"),
]


def test_bad_lines_become_error_lines_and_exit_2_with_a_summary(export_dir, expected, tmp_path, capsys):
    requests, out = tmp_path / "requests.jsonl", tmp_path / "out.jsonl"
    _write(requests, [GOOD[0]] + [line for line, _ in BAD] + [GOOD[1]])
    assert _run(export_dir, "--input", str(requests), "--output", str(out)) == 2
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers) == len(BAD) + 2
    _check_items(answers[0]["items"], expected[0])
    _check_items(answers[-1]["items"], expected[1])
    for answer, (line, message) in zip(answers[1:-1], BAD):
        assert set(answer) == {"id", "error"}, answer
        assert answer["id"] == (line.get("id") if isinstance(line, dict) else None)
        assert re.search(message, answer["error"]), (answer["error"], message)
    err = capsys.readouterr().err
    assert f"{len(BAD)} of {len(BAD) + 2} request(s) in {requests} could not be answered" in err
    assert "the first bad line: " + str(requests) + ":2: not a JSON object" in err


def test_a_failed_search_fails_only_its_line(export_dir, expected, tmp_path, capsys, monkeypatch):
    """A search that raises for one request (as a model error or a memory shortage would):
    its batch is retried one request at a time, so only that line gets an error; --strict
    stops instead, naming the line, with nothing written."""
    original = Recommender.run

    def run(self, requests):
        if any(self._index_of[ID[11]] in request.items for request in requests):
            raise RuntimeError("the model fell over")
        return original(self, requests)

    monkeypatch.setattr(Recommender, "run", run)
    requests, out = tmp_path / "requests.jsonl", tmp_path / "out.jsonl"
    _write(requests, [GOOD[0], {"id": "poison", "history": [ID[11]]}, GOOD[1]])
    assert _run(export_dir, "--input", str(requests), "--output", str(out)) == 2
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    _check_items(answers[0]["items"], expected[0])
    assert answers[1] == {"id": "poison", "error": f"{requests}:2: the search failed: RuntimeError: the model fell over"}
    _check_items(answers[2]["items"], expected[1])
    assert "1 of 3 request(s) in " + str(requests) + " could not be answered (0 bad line(s), 1 failed search(es)" in (
        capsys.readouterr().err)
    out.unlink()
    assert _run(export_dir, "--input", str(requests), "--output", str(out), "--strict") == 2
    assert not out.exists()
    assert f"{requests}:2: the search failed: RuntimeError: the model fell over (--strict" in capsys.readouterr().err


def test_strict_stops_at_the_first_bad_line_before_writing(export_dir, tmp_path, capsys):
    requests, out = tmp_path / "requests.jsonl", tmp_path / "out.jsonl"
    _write(requests, [GOOD[0], GOOD[1], BAD[2][0], BAD[0][0]])
    assert _run(export_dir, "--input", str(requests), "--output", str(out), "--strict") == 2
    assert not out.exists() and list(tmp_path.iterdir()) == [requests]
    err = capsys.readouterr().err
    assert f"{requests}:3: history: unknown item id(s) 'nope'" in err and "--strict: 2 bad line(s)" in err


def test_an_existing_output_is_replaced_only_when_done(export_dir, tmp_path):
    requests, out = tmp_path / "requests.jsonl", tmp_path / "out.jsonl"
    out.write_text("old answers\n")
    _write(requests, [GOOD[0], BAD[2][0]])
    assert _run(export_dir, "--input", str(requests), "--output", str(out), "--strict") == 2
    assert out.read_text() == "old answers\n"  # a refused run leaves the old file as it was
    assert _run(export_dir, "--input", str(requests), "--output", str(out)) == 2
    assert len(out.read_text().splitlines()) == 2


def test_stdin_to_stdout(export_dir, expected, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(json.dumps(line) + "\n" for line in GOOD)))
    assert _run(export_dir, "--input", "-") == 0  # --output defaults to stdout
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["id"] for a in answers] == [line.get("id") for line in GOOD]
    for answer, want in zip(answers, expected):
        _check_items(answer["items"], want)


def test_a_real_pipe_carries_only_answers_on_stdout(export_dir, expected):
    """`python -m onerec recommend --input - --output -` in its own process: logs and the
    progress bar go to stderr, stdout is JSON lines only."""
    lines = "".join(json.dumps(line) + "\n" for line in GOOD[:2])
    env = dict(os.environ, OMP_NUM_THREADS="1", ONEREC_NO_PROGRESS="0")
    done = subprocess.run(
        [sys.executable, "-m", "onerec", "recommend", "--model", str(export_dir), "--input", "-", "--output", "-",
         "--top-k", "3", "--device", "cpu"],
        input=lines, capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [a["id"] for a in answers] == ["a", 2]
    _check_items(answers[0]["items"], expected[0])
    assert "answered 2 of 2 request(s) from <stdin> -> <stdout>" in done.stderr


def test_unreadable_input_is_a_message_before_the_model_loads(tmp_path, capsys):
    assert _run(tmp_path / "no-export", "--input", str(tmp_path / "absent.jsonl")) == 2
    assert f"--input {tmp_path / 'absent.jsonl'}: no such file" in capsys.readouterr().err
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"history": ["caf\xe9"]}\n')
    assert _run(tmp_path / "no-export", "--input", str(latin1)) == 2
    assert f"--input {latin1}: not UTF-8 text" in capsys.readouterr().err


def test_a_line_separator_inside_a_string_is_not_a_new_line(export_dir, tmp_path):
    requests, out = tmp_path / "requests.jsonl", tmp_path / "out.jsonl"
    requests.write_text(json.dumps({"id": "a\u2028b", "history": [ID[1]]}, ensure_ascii=False) + "\n")
    assert _run(export_dir, "--input", str(requests), "--output", str(out)) == 0
    assert json.loads(out.read_text())["id"] == "a\u2028b"


def test_the_history_form_still_prints_its_table(export_dir, capsys):
    assert _run(export_dir, "--history", f"{ID[1]} {ID[2]}", "--user-id", "7") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["rank", "item", "log-prob", "title"] and len(lines) == 4
    assert all("Title" in line for line in lines[1:])
    assert _run(export_dir, "--history", f"{ID[1]} nope") == 2
    assert "--history: history: unknown item id(s) 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--history", "B001", "--input", "x.jsonl"], "not allowed with argument"),
        (["--history", "B001", "--output", "o.jsonl"], "--output goes with --input"),
        (["--history", "B001", "--strict"], "--strict goes with --input"),
        (["--input", "x.jsonl", "--user-id", "3"], "--user-id goes with --history"),
        (["--input", "x.jsonl", "--batch-size", "0"], "argument --batch-size: 0: expected an integer >= 1"),
        ([], "one of the arguments --history --input is required"),
    ],
)
def test_options_of_the_other_form_are_argparse_errors(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as done:
        cli_main(["recommend", "--model", str(tmp_path / "absent"), *extra])
    assert done.value.code == 2
    assert message in capsys.readouterr().err
