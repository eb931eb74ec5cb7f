"""SIGUSR1 / SIGTERM during training (onerec/train/preemption.py): the handlers exist only
while fit() runs, the first signal stops training at the end of the step with a checkpoint and
exit code 75, repeats of the same request are ignored, and a later second signal keeps the
process's previous behaviour. Real signals, sent to this process (one rank, gloo)."""

import os
import signal
import time

import pytest
import torch
from test_trainer import _losses, _train

from onerec.checkpoint import list_checkpoints, verify_checkpoint
from onerec.train.preemption import REQUEUE_EXIT_CODE, StopSignals, TrainingInterrupted


def test_the_requeue_exit_code_is_ex_tempfail_and_a_systemexit():
    err = TrainingInterrupted(5, "SIGUSR1")
    assert REQUEUE_EXIT_CODE == 75 and err.code == 75 and isinstance(err, SystemExit)
    assert not isinstance(err, Exception)  # no `except Exception` on the way turns it into a crash


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_signal_mid_run_checkpoints_that_step_exits_75_and_the_resume_matches_the_uninterrupted_run(
    tmp_path, signum
):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    _, full_model = _train(full_dir)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    seen = []

    def after_step(step):
        seen.append(step)
        if step == 5:  # the checkpoints of this run are at 4, 8 and 12: step 5 is none of them
            os.kill(os.getpid(), signum)
            os.kill(os.getpid(), signum)  # the same request again at once: still one stop

    with pytest.raises(TrainingInterrupted) as stopped:
        _train(cut_dir, after_step=after_step)
    assert stopped.value.code == REQUEUE_EXIT_CODE and stopped.value.step == 5
    assert stopped.value.reason == signal.Signals(signum).name
    assert seen == [1, 2, 3, 4, 5]  # it ended at the boundary of the step it was signalled in
    assert [p.name for p in list_checkpoints(cut_dir / "checkpoints")] == ["step_00000004", "step_00000005"]
    verify_checkpoint(cut_dir / "checkpoints" / "step_00000005")
    # Outside fit() the process's own handlers are back.
    assert {sig: signal.getsignal(sig) for sig in before} == before

    resumed, resumed_model = _train(cut_dir, resume="auto")
    assert resumed.steps == 12
    full, cut = _losses(full_dir), _losses(cut_dir)
    assert sorted(cut) == list(range(1, 13))
    for step in range(1, 13):
        assert cut[step] == pytest.approx(full[step], rel=0, abs=1e-7), step
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_signal_in_the_last_step_lets_the_run_finish(tmp_path):
    def after_step(step):
        if step == 12:
            os.kill(os.getpid(), signal.SIGUSR1)

    result, _ = _train(tmp_path / "run", after_step=after_step)
    assert result.steps == 12 and result.best_weights is not None


def test_repeats_within_the_window_are_one_request_and_a_later_signal_keeps_the_previous_behaviour():
    calls = []

    def previous(signum, frame):
        calls.append(signum)

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        stop = StopSignals(duplicate_window_s=0.2)
        with stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)  # either signal, within the window: the same request
            assert stop.received == "SIGUSR1" and calls == []
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGUSR1)  # a second request: the previous handler, restored
            assert calls == [signal.SIGUSR1]
            assert signal.getsignal(signal.SIGUSR1) is previous
        assert signal.getsignal(signal.SIGUSR1) is previous
        os.kill(os.getpid(), signal.SIGUSR1)  # outside: the process's own behaviour
        assert calls == [signal.SIGUSR1, signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_an_ignored_signal_stays_ignored_after_a_second_request():
    old = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        stop = StopSignals(duplicate_window_s=0.0)
        with stop:
            assert signal.getsignal(signal.SIGUSR1) == stop._handle
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR1)  # second request: back to SIG_IGN, nothing happens
            assert stop.received == "SIGUSR1"
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_the_cli_exits_with_the_requeue_code(monkeypatch):
    """`onerec <stage>` lets TrainingInterrupted through as the process's exit code."""
    from onerec import cli

    def interrupted(args):
        raise TrainingInterrupted(3, "SIGTERM")

    monkeypatch.setattr(cli, "run", interrupted)
    with pytest.raises(SystemExit) as exited:
        cli.main(["pretrain", "run.out_dir=unused"])
    assert exited.value.code == REQUEUE_EXIT_CODE
