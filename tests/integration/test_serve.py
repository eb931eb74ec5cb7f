"""`onerec serve`: a real server process on a free port, spoken to over real HTTP (urllib).
It answers what the Python API answers, gathers concurrent requests into shared searches,
refuses bad input with a 4xx and a message and keeps serving, fails only the request whose
search fails (500), and stops cleanly on SIGTERM."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from export_helpers import NUM_ITEMS, RAW_IDS as ID

from onerec.inference.recommend import Recommender

BEAM_WIDTH = 6  # the tiny export's eval.beam_width: the server's default


def start_server(export_dir: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`python -m onerec serve --port 0 ...` and its URL, once /health answers."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "w") as stream:
        process = subprocess.Popen(
            [sys.executable, "-m", "onerec", "serve", "--model", str(export_dir), "--port", "0", "--device", "cpu",
             *extra],
            stdout=stream, stderr=subprocess.STDOUT, env=env,
        )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", log.read_text())
        if found:
            try:
                if call(found.group(1), "/health")[0] == 200:
                    return process, found.group(1)
            except OSError:
                pass
        if process.poll() is not None:
            pytest.fail(f"onerec serve exited with {process.returncode}:\n{log.read_text()}")
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"onerec serve did not answer /health within 90 s:\n{log.read_text()}")


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def call(url: str, path: str, body=None, raw: bytes | None = None, kind: str = "application/json") -> tuple[int, dict]:
    """(status, JSON body): GET without a body, else POST of `body` as JSON (or `raw` bytes)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": kind})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def server(export_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    process, url = start_server(export_dir, log, "--max-wait-ms", "30", "--max-batch-size", "16")
    yield url
    if process.poll() is None:
        stop(process)


def expected(recommender: Recommender, body: dict) -> list[dict]:
    """The Python API's answer for a request body, at the server's beam width."""
    request = recommender.prepare(body.get("history", []), body.get("user_id"), body.get("k", 6),
                                  body.get("exclude_history"), BEAM_WIDTH)
    return [r.to_dict() for r in recommender.run([request])[0]]


def same(got: list[dict], want: list[dict]) -> bool:
    return [g["item_id"] for g in got] == [w["item_id"] for w in want] and all(
        abs(g["score"] - w["score"]) < 1e-5 and g["title"] == w["title"] for g, w in zip(got, want)
    )


BODIES = [
    {"history": [ID[1], ID[2]], "user_id": 7, "k": 3, "id": "a"},
    {"history": [], "k": 5},  # an empty history is answered from the start token
    {"user_id": "alice"},
    {"history": [ID[3], ID[4], ID[5], ID[6], ID[7]], "exclude_history": True, "k": 6},
    {"history": [ID[9]], "user_id": 2, "k": 1, "exclude_history": False},
]


def test_health_names_the_model_and_its_settings(server, export_dir):
    status, health = call(server, "/health")
    assert status == 200
    assert health["status"] == "ok" and health["model"] == str(export_dir)
    assert health["items"] == NUM_ITEMS and health["device"] == "cpu"
    assert health["beam_width"] == BEAM_WIDTH and health["max_history_items"] == 40 and health["user_ids"] is True
    assert health["max_batch_size"] == 16 and health["max_wait_ms"] == 30


def test_answers_equal_the_python_api(server, recommender):
    for body in BODIES:
        status, answer = call(server, "/recommend", body)
        assert status == 200, answer
        assert answer["id"] == body.get("id")
        assert same(answer["items"], expected(recommender, body)), (body, answer)
    _, excluded = call(server, "/recommend", BODIES[3])
    assert not {item["item_id"] for item in excluded["items"]} & set(BODIES[3]["history"])


def test_concurrent_requests_are_answered_correctly_and_share_searches(server, recommender):
    bodies = [{"history": [ID[i % NUM_ITEMS], ID[(3 * i) % NUM_ITEMS]], "user_id": i, "k": 1 + i % 6, "id": i}
              for i in range(32)]
    before = call(server, "/health")[1]["searches"]
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda body: call(server, "/recommend", body), bodies))
    searches = call(server, "/health")[1]["searches"] - before
    for body, (status, answer) in zip(bodies, answers):
        assert status == 200 and answer["id"] == body["id"], answer
        assert same(answer["items"], expected(recommender, body)), (body, answer)
    assert 1 <= searches < len(bodies)  # gathered: fewer searches than requests


def test_the_batch_route_answers_each_entry(server, recommender):
    status, answer = call(server, "/recommend/batch", {"requests": [BODIES[0], {"history": ["nope"], "id": "x"}, 7,
                                                                    BODIES[1]]})
    assert status == 200
    first, unknown, not_object, last = answer["results"]
    assert same(first["items"], expected(recommender, BODIES[0])) and first["id"] == "a"
    assert unknown == {"id": "x", "error": unknown["error"]} and "requests.1: history: unknown item id(s) 'nope'" in (
        unknown["error"])
    assert not_object["error"] == "requests.2: expected a JSON object, got 7"
    assert same(last["items"], expected(recommender, BODIES[1]))


BAD = [
    ({"history": [ID[1], "nope"]}, 422, r"request: history: unknown item id\(s\) 'nope' \(position 1\)"),
    ({"history": ID * 4}, 422, r"history: 48 items, above the limit of 40 per request"),
    ({"history": [ID[1], 1.5]}, 422, r"history\.1: expected a string or an integer, got 1\.5"),
    ({"history": ID[1]}, 422, r"history: Input should be a valid list"),
    ({"history": [ID[1]], "k": "3"}, 422, r"k: Input should be a valid integer"),
    ({"history": [ID[1]], "k": 0}, 422, r"k=0: expected 1\.\.6 \(the server's beam width, --beam-width\)"),
    ({"history": [ID[1]], "k": 7}, 422, r"k=7: expected 1\.\.6"),
    ({"history": [ID[1]], "user_id": [1]}, 422, r"user_id: expected a string or an integer, got \[1\]"),
    ({"history": [ID[1]], "exclude_history": "yes"}, 422, r"exclude_history: Input should be a valid boolean"),
    ({"histroy": [ID[1]]}, 422, r"histroy: unknown field: expected id, history, user_id, k, exclude_history"),
    ({"id": 3}, 422, r"history: missing \(give a history, a user_id, or both\)"),
    ([ID[1]], 422, r"body: expected a JSON object"),
    (b'{"history": ["B001",', 400, r"body: not valid JSON"),
    (b"", 422, r"body: missing"),
]


@pytest.mark.parametrize("body, status, message", BAD)
def test_bad_input_is_a_4xx_with_a_message_and_the_server_keeps_serving(server, body, status, message):
    got, answer = call(server, "/recommend", raw=body) if isinstance(body, bytes) else call(server, "/recommend", body)
    assert got == status and re.search(message, answer["error"]), (got, answer)
    assert call(server, "/health")[1]["status"] == "ok"
    assert call(server, "/recommend", BODIES[0])[0] == 200


def test_http_level_mistakes_are_json_errors_too(server):
    assert call(server, "/nowhere") == (404, {"error": "Not Found"})
    assert call(server, "/recommend") == (405, {"error": "Method Not Allowed"})  # a GET
    status, answer = call(server, "/recommend", BODIES[0], kind="text/plain")
    assert status == 422 and answer["error"] == "body: expected a JSON object, sent with Content-Type: application/json"
    status, answer = call(server, "/recommend", raw=b"[" * 100_000)  # deeper than the JSON parser goes
    assert 400 <= status < 500 and answer["error"]
    assert call(server, "/health")[1]["status"] == "ok"


def test_a_body_over_the_limit_is_a_413_whether_its_length_is_declared_or_not(server):
    status, answer = call(server, "/recommend", raw=b" " * (2 << 20))  # Content-Length: 2 MiB
    assert status == 413 and "over the server's limit of 1,048,576 bytes (--max-body-bytes)" in answer["error"]
    # Chunked: no length up front; refused once the bytes pass the limit.
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("POST", "/recommend", body=iter([b" " * (256 << 10)] * 8),
                           headers={"Content-Type": "application/json"}, encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413 and "over the server's limit" in json.loads(response.read())["error"]
    except (BrokenPipeError, ConnectionResetError):
        pytest.fail("the server dropped the connection instead of answering 413")
    finally:
        connection.close()
    assert call(server, "/health")[1]["status"] == "ok" and call(server, "/recommend", BODIES[0])[0] == 200


def test_a_full_queue_answers_503_at_once_and_keeps_serving(export_dir, tmp_path):
    """--max-queued 1: while one request waits (up to --max-wait-ms) for others to share its
    search, the next is refused with 503 and Retry-After instead of queueing."""
    process, url = start_server(export_dir, tmp_path / "server.log", "--max-queued", "1", "--max-wait-ms", "8000")
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            first = pool.submit(call, url, "/recommend", BODIES[0])
            deadline = time.monotonic() + 30
            while call(url, "/health")[1]["queued"] < 1:  # the first request waits for company
                assert time.monotonic() < deadline and not first.done(), "the first request was never queued"
                time.sleep(0.02)
            request = urllib.request.Request(url + "/recommend", data=json.dumps(BODIES[4]).encode(),
                                             headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=60)
            assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
            assert "server busy: 1 requests are already waiting (--max-queued 1)" in json.loads(refused.value.read())["error"]
            assert first.result()[0] == 200
        assert call(url, "/recommend", BODIES[4])[0] == 200
    finally:
        assert stop(process) == 0


def test_a_failing_search_fails_only_its_request_with_a_500(recommender):
    """In-process uvicorn (a thread) over a Recommender whose search raises for one item:
    that request gets a 500 with the message, the requests batched with it are answered."""
    import uvicorn

    from onerec.serve.app import create_app

    poison = recommender._index_of[ID[11]]
    original = recommender.run

    def run(requests):
        if any(poison in request.items for request in requests):
            raise RuntimeError("the model fell over")
        return original(requests)

    broken = Recommender(recommender.exported, source="broken")
    broken.run = run  # type: ignore[method-assign]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(broken, max_wait_ms=50), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        bodies = [BODIES[0], {"history": [ID[11]], "id": "poison"}, BODIES[4]]
        with ThreadPoolExecutor(max_workers=3) as pool:
            (s1, a1), (s2, a2), (s3, a3) = pool.map(lambda body: call(url, "/recommend", body), bodies)
        assert s2 == 500 and a2 == {"id": "poison", "error": "the search failed: RuntimeError: the model fell over"}
        assert s1 == s3 == 200
        assert same(a1["items"], expected(recommender, BODIES[0]))
        assert same(a3["items"], expected(recommender, BODIES[4]))
        assert call(url, "/health")[1]["status"] == "ok" and call(url, "/recommend", BODIES[2])[0] == 200
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def test_sigterm_finishes_the_request_in_flight_and_exits_0(export_dir, tmp_path):
    log = tmp_path / "server.log"
    process, url = start_server(export_dir, log, "--max-wait-ms", "500")
    # A request that waits 0.5 s for company: SIGTERM arrives while it is in flight.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(call, url, "/recommend", BODIES[0])
        time.sleep(0.2)
        code = stop(process)
        status, answer = pending.result(timeout=30)
    assert status == 200 and answer["id"] == "a"
    assert code == 0, log.read_text()
    assert "stopped (SIGTERM)" in log.read_text()


def test_a_port_in_use_is_a_message_and_exit_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "onerec", "serve", "--model", str(tmp_path / "absent"), "--port", str(port)],
            capture_output=True, text=True, timeout=120,
        )
    assert done.returncode == 2
    assert f"--host 127.0.0.1 --port {port}: cannot listen there (Address already in use)" in done.stderr
