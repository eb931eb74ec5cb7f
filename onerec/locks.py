"""One process per run directory and stage: a lock file that a second `onerec <stage>` into
the same run directory finds, so it stops with a message instead of racing the first one on
the same checkpoint and output files.

    <run_dir>/.locks/<stage>.lock    {"pid": 12345, "host": "node07", "started": "2025-...Z",
                                      "job": torchrun's run id or null, "attempt": its restart count}

The lock file is created with O_CREAT | O_EXCL, which succeeds for exactly one process (also
on NFS v3 and later), and removed when the stage ends, whether it succeeds or fails. A
holder that was killed (SIGKILL, a node that went down) cannot remove it; then:

- same host, pid no longer running: the lock is stale and taken over, with a warning;
- another host: its pid cannot be checked from here, so it is refused with a message saying
  how to remove the lock if that job is dead;
- the holder was an earlier attempt of this same torchrun job (same TORCHELASTIC_RUN_ID, a
  lower TORCHELASTIC_RESTART_COUNT): torchrun restarts all workers together, so that attempt
  is dead, and the lock is taken over even when global rank 0 moved to another host.

A torchrun restart on one host starts its workers as new processes, so the dead attempt's
pid is dead and its lock is stale by the first rule as well.

Only one process of a distributed job takes the lock: global rank 0 (the RANK environment
variable is 0 or unset, as in a single-process run). The other ranks do not touch it.

Taking over a stale lock happens under a second lock file, `<stage>.lock.takeover`, so two
processes that find the same stale lock cannot both end up holding the stage; a takeover
file older than TAKEOVER_STALE_S was left by a process killed mid-takeover and is removed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from onerec.errors import ResourceError

log = logging.getLogger("onerec.locks")

LOCKS_DIR = ".locks"
# A holder writes its JSON right after creating the file; an empty or partial lock file is
# re-read for this long before it is reported as unreadable.
UNREADABLE_WAIT_S = 2.0
TAKEOVER_STALE_S = 30.0


def lock_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / LOCKS_DIR / f"{stage}.lock"


def _is_global_rank_zero() -> bool:
    return os.environ.get("RANK", "0").strip() in ("", "0")


def _holder_info() -> dict[str, Any]:
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "")
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "job": os.environ.get("TORCHELASTIC_RUN_ID") or None,
        "attempt": int(restarts) if restarts.isdigit() else None,
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _read_holder(path: Path) -> Optional[dict[str, Any]]:
    """The holder's JSON; None if the file is gone; {} if it stays unreadable."""
    deadline = time.monotonic() + UNREADABLE_WAIT_S
    while True:
        try:
            holder = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
                return holder
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.05)


def _earlier_attempt_of_this_job(holder: dict[str, Any], me: dict[str, Any]) -> bool:
    job, attempt = holder.get("job"), holder.get("attempt")
    return (
        bool(me["job"]) and me["job"] != "none" and job == me["job"]
        and isinstance(attempt, int) and me["attempt"] is not None and attempt < me["attempt"]
    )


def _stale_reason(holder: dict[str, Any], me: dict[str, Any]) -> Optional[str]:
    """Why the holder is certainly gone, or None if it may still be running."""
    if _earlier_attempt_of_this_job(holder, me):
        return f"attempt {holder['attempt']} of this torchrun job ({me['job']}), which torchrun restarted"
    if holder.get("host") == me["host"] and not _pid_alive(holder["pid"]):
        return f"pid {holder['pid']} on this host is no longer running"
    return None


def _describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started')})"


def _refuse(path: Path, stage: str, holder: dict[str, Any], me: dict[str, Any]) -> ResourceError:
    run_dir = path.parent.parent
    if not holder:
        return ResourceError(
            f"`onerec {stage}` cannot take {path}: the lock file is unreadable. If no onerec {stage} "
            f"is running on {run_dir}, remove {path} and retry"
        )
    if holder.get("host") != me["host"]:
        return ResourceError(
            f"`onerec {stage}` is already running on {run_dir}: {path} is held by {_describe(holder)}, "
            f"another host, where this process cannot check that it is still alive. If that job is dead, "
            f"remove {path} and retry; otherwise wait for it or use another run.out_dir"
        )
    return ResourceError(
        f"`onerec {stage}` is already running on {run_dir}: {path} is held by {_describe(holder)}. "
        f"Wait for it to finish or stop it, or use another run.out_dir (if pid {holder.get('pid')} is not "
        f"an onerec process, its number was reused: remove {path} and retry)"
    )


def _create(path: Path, me: dict[str, Any]) -> bool:
    """Create the lock holding `me`; False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(me, handle)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _remove_if_same(path: Path, holder: dict[str, Any]) -> bool:
    """Remove the lock file if it still holds `holder`, under the takeover lock; False when
    another process is taking it over or the lock changed hands meanwhile."""
    takeover = path.with_name(path.name + ".takeover")
    try:
        fd = os.open(takeover, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            if time.time() - takeover.stat().st_mtime > TAKEOVER_STALE_S:
                log.warning("removing %s, left by a process killed while taking over the lock", takeover)
                takeover.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        return False  # someone else is taking it over: look again
    os.close(fd)
    try:
        # Read again under the takeover lock: between our first read and now another
        # process may have taken the stale lock over, and its fresh lock must stay.
        if _read_holder(path) != holder:
            return False
        path.unlink(missing_ok=True)
        return True
    finally:
        takeover.unlink(missing_ok=True)


def acquire(run_dir: Path, stage: str) -> Path:
    """Take the lock for `stage` in `run_dir` (see the module docstring) or raise ResourceError."""
    path = lock_path(run_dir, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = _holder_info()
    while True:
        if _create(path, me):
            return path
        holder = _read_holder(path)
        if holder is None:  # released between our attempt and the read: try again
            continue
        reason = _stale_reason(holder, me) if holder else None
        if reason is None:
            raise _refuse(path, stage, holder, me)
        if _remove_if_same(path, holder):
            log.warning("taking over the stale lock %s of %s: %s", path, _describe(holder), reason)
        else:
            time.sleep(0.05)  # then look at whoever holds it now


def release(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    holder = _read_holder(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
    elif holder is not None:
        log.warning("%s is no longer this process's lock (now %s); left in place", path, _describe(holder))


@contextmanager
def stage_lock(run_dir: Path, stage: str) -> Iterator[Optional[Path]]:
    """Hold `<run_dir>/.locks/<stage>.lock` for the duration of the block; yields its path,
    or None in the processes of a distributed job other than global rank 0, which take no lock.
    A second process gets a ResourceError naming the holder's pid, host and the lock path."""
    if not _is_global_rank_zero():
        yield None
        return
    path = acquire(Path(run_dir), stage)
    try:
        yield path
    finally:
        release(path)
