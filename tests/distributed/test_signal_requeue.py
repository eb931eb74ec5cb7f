"""A job under launch/torchrun.sh (2 gloo ranks) that gets SIGUSR1 mid-run, as Slurm's
warning before a time limit would send it: the script passes it on to torchrun as SIGTERM,
torchrun to its workers, both ranks stop at the same step boundary with a checkpoint, the job
exits with the requeue code (75), and running the same command again ends with the weights
and losses of an uninterrupted run (the session's reference_run).

The workers pause STEP_DELAY_S after each step (tests/distributed/slow_steps_worker.py) so
that the signal lands while the tiny job is still training; the restart is the plain CLI.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import torch

from distributed_helpers import REPO, TRAIN_STEPS, final_weights, logged_records, process_env, run_logged, tail

TORCHRUN_SH = str(REPO / "launch" / "torchrun.sh")
SLOW_WORKER = str(REPO / "tests" / "distributed" / "slow_steps_worker.py")
TIMEOUT_S = 600
REQUEUE_EXIT_CODE = 75  # onerec.train.preemption.REQUEUE_EXIT_CODE


def wait_for_step(out: Path, step: int, alive, timeout: float = TIMEOUT_S) -> None:
    """Wait until <out>/metrics.jsonl records pretraining step `step`; `alive()` is False
    once the job has ended (then it never will)."""
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line being written
                    continue
                if record.get("stage") == "pretrain" and "loss" in record and record["step"] >= step:
                    return
        assert alive(), f"the job ended before pretraining step {step}"
        time.sleep(0.2)
    raise AssertionError(f"no pretraining step {step} after {timeout} s")


def test_sigusr1_mid_run_checkpoints_on_every_rank_exits_75_and_the_restart_matches_an_uninterrupted_run(
    new_run, reference_run
):
    from onerec.checkpoint import list_checkpoints, verify_checkpoint

    out, overrides = new_run("signalled")
    log = out.parent / "signalled.log"
    env = process_env(NPROC_PER_NODE="2", ENTRY=SLOW_WORKER, STEP_DELAY_S="1")
    with open(log, "w") as handle:
        proc = subprocess.Popen([TORCHRUN_SH, *overrides], cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:
        # Step 4 is not a checkpoint step (3, 6, 8): the stop writes its own checkpoint.
        wait_for_step(out, 4, lambda: proc.poll() is None)
        proc.send_signal(signal.SIGUSR1)  # to launch/torchrun.sh only, as Slurm's B: warning does
        rc = proc.wait(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == REQUEUE_EXIT_CODE, tail(log)
    assert "torchrun.sh: SIGUSR1 received; passing SIGTERM on to pid" in text
    # Every rank, its lines prefixed with its rank by torchrun, stopped at the same boundary.
    stops = dict(re.findall(r"\[rank(\d)\]: .*step (\d+): stopped on SIGTERM, checkpoint in", text))
    assert sorted(stops) == ["0", "1"] and len(set(stops.values())) == 1, text[-4000:]
    step = int(stops["0"])
    assert 4 <= step < TRAIN_STEPS
    checkpoints = list_checkpoints(out / "pretrain" / "checkpoints")
    assert checkpoints[-1].name == f"step_{step:08d}"
    verify_checkpoint(checkpoints[-1])
    assert not (out / "pretrain" / "export").exists()  # it stopped: nothing exported, no record
    assert sorted(logged_records(out)) == list(range(1, step + 1))

    # The same command again (the CLI itself this time) continues from that checkpoint.
    restart = out.parent / "restart.log"
    run_logged([TORCHRUN_SH, *overrides], restart, TIMEOUT_S, process_env(NPROC_PER_NODE="2"))
    assert f"resumed from {checkpoints[-1]} at step {step}" in restart.read_text()
    expected = final_weights(reference_run)
    got = _last_checkpoint_weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    expected_losses = {s: r["loss"] for s, r in logged_records(reference_run).items()}
    got_losses = {s: r["loss"] for s, r in logged_records(out).items()}
    assert got_losses.keys() == expected_losses.keys() == set(range(1, TRAIN_STEPS + 1))
    for s, loss in expected_losses.items():
        assert abs(got_losses[s] - loss) <= 1e-6, (s, got_losses[s], loss)
    assert (out / "pretrain" / "export" / "model.safetensors").is_file()


def _last_checkpoint_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    from onerec.checkpoint import list_checkpoints, verify_checkpoint

    last = list_checkpoints(out / "pretrain" / "checkpoints")[-1]
    assert last.name == f"step_{TRAIN_STEPS:08d}"
    verify_checkpoint(last)
    return load_file(last / "model.safetensors")
