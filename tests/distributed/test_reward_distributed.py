"""`onerec reward` through the shared Trainer with real processes (gloo, CPU): two torchrun ranks
end where one process ends with the same global batch, and a job that loses a rank to SIGKILL
restarts, resumes from its last epoch checkpoint and ends with the uninterrupted job's weights.

Data: the alignment test's synthetic log (tests/integration/test_alignment.py: ratings that
carry a target-aware preference) for 120 users, prepared once by the data and tokenize
stages. It gives 361 training sessions: global batches of 40 (reward.batch_size, 20 per rank
on two ranks) make epochs of 10 steps whose last step holds one session, so rank 1 gets none
there (the path of a short last batch) and a rank's loss must be scaled by the global batch,
not averaged over its own share.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from distributed_helpers import BIN, REPO, logged_records, process_env, run_logged

TORCHRUN_SH = str(REPO / "launch" / "torchrun.sh")
SIGKILL_WORKER = REPO / "tests" / "distributed" / "sigkill_worker.py"
TIMEOUT_S = 300
TRAIN_SESSIONS = 361
EPOCHS, STEPS_PER_EPOCH = 4, 10  # ceil(361 / 40)
STEPS = EPOCHS * STEPS_PER_EPOCH

_spec = importlib.util.spec_from_file_location("onerec_integration_alignment",
                                               REPO / "tests" / "integration" / "test_alignment.py")
alignment_test = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(alignment_test)

DATA = [
    "data.format=csv", "data.interactions_file=log.csv", "data.items_file=items.csv", "data.user_column=user",
    "data.item_column=item", "data.time_column=ts", "data.feedback_columns=[rating]", "data.max_history=6",
    "data.session_len=2", "tokenizer.encoder=hashing", "tokenizer.levels=2", "tokenizer.codebook_size=6",
]
REWARD = [
    "reward.d_model=16", "reward.batch_size=40", f"reward.max_epochs={EPOCHS}", "reward.patience=0", "reward.lr=3e-3",
    "reward.holdout_fraction=0.25",
    "reward.signals=[{name: like, column: rating, threshold: 3.5}, {name: rating, column: rating, kind: regression}]",
    "train.log_every=1", "train.keep_checkpoints=4",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(a run directory holding data/ and semantic_ids/, the overrides for it minus run.out_dir)."""
    from onerec.cli import main as cli_main

    tmp = tmp_path_factory.mktemp("reward_distributed")
    alignment_test._write_log(tmp / "raw", num_users=120)
    overrides = [f"data.root={tmp / 'raw'}", *DATA]
    for stage in ("data", "tokenize"):
        assert cli_main([stage, f"run.out_dir={tmp / 'run'}", *overrides]) == 0
    return tmp / "run", overrides


def _new_run(prepared, out):
    source, overrides = prepared
    out.mkdir()
    for part in ("data", "semantic_ids"):
        shutil.copytree(source / part, out / part)
    return [f"run.out_dir={out}", *overrides, *REWARD]


def _torchrun(out, overrides, log, **env):
    run_logged([TORCHRUN_SH, *overrides], log, TIMEOUT_S, process_env(STAGE="reward", NPROC_PER_NODE="2", **env))
    return log.read_text()


def _weights(out):
    from safetensors.torch import load_file

    return load_file(out / "reward" / "model.safetensors")


def _heldout_losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["valid/heldout_loss"] for r in records if r["stage"] == "reward" and "valid/heldout_loss" in r}


def test_two_ranks_end_where_one_process_ends_with_the_same_global_batch(prepared, tmp_path):
    """Dropout is off: ranks draw their own dropout masks, so with it on the runs differ by design.

    Tolerance: the two runs differ only in float rounding (each rank sums its share of the
    batch, the engine averages the two gradients; the held-out loss is summed over two
    shares), about 1e-7 relative per step; 40 Adam steps leave the weights within 1e-5."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_logged([str(BIN / "onerec"), "reward", *_new_run(prepared, one), "reward.dropout=0.0"], tmp_path / "one.log",
               TIMEOUT_S, process_env())
    text = _torchrun(two, [*_new_run(prepared, two), "reward.dropout=0.0"], tmp_path / "two.log")
    assert "is not a multiple of the 2 ranks" not in text
    assert text.count("reward model written to") == 1  # rank 0 writes the output, rank 1 only trains

    expected, got = (json.loads((run / "reward" / "reward.json").read_text()) for run in (one, two))
    assert expected["sessions"]["train"] == TRAIN_SESSIONS
    assert expected["training"] == {**got["training"], "ranks": 1}
    assert got["training"] == {"steps": STEPS, "best_step": got["best_epoch"] * STEPS_PER_EPOCH,
                               "stopped_early": False, "ranks": 2, "global_batch": 40}
    assert got["best_epoch"] == expected["best_epoch"]
    assert got["heldout_loss"] == pytest.approx(expected["heldout_loss"], rel=1e-5)
    for report in ("model", "baseline_item_mean", "baseline_popularity"):
        for signal, values in expected["heldout"][report].items():
            for metric, value in values.items():
                assert got["heldout"][report][signal][metric] == pytest.approx(value, rel=1e-4, abs=1e-5), (
                    report, signal, metric)
    one_losses, two_losses = _heldout_losses(one), _heldout_losses(two)
    assert sorted(one_losses) == sorted(two_losses) == [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)]
    for step, loss in one_losses.items():
        assert two_losses[step] == pytest.approx(loss, rel=1e-5), step
    expected_weights, got_weights = _weights(one), _weights(two)
    assert expected_weights.keys() == got_weights.keys()
    for name in expected_weights:
        torch.testing.assert_close(got_weights[name], expected_weights[name], rtol=0, atol=1e-5, msg=name)


def test_a_rank_killed_mid_reward_run_is_restarted_and_ends_equal_to_an_uninterrupted_run(prepared, tmp_path):
    """Dropout on: the resumed ranks match only if each gets its own RNG state back."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    settings = ["reward.dropout=0.1"]
    _torchrun(reference, [*_new_run(prepared, reference), *settings], tmp_path / "reference.log")
    # Rank 1 SIGKILLs itself right after step 25 on the first attempt; the newest checkpoint
    # then is step 20 (end of epoch 2), so the restarted job replays steps 21..25.
    text = _torchrun(killed, [*_new_run(prepared, killed), *settings], tmp_path / "killed.log",
                     MAX_RESTARTS="1", ENTRY=str(SIGKILL_WORKER), SIGKILL_AT="1:25")
    assert "rank 1 kills itself after step 25" in text
    assert "exitcode: -9" in text  # torchrun saw the SIGKILL...
    assert f"resumed from {killed / 'reward' / 'checkpoints' / 'step_00000020'} at step 20" in text  # ...and restarted

    from onerec.checkpoint import list_checkpoints, verify_checkpoint

    checkpoints = list_checkpoints(killed / "reward" / "checkpoints")
    assert [p.name for p in checkpoints] == [f"step_{STEPS_PER_EPOCH * e:08d}" for e in range(1, EPOCHS + 1)]
    for checkpoint in checkpoints:
        verify_checkpoint(checkpoint)
    expected, got = _weights(reference), _weights(killed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    expected_losses = {s: r["batch_loss"] for s, r in logged_records(reference, "reward").items()}
    got_losses = {s: r["batch_loss"] for s, r in logged_records(killed, "reward").items()}
    assert got_losses.keys() == expected_losses.keys() == set(range(1, STEPS + 1))
    for step, loss in expected_losses.items():
        assert abs(got_losses[step] - loss) <= 1e-6, (step, got_losses[step], loss)
    report, expected_report = (json.loads((run / "reward" / "reward.json").read_text()) for run in (killed, reference))
    assert report["heldout"] == expected_report["heldout"] and report["best_epoch"] == expected_report["best_epoch"]
