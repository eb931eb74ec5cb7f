"""pretrain -> reward -> dpo -> evaluate through `onerec pipeline`, on a synthetic log whose
ratings carry a target-aware preference: a user likes items of their own parity, and mostly
watches those, so only a model that reads the history can tell a liked session from another."""

import json
import random

import pytest

from onerec.cli import main as cli_main

NUM_ITEMS = 40
NUM_USERS = 200


def _write_log(root, num_users=NUM_USERS, own_parity_share=0.75):
    root.mkdir()
    rows = ["user,item,ts,rating"]
    rng = random.Random(0)
    for user in range(num_users):
        for t in range(8 + user % 4):
            # 75% of a user's items share their parity (and are liked): the history tells
            # the user's taste, while every item is liked by some of its viewers only
            same = rng.random() < own_parity_share
            item = 2 * rng.randrange(NUM_ITEMS // 2) + (user % 2 if same else 1 - user % 2)
            rating = 5 if item % 2 == user % 2 else 1
            rows.append(f"u{user},i{item},{1000 * user + t},{rating}")
    (root / "log.csv").write_text("\n".join(rows) + "\n")
    items = ["item_id,title"] + [f"i{i},Item {i} of group {i % 4}" for i in range(NUM_ITEMS)]
    (root / "items.csv").write_text("\n".join(items) + "\n")


@pytest.fixture(scope="module")
def aligned_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("alignment")
    _write_log(tmp / "raw")
    overrides = [
        f"run.out_dir={tmp / 'run'}", "data.format=csv", f"data.root={tmp / 'raw'}", "data.interactions_file=log.csv",
        "data.items_file=items.csv", "data.user_column=user", "data.item_column=item", "data.time_column=ts",
        "data.feedback_columns=[rating]", "data.max_history=6", "data.session_len=2",
        "tokenizer.encoder=hashing", "tokenizer.levels=2", "tokenizer.codebook_size=6",
        "model.d_model=32", "model.num_heads=2", "model.encoder_layers=1", "model.decoder_layers=1",
        "model.d_ff=64", "model.dropout=0.0", "train.batch_size=32", "train.max_epochs=8", "train.lr=3e-3",
        "train.warmup_steps=10", "train.eval_every=40", "train.checkpoint_every=40", "train.patience=0",
        "eval.beam_width=10",
        "reward.enabled=true", "reward.d_model=32", "reward.max_epochs=40", "reward.batch_size=32", "reward.dropout=0.0", "reward.lr=3e-3", "reward.holdout_fraction=0.25",
        "reward.signals=[{name: like, column: rating, threshold: 3.5}, {name: rating, column: rating, kind: regression, weight: 0.0}]",
        "align.enabled=true", "align.rounds=2", "align.users_fraction=0.5", "align.num_samples=8",
        "align.lr=1e-3", "align.batch_size=16", "align.eval_users=40", "align.max_recall_drop=1.0",
    ]
    assert cli_main(["pipeline", *overrides]) == 0
    return tmp / "run"


def test_reward_model_reports_auc_against_the_item_mean_baseline(aligned_run):
    report = json.loads((aligned_run / "reward" / "reward.json").read_text())
    like_model = report["heldout"]["model"]["like"]
    like_base = report["heldout"]["baseline_item_mean"]["like"]
    # every item is liked by half the users: only a target-aware model can rank sessions
    assert like_model["auc"] > 0.7 and like_model["auc"] > like_base["auc"] + 0.1
    assert "rmse" in report["heldout"]["model"]["rating"] and "auc" not in report["heldout"]["model"]["rating"]
    assert 0.0 <= report["heldout"]["baseline_popularity"]["like"]["auc"] <= 1.0
    assert "rating" not in report["heldout"]["baseline_popularity"]  # AUC is for binary signals


def test_reward_model_never_sees_the_validation_and_test_interactions(aligned_run):
    # Leave-one-out: each user's last two interactions are their validation and test targets,
    # which IPA is scored on; the reward model learns from the rest only.
    report = json.loads((aligned_run / "reward" / "reward.json").read_text())
    lengths = [8 + user % 4 for user in range(NUM_USERS)]
    assert report["interactions"] == {"used": sum(n - 2 for n in lengths), "logged": sum(lengths)}


def test_metrics_gain_the_alignment_table(aligned_run):
    metrics = json.loads((aligned_run / "metrics.json").read_text())
    alignment = metrics["alignment"]
    assert len(alignment["rounds"]) == 2
    for row in [alignment["pretrain"], *alignment["rounds"]]:
        assert {"reward_mean", "reward_max", "recall@10", "ndcg@10", "per_signal"} <= set(row)
        assert row["reward_max"] >= row["reward_mean"]
        assert set(row["per_signal"]) == {"like", "rating"}
        assert 0.0 <= row["per_signal"]["like"]["mean"] <= 1.0
    assert alignment["rounds"][0]["train"]["pairs"] > 0
    assert metrics["model"] == "dpo/export" and set(metrics["pretrain_model"]) == {"valid", "test"}
    assert (aligned_run / "dpo" / "export" / "model.safetensors").exists()


def test_alignment_bench_tables_the_run(aligned_run, tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).parents[2] / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("alignment_bench", bench / "alignment.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = aligned_run / "config.yaml"
        result = module.main(["--config", str(config), "--name", "tiny", "--skip-pipeline",
                              "--results-dir", str(tmp_path)])
    finally:
        sys.path.remove(str(bench))
    saved = json.loads((tmp_path / "alignment_tiny.json").read_text())
    metrics = json.loads((aligned_run / "metrics.json").read_text())
    assert saved["alignment"] == metrics["alignment"] and saved == json.loads(json.dumps(result))
    first, last = metrics["alignment"]["pretrain"], metrics["alignment"]["rounds"][-1]
    assert saved["exported_round"] == 2
    assert saved["change_of_exported_model"]["reward_mean"] == pytest.approx(
        (last["reward_mean"] - first["reward_mean"]) / abs(first["reward_mean"]))
    table = (tmp_path / "alignment_tiny.md").read_text()
    assert "| pretrained |" in table and "| IPA round 2 |" in table and "| like (AUC) |" in table


def test_a_round_that_costs_recall_is_rejected_and_the_previous_model_exported(aligned_run, tmp_path, monkeypatch):
    """Every round's held-out recall is made to halve: round 1 is rejected, the pretrained weights go out."""
    import shutil

    import torch
    from safetensors.torch import load_file

    import onerec.stages.dpo as dpo_stage

    run = tmp_path / "run"
    shutil.copytree(aligned_run, run, ignore=shutil.ignore_patterns("dpo"))
    real_evaluate, calls = dpo_stage.evaluate_alignment, []

    def evaluate_with_recall_collapsing_after_training(*args, **kwargs):
        values = real_evaluate(*args, **kwargs)
        if calls:  # every evaluation after the pretrained one
            values["recall@10"] *= 0.5
        calls.append(values["recall@10"])
        return values

    monkeypatch.setattr(dpo_stage, "evaluate_alignment", evaluate_with_recall_collapsing_after_training)
    config = run / "config.yaml"
    assert cli_main(["dpo", "--config", str(config), f"run.out_dir={run}", "align.max_recall_drop=0.02"]) == 0
    alignment = json.loads((run / "dpo" / "alignment.json").read_text())
    assert len(alignment["rounds"]) == 1 and alignment["rounds"][0]["accepted"] is False
    assert alignment["exported_round"] == 0
    exported = load_file(run / "dpo" / "export" / "model.safetensors")
    pretrained = load_file(run / "pretrain" / "export" / "model.safetensors")
    assert exported.keys() == pretrained.keys()
    assert all(torch.equal(exported[k], pretrained[k]) for k in exported)


def test_implicit_reward_tells_consumed_sessions_from_popular_ones(tmp_path):
    """Implicit data, as on Amazon: no feedback column, the signal is `consumed`; each real next
    session is set against a session drawn by popularity. Users consume items of their own
    parity 90% of the time, so a reward model that reads the history beats popularity."""
    _write_log(tmp_path / "raw", num_users=600, own_parity_share=0.9)
    overrides = [
        f"run.out_dir={tmp_path / 'run'}", "data.format=csv", f"data.root={tmp_path / 'raw'}",
        "data.interactions_file=log.csv", "data.items_file=items.csv", "data.user_column=user",
        "data.item_column=item", "data.time_column=ts", "data.max_history=6", "data.session_len=2",
        "tokenizer.encoder=hashing", "tokenizer.levels=2", "tokenizer.codebook_size=6",
        "reward.d_model=32", "reward.max_epochs=40", "reward.batch_size=32", "reward.dropout=0.0",
        "reward.lr=3e-3", "reward.holdout_fraction=0.25", "reward.negatives=1",
        "reward.signals=[{name: consumed, column: consumed, threshold: 0.5}]",
    ]
    for stage in ("data", "tokenize", "reward"):
        assert cli_main([stage, *overrides]) == 0
    report = json.loads((tmp_path / "run" / "reward" / "reward.json").read_text())
    ours = report["heldout"]["model"]["consumed"]["auc"]
    popularity = report["heldout"]["baseline_popularity"]["consumed"]["auc"]
    item_mean = report["heldout"]["baseline_item_mean"]["consumed"]["auc"]
    assert ours > 0.6 and ours > popularity + 0.05 and ours > item_mean + 0.05, (ours, popularity, item_mean)
    # one drawn negative per real session (sessions of 2 items: ceil(6..9 / 2) per user)
    sessions = report["sessions"]
    real = sum((8 + user % 4 - 2 + 1) // 2 for user in range(600))
    assert sessions["train"] + sessions["heldout"] == 2 * real
