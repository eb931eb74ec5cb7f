"""The per-stage run-directory lock (onerec.locks), with real processes as holders."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from onerec.errors import ResourceError
from onerec.locks import lock_path, stage_lock

REPO = Path(__file__).resolve().parents[2]

# Takes the lock, says so, and holds it until its stdin closes.
HOLDER = """
import sys
from onerec.errors import ResourceError
from onerec.locks import stage_lock
try:
    with stage_lock(sys.argv[1], "pretrain"):
        print("locked", flush=True)
        sys.stdin.read()
except ResourceError as err:
    print("refused", err, flush=True)
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "TORCHELASTIC_"))}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def _start_holder(run_dir: Path, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=_env(**env),
    )


def _hold(run_dir: Path) -> subprocess.Popen:
    proc = _start_holder(run_dir)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("RANK", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)


def test_a_second_process_is_refused_with_the_holders_pid_host_and_the_lock_path(tmp_path, clean_env):
    holder = _hold(tmp_path)
    try:
        path = lock_path(tmp_path, "pretrain")
        assert path == tmp_path / ".locks" / "pretrain.lock"
        recorded = json.loads(path.read_text())
        assert recorded["pid"] == holder.pid and recorded["host"] == socket.gethostname() and recorded["started"]
        with pytest.raises(ResourceError) as err:
            with stage_lock(tmp_path, "pretrain"):
                pytest.fail("two processes hold the same stage lock")
        message = str(err.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message and str(path) in message
        with stage_lock(tmp_path, "evaluate"):  # another stage of the same run directory is free
            pass
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    assert not path.exists()  # released when the holder's block ended
    with stage_lock(tmp_path, "pretrain") as taken:
        assert taken == path and json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_the_lock_of_a_killed_process_is_stale_and_taken_over_with_a_warning(tmp_path, clean_env, caplog):
    holder = _hold(tmp_path)
    holder.send_signal(signal.SIGKILL)  # no chance to remove its lock
    holder.wait(timeout=30)
    path = lock_path(tmp_path, "pretrain")
    assert json.loads(path.read_text())["pid"] == holder.pid
    with caplog.at_level("WARNING", logger="onerec.locks"):
        with stage_lock(tmp_path, "pretrain"):
            assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock {path} of pid {holder.pid}" in caplog.text
    assert "no longer running" in caplog.text
    assert not path.exists()


def test_a_lock_held_on_another_host_is_refused_with_how_to_remove_it(tmp_path, clean_env):
    path = lock_path(tmp_path, "pretrain")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": 4242, "host": "node-elsewhere", "started": "2025-01-01T00:00:00+00:00"}))
    with pytest.raises(ResourceError) as err:
        with stage_lock(tmp_path, "pretrain"):
            pytest.fail("took a lock held on another host")
    message = str(err.value)
    assert "pid 4242 on host node-elsewhere" in message and "another host" in message
    assert f"If that job is dead, remove {path}" in message
    assert json.loads(path.read_text())["pid"] == 4242  # left alone


def test_an_earlier_torchrun_attempt_of_the_same_job_is_taken_over_even_from_another_host(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    path = lock_path(tmp_path, "pretrain")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": 4242, "host": "node-elsewhere", "started": "x", "job": "job-7", "attempt": 0}))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with stage_lock(tmp_path, "pretrain"):
        assert json.loads(path.read_text())["attempt"] == 1
    # Another job (or the same attempt) on another host is still refused.
    path.write_text(json.dumps({"pid": 4242, "host": "node-elsewhere", "started": "x", "job": "job-7", "attempt": 1}))
    with pytest.raises(ResourceError, match="another host"):
        with stage_lock(tmp_path, "pretrain"):
            pass


def test_only_global_rank_zero_takes_the_lock(tmp_path, monkeypatch, clean_env):
    monkeypatch.setenv("RANK", "1")
    with stage_lock(tmp_path, "pretrain") as taken:
        assert taken is None
    assert not (tmp_path / ".locks").exists()
    monkeypatch.setenv("RANK", "0")
    with stage_lock(tmp_path, "pretrain") as taken:
        assert taken is not None and taken.is_file()


def test_the_lock_is_released_when_the_stage_fails(tmp_path, clean_env):
    with pytest.raises(RuntimeError, match="stage failed"):
        with stage_lock(tmp_path, "pretrain"):
            raise RuntimeError("stage failed")
    assert not lock_path(tmp_path, "pretrain").exists()


def test_processes_racing_for_one_stale_lock_leave_exactly_one_holder(tmp_path, clean_env):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    path = lock_path(tmp_path, "pretrain")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    racers = [_start_holder(tmp_path) for _ in range(4)]
    try:
        # The refused ones exit at once; the holder keeps its lock until its stdin closes.
        answers = [proc.stdout.readline().split()[0] for proc in racers]
        assert sorted(answers) == ["locked", "refused", "refused", "refused"]
        winner = racers[answers.index("locked")]
        assert json.loads(path.read_text())["pid"] == winner.pid
    finally:
        for proc in racers:
            proc.stdin.close()
            proc.wait(timeout=30)
