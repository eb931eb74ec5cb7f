"""Stopping a training run cleanly on SIGUSR1 / SIGTERM: a checkpoint at the end of the
step, then exit code REQUEUE_EXIT_CODE ("checkpointed, please requeue").

Clusters warn a job before they stop it: Slurm sends the signal asked for with
`--signal=B:USR1@<seconds>` that long before the time limit (launch/slurm/*.sbatch pass it
on to the training processes), and SIGTERM when it preempts or cancels a job. While
`Trainer.fit()` runs, the first SIGUSR1 or SIGTERM asks training to stop:

1. the current step finishes on every rank;
2. at the step boundary the ranks agree (the request is all-reduced, so one rank hearing of
   it is enough and all stop at the same step);
3. every rank takes part in writing a checkpoint of that step (onerec.checkpoint);
4. the process exits with REQUEUE_EXIT_CODE (TrainingInterrupted, a SystemExit).

    REQUEUE_EXIT_CODE = 75   EX_TEMPFAIL of sysexits.h: a temporary failure, run it again

This is the one place the code is defined. The launch scripts return it too
(launch/common.sh), and the Slurm batch scripts requeue the job on it. Running the same
command again (`train.resume=auto`, which every launcher adds) continues from that checkpoint
and ends with the weights of a run that was never stopped.

The same request often arrives more than once: Slurm signals every process of a job step,
and torchrun and the launch scripts pass the signal on as well. A repeat of either signal
within DUPLICATE_WINDOW_S of the first is taken as that same request and ignored. A later one
is a second request and keeps the behaviour the process had before fit() (the default action
ends it at once, without a checkpoint), as does any signal outside fit(). A step that hangs
(a collective waiting for a dead rank) therefore still ends on the next signal, or on the
launcher's SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, Optional

log = logging.getLogger("onerec.train")

REQUEUE_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# Long enough for torchrun, srun and the launch scripts to pass one signal on (milliseconds
# apart), short enough that a user who sends it again soon after means it.
DUPLICATE_WINDOW_S = 5.0


class TrainingInterrupted(SystemExit):
    """Training stopped on a signal after writing a checkpoint of `step`: the process exits
    with REQUEUE_EXIT_CODE (a SystemExit, so no `except Exception` on the way swallows it)."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(REQUEUE_EXIT_CODE)
        self.step = step
        self.reason = reason


class StopSignals:
    """While entered, the first SIGUSR1 / SIGTERM is recorded in `received` instead of ending
    the process; on exit the previous handlers are back. Only the main thread can install
    signal handlers: elsewhere nothing is installed and `received` stays None."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS,
                 duplicate_window_s: float = DUPLICATE_WINDOW_S) -> None:
        self.signals = signals
        self.duplicate_window_s = duplicate_window_s
        self.received: Optional[str] = None  # name of the first signal, e.g. "SIGUSR1"
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            log.warning("training runs outside the main thread: SIGUSR1/SIGTERM will not checkpoint it")
            return self
        for sig in self.signals:
            previous = signal.getsignal(sig)
            if previous is None:  # a handler installed outside Python: it cannot be put back
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the handlers back that were there before (idempotent)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.received is None:
            self.received, self._first_at = name, now
            log.warning("%s received: training stops at the end of this step, with a checkpoint (exit code %d)",
                        name, REQUEUE_EXIT_CODE)
            return
        if now - self._first_at < self.duplicate_window_s:
            return  # the same request, passed on by another process
        log.warning("%s received again, %.0f s after %s: stopping now, without a checkpoint",
                    name, now - self._first_at, self.received)
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.restore()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)  # the default action, now that it is back
