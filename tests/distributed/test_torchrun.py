"""launch/torchrun.sh with real processes on gloo: two nodes meeting on a c10d rendezvous,
and a job that loses a rank to SIGKILL, restarts and ends where an uninterrupted run ends
(data parallel, and with experts sharded over the two ranks under ZeRO stage 2)."""

from __future__ import annotations

import subprocess

import torch

from distributed_helpers import (
    REPO, TRAIN_STEPS, final_weights, free_port, logged_records, process_env, run_logged, tail,
)

TORCHRUN_SH = str(REPO / "launch" / "torchrun.sh")
SIGKILL_WORKER = REPO / "tests" / "distributed" / "sigkill_worker.py"
TIMEOUT_S = 600  # generous: a first run on a fresh machine also compiles DeepSpeed's CPU comm op
STEPS_PER_EPOCH_2_RANKS = 19  # ceil(300 training examples / (8 per rank x 2 ranks))


def test_two_nodes_meet_on_a_c10d_rendezvous_and_train_together(new_run):
    out, overrides = new_run("two_nodes")
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for node_rank in (0, 1):  # two torchrun agents, as on two machines sharing run.out_dir
        log = out.parent / f"node{node_rank}.log"
        env = process_env(
            NNODES="2", NODE_RANK=str(node_rank), NPROC_PER_NODE="1", RDZV_ENDPOINT=endpoint, RDZV_ID="two-nodes"
        )
        with open(log, "w") as handle:
            proc = subprocess.Popen([TORCHRUN_SH, *overrides], cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
        nodes.append((proc, log))
    try:
        for proc, log in nodes:
            assert proc.wait(timeout=TIMEOUT_S) == 0, tail(log)
    finally:
        for proc, _ in nodes:
            if proc.poll() is None:
                proc.kill()
    for _, log in nodes:  # each node ran a worker through to the end
        text = log.read_text()
        assert "--rdzv_backend c10d --rdzv_endpoint " + endpoint in text
        assert f"pretraining done: {TRAIN_STEPS} steps" in text
    weights = final_weights(out)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert (out / "pretrain" / "export" / "model.safetensors").is_file()
    records = logged_records(out)
    assert sorted(records) == list(range(1, TRAIN_STEPS + 1))
    # The epoch fraction is step / steps per epoch, which counts both nodes' ranks.
    assert records[1]["epoch"] == 1 / STEPS_PER_EPOCH_2_RANKS


def _kill_restart_and_compare(out, overrides, reference):
    log = out.parent / "killed.log"
    # Rank 1 SIGKILLs itself right after step 5 on the first attempt; the newest checkpoint
    # then is step 3, so the restarted job must replay steps 4 and 5 exactly.
    run_logged([TORCHRUN_SH, *overrides], log, TIMEOUT_S,
               process_env(NPROC_PER_NODE="2", MAX_RESTARTS="1", ENTRY=str(SIGKILL_WORKER), SIGKILL_AT="1:5"))
    text = log.read_text()
    assert "rank 1 kills itself after step 5" in text
    assert "exitcode: -9" in text  # torchrun saw the SIGKILL...
    assert f"resumed from {out / 'pretrain' / 'checkpoints' / 'step_00000003'} at step 3" in text  # ...and restarted

    expected, got = final_weights(reference), final_weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    expected_losses = {s: r["loss"] for s, r in logged_records(reference).items()}
    got_losses = {s: r["loss"] for s, r in logged_records(out).items()}
    assert got_losses.keys() == expected_losses.keys() == set(range(1, TRAIN_STEPS + 1))
    for step, loss in expected_losses.items():
        assert abs(got_losses[step] - loss) <= 1e-6, (step, got_losses[step], loss)
    return text


def test_a_rank_killed_mid_run_is_restarted_and_ends_equal_to_an_uninterrupted_run(new_run, reference_run):
    out, overrides = new_run("killed")
    _kill_restart_and_compare(out, overrides, reference_run)


def test_an_expert_parallel_zero2_run_restarts_from_its_sharded_checkpoint(new_run):
    """Each rank holds 2 of the 4 experts and its own ZeRO-2 optimizer partition: the checkpoint
    gathers the full weights and keeps one optimizer file per rank, and the restarted job puts
    every rank's share back (weights, fp32 master copy, optimizer state)."""
    sharded = ["parallel.expert_parallel_size=2", "train.zero_stage=2"]
    reference, ref_overrides = new_run("reference_ep2")
    run_logged([TORCHRUN_SH, *ref_overrides, *sharded], reference.parent / "reference_ep2.log", TIMEOUT_S,
               process_env(NPROC_PER_NODE="2"))
    out, overrides = new_run("killed_ep2")
    text = _kill_restart_and_compare(out, [*overrides, *sharded], reference)
    assert "expert parallel: ep=2, rank 1 holds experts 2..3 of 4" in text
    for checkpoint in (out / "pretrain" / "checkpoints").glob("step_*"):
        assert sorted(p.name for p in checkpoint.glob("optimizer_rank*.pt")) == [
            "optimizer_rank00000.pt", "optimizer_rank00001.pt"
        ]
    # The export holds all four experts of every MoE layer.
    from safetensors.torch import load_file

    exported = load_file(out / "pretrain" / "export" / "model.safetensors")
    expert_weights = [v for k, v in exported.items() if k.endswith("w1_EFD")]
    assert expert_weights and all(w.shape[0] == 4 for w in expert_weights)
