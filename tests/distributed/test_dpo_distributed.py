"""`onerec dpo` over real gloo processes: IPA rounds sampled sharded over two ranks (experts
replicated, ep=1; and sharded, ep=2 under ZeRO stage 2) give the pairs and the policy one
process gives, and a job that loses a rank to SIGKILL mid-round resumes from the round's
files (saved pairs not sampled again, training from the round's checkpoint) and ends where
an uninterrupted job ends.

The inputs (data, semantic IDs, a briefly pretrained model and reward model) are made once,
in this process, from the alignment test's synthetic log with ratings.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed_helpers import REPO, free_port, process_env, run_logged, run_ranks

TORCHRUN_SH = str(REPO / "launch" / "torchrun.sh")
DPO_WORKER = REPO / "tests" / "distributed" / "dpo_worker.py"
SIGKILL_WORKER = REPO / "tests" / "distributed" / "sigkill_worker.py"
TIMEOUT_S = 600  # only catches a hang (a collective mismatch); the runs take seconds

_spec = importlib.util.spec_from_file_location("onerec_integration_alignment", REPO / "tests/integration/test_alignment.py")
alignment_test = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(alignment_test)

# Every token goes to all 4 experts (top_k = 4): with top-2, float rounding (a different
# summation order on two ranks) can flip a token near a routing tie to another expert, and
# Adam turns that expert's changed gradient, however small, into a full-size step; the runs
# would then drift apart by chance, not by a sharding bug. Sharding (ep=2) still sends every
# token through the all-to-all.
# Two short rounds of 40 users (align.users_fraction x 200), 6 sessions each, 8 pairs a step
# (4 per rank), checkpoints every 2 steps; every round accepted, so both run.
ALIGN = [
    "align.enabled=true", "align.rounds=2", "align.users_fraction=0.2", "align.num_samples=6",
    "align.batch_size=8", "align.sample_batch_size=4", "align.checkpoint_every=2", "align.lr=2e-3",
    "align.eval_users=12", "align.max_recall_drop=1.0",
]


def _inputs_overrides(tmp: Path, out: Path) -> list[str]:
    return [
        f"run.out_dir={out}", "data.format=csv", f"data.root={tmp / 'raw'}", "data.interactions_file=log.csv",
        "data.items_file=items.csv", "data.user_column=user", "data.item_column=item", "data.time_column=ts",
        "data.feedback_columns=[rating]", "data.max_history=6", "data.session_len=2",
        "tokenizer.encoder=hashing", "tokenizer.levels=2", "tokenizer.codebook_size=6",
        "model.d_model=32", "model.num_heads=2", "model.encoder_layers=1", "model.decoder_layers=1",
        "model.d_ff=64", "model.dropout=0.0", "model.moe.top_k=4", "train.batch_size=32", "train.max_steps=30", "train.lr=3e-3",
        "train.warmup_steps=5", "train.log_every=1", "train.eval_every=30", "train.checkpoint_every=30", "train.patience=0",
        "eval.beam_width=10", "eval.max_valid_users=20",
        "reward.enabled=true", "reward.d_model=32", "reward.max_epochs=3", "reward.batch_size=64",
        "reward.dropout=0.0", "reward.lr=3e-3", "reward.holdout_fraction=0.25",
        "reward.signals=[{name: like, column: rating, threshold: 3.5}]",
    ]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A run directory holding data, semantic IDs, a pretrained export and a reward model."""
    from onerec.cli import main as cli_main

    tmp = tmp_path_factory.mktemp("dpo_inputs")
    alignment_test._write_log(tmp / "raw")
    overrides = _inputs_overrides(tmp, tmp / "run")
    for stage in ("data", "tokenize", "pretrain", "reward"):
        assert cli_main([stage, *overrides]) == 0, stage
    return tmp


def _new_run(inputs: Path, name: str) -> tuple[Path, list[str]]:
    out = inputs / name
    shutil.copytree(inputs / "run", out)
    return out, [*_inputs_overrides(inputs, out), *ALIGN]


@pytest.fixture(scope="module")
def runs(inputs) -> dict[str, Path]:
    """The same two rounds on one process (in this one), and on two gloo ranks with ep=1 and ep=2."""
    from onerec.cli import main as cli_main

    one, one_overrides = _new_run(inputs, "one_rank")
    assert cli_main(["dpo", *one_overrides]) == 0
    two, two_overrides = _new_run(inputs, "two_ranks")
    ep2, ep2_overrides = _new_run(inputs, "two_ranks_ep2")
    jobs = inputs / "jobs"
    jobs.mkdir()
    # ep=2 under ZeRO stage 2: each rank holds 2 of the 4 experts and its optimizer partition.
    sharded = [*ep2_overrides, "parallel.expert_parallel_size=2", "train.zero_stage=2"]
    (jobs / "configs.json").write_text(json.dumps([two_overrides, sharded]))
    env = {
        **process_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2", "PYTHONPATH": str(REPO),
    }
    results = run_ranks(DPO_WORKER, jobs, 2, env, timeout=TIMEOUT_S, what="dpo")
    assert [r["exported_rounds"] for r in results] == [[2, 2], [2, 2]]
    return {"one": one, "two": two, "ep2": ep2, "two_overrides": two_overrides}


def _pairs(run: Path, k: int) -> dict[str, torch.Tensor]:
    return load_file(run / "dpo" / f"round_{k}" / "pairs.safetensors")


def _assert_same_pairs(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=name)
        else:  # which users, which sessions, which of them made a pair: exactly the same
            assert torch.equal(got[name], value), name


def _assert_same_weights(got: dict, expected: dict, atol: float) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=atol, msg=name)


def _assert_same_policy(got: dict, expected: dict, start: dict) -> None:
    """The same update up to float rounding: a round moves the weights by ~1e-2 (lr 2e-3, 5
    Adam steps); another summation order differs by ~1e-6 of that overall, and Adam can lift
    an element whose gradient is ~0 (near its eps) to ~1e-5 on its own."""
    _assert_same_weights(got, expected, atol=1e-4)
    diff = sum(((got[n] - expected[n]) ** 2).sum() for n in expected).sqrt()
    moved = sum(((expected[n] - start[n]) ** 2).sum() for n in expected).sqrt()
    assert diff <= 1e-4 * moved, (diff, moved)


@pytest.mark.parametrize("layout", ["two", "ep2"])
def test_a_round_sampled_and_trained_on_two_ranks_equals_one_process(runs, layout):
    one, other = runs["one"], runs[layout]
    start = load_file(one / "pretrain" / "export" / "model.safetensors")
    for k in (1, 2):
        expected = _pairs(one, k)
        assert int(expected["usable_R"].sum()) >= 8, "too few pairs for a meaningful round"
        assert expected["row_R"].tolist() == list(range(40))  # the round's 40 users, in order
        _assert_same_pairs(_pairs(other, k), expected)
        expected_policy = load_file(one / "dpo" / f"round_{k}" / "policy.safetensors")
        assert any(not torch.equal(expected_policy[n], start[n]) for n in start), "the round did not train"
        _assert_same_policy(load_file(other / "dpo" / f"round_{k}" / "policy.safetensors"), expected_policy, start)
        start = expected_policy
    expected, got = (json.loads((run / "dpo" / "alignment.json").read_text()) for run in (one, other))
    assert got["exported_round"] == expected["exported_round"] == 2
    for mine, theirs in zip(got["rounds"], expected["rounds"]):
        assert mine["train"]["pairs"] == theirs["train"]["pairs"] and mine["train"]["steps"] == theirs["train"]["steps"]
        assert mine["train"]["dpo_loss"] == pytest.approx(theirs["train"]["dpo_loss"], rel=1e-4, abs=1e-5)
        assert mine["reward_mean"] == pytest.approx(theirs["reward_mean"], rel=1e-4, abs=1e-5)
    exported = load_file(other / "dpo" / "export" / "model.safetensors")
    _assert_same_weights(exported, load_file(other / "dpo" / "round_2" / "policy.safetensors"), atol=0)
    if layout == "ep2":  # the exported policy holds all four experts of its MoE layer
        experts = [v for n, v in exported.items() if "w1_EFD" in n]
        assert experts and all(w.shape[0] == 4 for w in experts)
        for checkpoint in (other / "dpo" / "round_2" / "checkpoints").glob("step_*"):  # sharded optimizer state
            assert sorted(p.name for p in checkpoint.glob("optimizer_rank*.pt")) == [
                "optimizer_rank00000.pt", "optimizer_rank00001.pt"
            ]


def test_a_rank_killed_mid_round_resumes_from_the_rounds_files(inputs, runs):
    reference = runs["two"]
    first_round_steps = json.loads((reference / "dpo" / "round_1" / "round.json").read_text())["values"]["train"]["steps"]
    assert json.loads((reference / "dpo" / "round_2" / "round.json").read_text())["values"]["train"]["steps"] >= 4
    out, overrides = _new_run(inputs, "killed")
    log = inputs / "killed.log"
    # Rank 1 dies after round 2's third step; its newest checkpoint is round 2's step 2.
    kill_at = first_round_steps + 3
    run_logged([TORCHRUN_SH, *overrides], log, TIMEOUT_S, process_env(
        STAGE="dpo", NPROC_PER_NODE="2", MAX_RESTARTS="1", ENTRY=str(SIGKILL_WORKER), SIGKILL_AT=f"1:{kill_at}",
    ))
    text = log.read_text()
    assert f"rank 1 kills itself after step {kill_at}" in text
    assert "exitcode: -9" in text  # torchrun saw the SIGKILL and restarted the job
    assert "round 1 finished earlier" in text  # round 1 is read back, not rerun
    # Round 2 is sampled by the first attempt only (each of the 2 ranks says so once) and read
    # back by the second.
    assert text.count("round 2: sampling") == 2 and text.count("round 2: 40 pairs of 40 users read from") == 2
    assert f"resumed from {out / 'dpo' / 'round_2' / 'checkpoints' / 'step_00000002'} at step 2" in text
    expected, got = (load_file(run / "dpo" / "export" / "model.safetensors") for run in (reference, out))
    _assert_same_weights(got, expected, atol=1e-6)
    _assert_same_pairs(_pairs(out, 2), _pairs(reference, 2))
    ours, theirs = (json.loads((run / "dpo" / "alignment.json").read_text()) for run in (out, reference))
    for mine, reference_round in zip(ours["rounds"], theirs["rounds"], strict=True):
        assert mine["train"] == pytest.approx(reference_round["train"], rel=1e-6, abs=1e-7)
