"""A real Slurm job: launch/slurm/local-cluster.sh starts munged, slurmctld and slurmd on this
machine, launch/slurm/pretrain.sbatch is submitted with sbatch and trains with two gloo
workers (srun -> torchrun, c10d rendezvous on the job's first node).

Without Slurm the test is skipped, unless CI=1/true or ONEREC_REQUIRE_SLURM=1 is set (as
.ci/run does after installing it): then a missing Slurm is a failure, never a silent pass.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from distributed_helpers import REPO, TRAIN_STEPS, final_weights, free_port, logged_records, process_env, run_logged, tail

LOCAL_CLUSTER = str(REPO / "launch" / "slurm" / "local-cluster.sh")
PRETRAIN_SBATCH = str(REPO / "launch" / "slurm" / "pretrain.sbatch")
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


def _job_state(job_id: str, env: dict[str, str]) -> str:
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True, timeout=30)
    for field in shown.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "UNKNOWN"


def _wait_for_job(job_id: str, env: dict[str, str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _job_state(job_id, env)
        if state in DONE_STATES:
            return state
        time.sleep(1.0)
    subprocess.run(["scancel", job_id], env=env, timeout=30)
    return f"still {_job_state(job_id, env)} after {timeout} s (cancelled)"


def test_pretrain_sbatch_trains_two_workers_on_a_local_slurm_cluster(new_run, tmp_path):
    as_root = _require_slurm()
    out, overrides = new_run("slurm")
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
        submit = subprocess.run(
            ["sbatch", "--parsable", "--nodes=1", f"--output={tmp_path}/job-%j.out", PRETRAIN_SBATCH, *overrides],
            cwd=REPO,  # the submission directory is where the job finds launch/common.sh
            env={**env, "NPROC_PER_NODE": "2", "RDZV_PORT": str(free_port())},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert submit.returncode == 0, submit.stderr
        job_id = submit.stdout.strip().split(";")[0]
        state = _wait_for_job(job_id, env, JOB_TIMEOUT_S)
        job_log = tmp_path / f"job-{job_id}.out"
        assert state == "COMPLETED", f"job {job_id}: {state}\n{tail(job_log)}\n{tail(cluster / 'log' / 'slurmd.log', 20)}"
    finally:
        stop = subprocess.run([*cluster_cmd, "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    for name, pid in pids.items():  # stopped by those pids, and their pid files gone
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", name
        assert not (cluster / f"{name}.pid").exists()

    text = job_log.read_text()
    assert "rendezvous on" in text and "--rdzv_backend c10d" in text
    assert text.count(f"pretraining done: {TRAIN_STEPS} steps") == 2  # both workers finished
    final_weights(out)  # the three checkpoints are there and verify
    assert (out / "pretrain" / "export" / "model.safetensors").is_file()
    records = logged_records(out)
    assert sorted(records) == list(range(1, TRAIN_STEPS + 1))
    assert records[1]["epoch"] == 1 / 19  # 300 examples / (8 per rank x 2 ranks): two workers
