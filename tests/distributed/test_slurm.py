"""Real Slurm jobs: launch/slurm/local-cluster.sh starts munged, slurmctld and slurmd on this
machine, and the sbatch scripts are submitted with sbatch:

- launch/slurm/pretrain.sbatch trains with two gloo workers (srun -> torchrun, c10d
  rendezvous on the job's first node);
- launch/slurm/pipeline.sbatch, warned before its time limit, checkpoints, is requeued,
  resumes, and ends with the metrics of a job that was never stopped. The test sends the
  warning itself (`scancel --signal=USR1 --batch`: what `#SBATCH --signal=B:USR1@120` makes
  Slurm send), since a real time limit is at least a minute and Slurm sends the warning up to
  a minute early; and it cuts the ~2 minutes Slurm holds a requeued job before it may start
  again (`scontrol update StartTime=now+3`: not `now`, since slurmd refuses a launch whose
  credential is dated no later than the second the job's last start was revoked).

Without Slurm the tests are skipped, unless CI=1/true or ONEREC_REQUIRE_SLURM=1 is set (as
.ci/run does after installing it): then a missing Slurm is a failure, never a silent pass.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

from distributed_helpers import REPO, TRAIN_STEPS, final_weights, free_port, logged_records, process_env, run_logged, tail
from test_signal_requeue import SLOW_WORKER, wait_for_step

LOCAL_CLUSTER = str(REPO / "launch" / "slurm" / "local-cluster.sh")
PRETRAIN_SBATCH = str(REPO / "launch" / "slurm" / "pretrain.sbatch")
PIPELINE_SBATCH = str(REPO / "launch" / "slurm" / "pipeline.sbatch")
JOB_TIMEOUT_S = 600
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _as_root() -> list[str] | None:
    """How to run the cluster script as root: directly, through passwordless sudo, or not at all."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    return None


def _require_slurm() -> list[str]:
    missing = [tool for tool in ("sbatch", "scontrol", "slurmctld", "slurmd", "munged") if shutil.which(tool) is None]
    reason = None
    root = _as_root()
    if missing:
        reason = f"Slurm is not installed ({', '.join(missing)} not found; apt-get install slurm-wlm munge)"
    elif root is None:
        reason = "the local Slurm cluster needs root or passwordless sudo (slurmd starts jobs as their user)"
    if reason is None:
        return root
    if os.environ.get("CI", "").lower() in ("1", "true") or os.environ.get("ONEREC_REQUIRE_SLURM") == "1":
        pytest.fail(f"{reason}, but CI/ONEREC_REQUIRE_SLURM requires the Slurm test to run")
    pytest.skip(reason)


def _job_fields(job_id: str, env: dict[str, str]) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True, timeout=30)
    return dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)


def _job_state(job_id: str, env: dict[str, str]) -> str:
    return _job_fields(job_id, env).get("JobState", "UNKNOWN")


def _wait_for_job(job_id: str, env: dict[str, str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _job_state(job_id, env)
        if state in DONE_STATES:
            return state
        time.sleep(1.0)
    subprocess.run(["scancel", job_id], env=env, timeout=30)
    return f"still {_job_state(job_id, env)} after {timeout} s (cancelled)"


@contextmanager
def _local_cluster(tmp_path: Path, as_root: list[str]) -> Iterator[dict[str, str]]:
    """A one-node cluster under tmp_path/cluster for the block (its environment for sbatch &
    co.); afterwards it is stopped by the daemons' own pids, and their pid files are gone."""
    cluster = tmp_path / "cluster"
    knobs = {
        "LOCAL_SLURM_DIR": str(cluster),
        "LOCAL_SLURM_CTLD_PORT": str(free_port()),
        "LOCAL_SLURM_SLURMD_PORT": str(free_port()),
    }
    env = process_env(SLURM_CONF=str(cluster / "slurm.conf"), **knobs)
    cluster_cmd = [*as_root, "env", *(f"{k}={v}" for k, v in knobs.items()), LOCAL_CLUSTER]
    try:
        run_logged([*cluster_cmd, "start"], tmp_path / "cluster-start.log", 120, env)
        pids = {name: int((cluster / f"{name}.pid").read_text()) for name in ("munged", "slurmctld", "slurmd")}
        for name, pid in pids.items():  # the recorded pids are the daemons themselves
            assert open(f"/proc/{pid}/comm").read().strip() == name
        yield env
    finally:
        stop = subprocess.run([*cluster_cmd, "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    for name, pid in pids.items():  # stopped by those pids, and their pid files gone
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", name
        assert not (cluster / f"{name}.pid").exists()


def _submit(script: str, overrides: list[str], tmp_path: Path, env: dict[str, str], **job_env: str) -> str:
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", f"--output={tmp_path}/job-%j.out", script, *overrides],
        cwd=REPO,  # the submission directory is where the job finds launch/common.sh
        env={**env, "NPROC_PER_NODE": "2", "RDZV_PORT": str(free_port()), **job_env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submit.returncode == 0, submit.stderr
    return submit.stdout.strip().split(";")[0]


def test_pretrain_sbatch_trains_two_workers_on_a_local_slurm_cluster(new_run, tmp_path):
    as_root = _require_slurm()
    out, overrides = new_run("slurm")
    with _local_cluster(tmp_path, as_root) as env:
        job_id = _submit(PRETRAIN_SBATCH, overrides, tmp_path, env)
        state = _wait_for_job(job_id, env, JOB_TIMEOUT_S)
        job_log = tmp_path / f"job-{job_id}.out"
        assert state == "COMPLETED", f"job {job_id}: {state}\n{tail(job_log)}\n{tail(tmp_path / 'cluster/log/slurmd.log', 20)}"

    text = job_log.read_text()
    assert "rendezvous on" in text and "--rdzv_backend c10d" in text
    assert text.count(f"pretraining done: {TRAIN_STEPS} steps") == 2  # both workers finished
    assert f"job {job_id}, start 1 (requeued 0 times" in text
    final_weights(out)  # the three checkpoints are there and verify
    assert (out / "pretrain" / "export" / "model.safetensors").is_file()
    records = logged_records(out)
    assert sorted(records) == list(range(1, TRAIN_STEPS + 1))
    assert records[1]["epoch"] == 1 / 19  # 300 examples / (8 per rank x 2 ranks): two workers


def _node_idle(env: dict[str, str]) -> bool:
    shown = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, timeout=30)
    return shown.stdout.split() == ["idle"]


def _wait_until_requeued(job_id: str, env: dict[str, str], timeout: float) -> dict[str, str]:
    """The job's fields once it is back in the queue and the node has finished with its last start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = _job_fields(job_id, env)
        if int(fields.get("Restarts", "0")) >= 1 and fields.get("JobState") == "PENDING" and _node_idle(env):
            return fields
        assert fields.get("JobState") not in DONE_STATES, f"job {job_id} ended instead of being requeued: {fields}"
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not requeued after {timeout} s: {_job_fields(job_id, env)}")


def test_a_pipeline_job_warned_before_its_time_limit_is_requeued_and_ends_like_an_uninterrupted_one(
    new_run, tmp_path
):
    as_root = _require_slurm()
    reference, reference_overrides = new_run("uninterrupted")
    out, overrides = new_run("requeued")
    with _local_cluster(tmp_path, as_root) as env:
        # One job at a time runs on the node (--exclusive): the uninterrupted job first.
        reference_id = _submit(PIPELINE_SBATCH, reference_overrides, tmp_path, env)
        # Its workers pause after each step (slow_steps_worker.py), so the warning lands mid-training.
        job_id = _submit(PIPELINE_SBATCH, overrides, tmp_path, env, ENTRY=SLOW_WORKER, STEP_DELAY_S="1")
        job_log = tmp_path / f"job-{job_id}.out"
        state = _wait_for_job(reference_id, env, JOB_TIMEOUT_S)
        assert state == "COMPLETED", f"job {reference_id}: {state}\n{tail(tmp_path / f'job-{reference_id}.out')}"

        wait_for_step(out, 4, lambda: _job_state(job_id, env) not in DONE_STATES, JOB_TIMEOUT_S)
        signal_sent = time.monotonic()
        scancel = subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env,
                                 capture_output=True, text=True, timeout=30)
        assert scancel.returncode == 0, scancel.stderr
        fields = _wait_until_requeued(job_id, env, 120)
        stop_s = time.monotonic() - signal_sent
        assert fields["Requeue"] == "1"  # #SBATCH --requeue
        # Slurm holds a requeued job for ~2 minutes (its credential lifetime); let it start in 3 s.
        # Starting it at once can fail: slurmd revokes the job's credential when it stops, and a
        # new credential made within that same second counts as revoked ("Job credential revoked").
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+3"], env=env, check=True, timeout=30)
        state = _wait_for_job(job_id, env, JOB_TIMEOUT_S)
        cluster_log = tmp_path / "cluster" / "log"
        assert state == "COMPLETED", (f"job {job_id}: {state} {_job_fields(job_id, env)}\n{tail(job_log)}\n"
                                      f"{tail(cluster_log / 'slurmctld.log', 15)}\n{tail(cluster_log / 'slurmd.log', 15)}")
        assert _job_fields(job_id, env)["Restarts"] == "1"

    text = job_log.read_text()  # both starts: --open-mode=append
    assert stop_s < 60, f"{stop_s:.0f} s from the warning to the requeue"
    first, _, second = text.partition(f"onerec-pipeline: job {job_id}, start 2 (requeued 1 times so far")
    assert second, text[-4000:]
    assert f"onerec-pipeline: job {job_id}, start 1 (requeued 0 times so far" in first
    # First start: the warning went down to the workers, which stopped at one step boundary.
    assert "onerec-pipeline: SIGUSR1 received; passing SIGUSR1 on to pid" in first
    assert "onerec-pretrain: SIGUSR1 received; passing SIGUSR1 on to pid" in first
    stops = dict(re.findall(r"\[rank(\d)\]: .*step (\d+): stopped on SIGUSR1, checkpoint in", first))
    assert sorted(stops) == ["0", "1"] and len(set(stops.values())) == 1, first[-4000:]
    step = int(stops["0"])
    assert 4 <= step < TRAIN_STEPS
    assert "pipeline: pretrain stopped on a signal" in first and "== evaluate ==" not in first
    assert f"onerec-pipeline: stopped on SIGUSR1 (exit 75); requeueing job {job_id} (requeue 1)" in first
    # Second start: finished stages skipped, pretraining resumed from the stop's checkpoint.
    assert "pipeline: tokenize up to date, skipping" in second
    checkpoint = out / "pretrain" / "checkpoints" / f"step_{step:08d}"
    assert second.count(f"resumed from {checkpoint} at step {step}") == 2  # both ranks
    assert "pipeline: done" in second

    expected = json.loads((reference / "metrics.json").read_text())
    got = json.loads((out / "metrics.json").read_text())
    expected.pop("wall_seconds"), got.pop("wall_seconds")
    assert got == expected
    from safetensors.torch import load_file

    expected_weights = load_file(reference / "pretrain" / "export" / "model.safetensors")
    got_weights = load_file(out / "pretrain" / "export" / "model.safetensors")
    assert expected_weights.keys() == got_weights.keys()
    for name in expected_weights:
        torch.testing.assert_close(got_weights[name], expected_weights[name], rtol=0, atol=1e-6, msg=name)
    assert sorted(logged_records(out)) == list(range(1, TRAIN_STEPS + 1))
