"""`onerec.report`: the run-directory readers, the tables, and the written page, on run
directories fabricated in the stages' own formats (RunLogger records, SemanticIds.save,
alignment.json, metrics.json)."""

import json
import math

import numpy as np
import pytest
import torch

from onerec.config import LoggingConfig
from onerec.logging import RunLogger, codebook_scalars, expert_load_scalars, write_json_atomic
from onerec.report import training_figures, write_report
from onerec.report.run_files import (
    codebook_usage,
    expert_load_by_step,
    level_usage,
    read_metrics_log,
    series,
    stage_rows,
)
from onerec.report.tables import alignment_table, metrics_table
from onerec.tokenizer.semantic_ids import SemanticIds, add_dedup_level, codebook_stats

SECTION_TITLES = (
    "Pretraining curves",
    "MoE expert load",
    "Codebook utilisation",
    "Reward model training",
    "Preference alignment (IPA)",
    "Evaluation metrics",
)
ALL_FIGURES = {"pretrain_curves", "expert_load", "codebook_utilization", "reward_curves", "alignment"}
METRICS = {"recall@5": 0.2, "ndcg@5": 0.1, "recall@10": 0.3, "ndcg@10": 0.15}


def _log(run_dir, stage, steps_and_metrics):
    logger = RunLogger(LoggingConfig(wandb="disabled"), run_dir, stage, {}, rank=0)
    for step, metrics in steps_and_metrics:
        logger.log(metrics, step=step)
    logger.close()


def _tokenize(run_dir):
    """Semantic IDs as the tokenize stage saves them: 2 levels of 4 codes + dedup, 12 items."""
    codes = torch.tensor([[i % 4, (i // 4) % 4] for i in range(12)])  # level 1 leaves code 3 unused
    with_dedup, dedup_size = add_dedup_level(codes)
    stats = codebook_stats(codes, [4, 4])
    SemanticIds(with_dedup, [4, 4, dedup_size], 2, stats).save(run_dir / "semantic_ids")
    (run_dir / "data").mkdir()
    write_json_atomic(run_dir / "data" / "meta.json", {"users": 5, "items": 12, "interactions": 40})
    _log(run_dir, "tokenize", [(0, codebook_scalars(stats))])


def _pretrain(run_dir):
    train = []
    for step in (5, 10, 15, 20):
        load = [[0.5 - 0.01 * step, 0.25, 0.125 + 0.01 * step, 0.125], [0.25, 0.25, 0.25, 0.25]]
        train.append((step, {"loss": 2.0 - 0.05 * step, "ntp_loss": 1.9 - 0.05 * step, "aux_loss": 1.1,
                             "z_loss": 0.0, "lr": 1e-3, **expert_load_scalars(load)}))
    valid = [(step, {f"valid/{k}": v + 0.001 * step for k, v in METRICS.items()}) for step in (10, 20)]
    _log(run_dir, "pretrain", [train[0], train[1], valid[0], train[2], train[3], valid[1]])


def _reward(run_dir):
    """What the reward stage logs through the Trainer: 3 epochs of 4 steps, held-out loss after each."""
    train = [(step, {"loss": 0.7 - 0.01 * step, "batch_loss": 0.7 - 0.01 * step, "lr": 1e-3}) for step in range(1, 13)]
    valid = [(step, {"valid/heldout_loss": 0.65 - 0.01 * step, "valid/neg_heldout_loss": 0.01 * step - 0.65})
             for step in (4, 8, 12)]
    _log(run_dir, "reward", sorted(train + valid, key=lambda record: record[0]))


def _alignment_values(reward, recall):
    return {"users": 8, "reward_mean": reward, "reward_max": reward + 0.1,
            "per_signal": {"like": {"mean": reward, "max": reward + 0.1}},
            "recall@5": recall / 2, "ndcg@5": recall / 4, "recall@10": recall, "ndcg@10": recall / 3}


def _align_and_evaluate(run_dir):
    _reward(run_dir)
    train_stats = {"users": 10, "pairs": 10, "chosen_reward": 0.9, "rejected_reward": 0.4, "dpo_loss": 0.65,
                   "ntp_loss": 1.2, "preference_accuracy": 0.8}
    rounds = [
        {**_alignment_values(0.6, 0.30), "train": train_stats, "accepted": True},
        {**_alignment_values(0.7, 0.10), "train": train_stats, "accepted": False},
    ]
    alignment = {"eval_split": "valid", "eval_users": 8, "config": {"max_recall_drop": 0.02, "rounds": 3},
                 "pretrain": _alignment_values(0.5, 0.30), "rounds": rounds, "exported_round": 1, "wall_seconds": 1.0}
    write_json_atomic(run_dir / "dpo" / "alignment.json", alignment)
    popularity = {split: {k: v / 2 for k, v in METRICS.items()} for split in ("valid", "test")}
    write_json_atomic(run_dir / "metrics.json", {
        "baselines": {"popularity": popularity},
        "model": "dpo/export",
        "pretrain_model": {"valid": dict(METRICS), "test": dict(METRICS)},
        "valid": {k: v + 0.01 for k, v in METRICS.items()},
        "test": {k: v + 0.02 for k, v in METRICS.items()},
        "data": {"users": 5, "items": 12, "interactions": 40},
        "alignment": alignment,
        "wall_seconds": 12.0,
    })


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "run"
    run_dir.mkdir()
    _tokenize(run_dir)
    _pretrain(run_dir)
    _align_and_evaluate(run_dir)
    page = write_report(run_dir)
    return run_dir, page.read_text(encoding="utf-8")


def test_report_has_every_section_and_one_png_per_figure(full_run):
    run_dir, page = full_run
    assert {p.stem for p in (run_dir / "report").iterdir()} == ALL_FIGURES
    for png in (run_dir / "report").iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    for title in SECTION_TITLES:
        assert f"<h2>{title}</h2>" in page
    for name in ALL_FIGURES:
        assert f'<img src="report/{name}.png"' in page
    assert 'class="note"' not in page
    assert "<script" not in page and "http" not in page  # static, nothing fetched
    assert "OneRec (after IPA, round 1)" in page and "popularity baseline" in page


def test_report_of_a_run_with_only_data_and_tokenize_notes_the_missing_stages(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _tokenize(run_dir)
    (run_dir / "report").mkdir()
    (run_dir / "report" / "alignment.png").write_bytes(b"from an older report")
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert [p.name for p in (run_dir / "report").iterdir()] == ["codebook_utilization.png"]  # the stale one is gone
    for title in SECTION_TITLES:
        assert f"<h2>{title}</h2>" in page
    assert page.count('class="note"') == 5
    assert "run `onerec pretrain`" in page and "run `onerec evaluate`" in page and "IPA has not run" in page
    assert training_figures(run_dir).keys() == {"codebook_utilization"}


def test_write_report_names_a_missing_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        write_report(tmp_path / "nope")


def test_expert_load_array_holds_the_logged_shares_by_step_layer_and_expert():
    rows = stage_rows([
        {"stage": "pretrain", "step": 10, "moe/load/layer0/expert0": 0.75, "moe/load/layer0/expert1": 0.25,
         "moe/load/layer1/expert0": 0.5, "moe/load/layer1/expert1": 0.5, "loss": 1.0},
        {"stage": "pretrain", "step": 10, "valid/ndcg@10": 0.1},  # merged into step 10
        {"stage": "pretrain", "step": 20, "moe/load/layer0/expert0": 0.6, "moe/load/layer0/expert1": 0.4},
        {"stage": "pretrain", "step": 25, "valid/ndcg@10": 0.2},  # no load: not a column of the heat map
        {"stage": "tokenize", "step": 30, "moe/load/layer0/expert0": 9.0},  # another stage
    ], "pretrain")
    steps_T, load_TLE = expert_load_by_step(rows)
    assert steps_T.tolist() == [10, 20]
    assert load_TLE.shape == (2, 2, 2)
    assert load_TLE[0].tolist() == [[0.75, 0.25], [0.5, 0.5]]
    assert load_TLE[1, 0].tolist() == [0.6, 0.4]
    assert np.isnan(load_TLE[1, 1]).all()  # layer 1 not logged at step 20
    assert series(rows, "valid/ndcg@10")[0].tolist() == [10, 25]


def test_expert_load_array_from_the_pretrain_log(full_run):
    run_dir, _ = full_run
    steps_T, load_TLE = expert_load_by_step(stage_rows(read_metrics_log(run_dir), "pretrain"))
    assert steps_T.tolist() == [5, 10, 15, 20]
    assert load_TLE.shape == (4, 2, 4)
    np.testing.assert_allclose(load_TLE[:, 0, 0], [0.45, 0.40, 0.35, 0.30])
    np.testing.assert_allclose(load_TLE[:, 1, :], 0.25)
    np.testing.assert_allclose(load_TLE.sum(axis=2), 1.0)


def test_stage_rows_keep_the_latest_run_and_let_a_resume_replace_its_steps():
    def rec(step, loss):
        return {"stage": "pretrain", "step": step, "loss": loss}

    first = [rec(5, 9.0), rec(10, 9.0), rec(15, 9.0)]
    fresh = [rec(5, 1.0), rec(10, 1.0), rec(15, 1.0), rec(20, 1.0)]
    resumed = [rec(15, 0.5), rec(20, 0.5), rec(25, 0.5)]  # restarted from a step-10 checkpoint
    rows = stage_rows(first + fresh + resumed, "pretrain")
    assert [(r.step, r.values["loss"]) for r in rows] == [(5, 1.0), (10, 1.0), (15, 0.5), (20, 0.5), (25, 0.5)]


def test_metrics_log_skips_a_truncated_last_line_but_names_a_damaged_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"stage": "pretrain", "step": 1, "loss": 1.0}\n{"stage": "pretr')
    assert read_metrics_log(tmp_path) == [{"stage": "pretrain", "step": 1, "loss": 1.0}]
    path.write_text('{"stage": "pretr\n{"stage": "pretrain", "step": 1, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1"):
        read_metrics_log(tmp_path)


def test_codebook_usage_counts_items_per_code_as_codebook_stats_does(full_run):
    run_dir, _ = full_run
    usage = codebook_usage(run_dir)
    assert usage.num_items == 12 and usage.unique_tuples == 12 and usage.collision_rate == 0.0
    assert usage.levels[0].items_per_code.tolist() == [3, 3, 3, 3]
    assert usage.levels[1].items_per_code.tolist() == [4, 4, 4, 0]
    assert usage.levels[1].used_fraction == 0.75
    assert usage.levels[1].perplexity == pytest.approx(3.0)
    assert usage.dedup_size == 1
    stats = codebook_stats(torch.tensor([[0, 1], [0, 2], [1, 2], [3, 2]]), [4, 4])
    for level, expected in enumerate(stats["per_level"]):
        got = level_usage(np.array([[0, 1], [0, 2], [1, 2], [3, 2]])[:, level], 4, level)
        assert got.used_fraction == expected["utilization"]
        assert math.isclose(got.perplexity, expected["perplexity"])
        assert math.isclose(got.entropy_bits, expected["entropy"])


def test_metrics_table_puts_the_model_beside_the_pre_ipa_model_and_popularity(full_run):
    run_dir, _ = full_run
    columns, rows = metrics_table(json.loads((run_dir / "metrics.json").read_text()))
    assert columns == ["split", "model", "recall@5", "ndcg@5", "recall@10", "ndcg@10"]
    assert [r[:2] for r in rows] == [
        ["valid", "OneRec (after IPA, round 1)"], ["valid", "OneRec (before IPA)"], ["valid", "popularity baseline"],
        ["test", "OneRec (after IPA, round 1)"], ["test", "OneRec (before IPA)"], ["test", "popularity baseline"],
    ]
    assert rows[3][4] == pytest.approx(0.32) and rows[5][4] == pytest.approx(0.15)


def test_alignment_table_marks_accepted_rejected_and_exported_rounds(full_run):
    run_dir, _ = full_run
    columns, rows = alignment_table(json.loads((run_dir / "dpo" / "alignment.json").read_text()))
    assert [r[:2] for r in rows] == [
        ["before IPA", "pretrained"], ["round 1", "accepted, exported"], ["round 2", "rejected"],
    ]
    assert rows[2][columns.index("recall@10")] == 0.10
    assert rows[1][columns.index("train pairs")] == 10 and rows[0][columns.index("train pairs")] is None


def test_training_figures_are_the_expert_load_and_codebook_plots(full_run):
    run_dir, _ = full_run
    figures = training_figures(run_dir)
    assert set(figures) == {"expert_load", "codebook_utilization"}
    assert len(figures["expert_load"].axes) == 3  # two MoE layers + the colour bar


def test_reward_curves_draw_the_trainer_log_by_step_and_an_older_per_epoch_log_by_epoch():
    from onerec.report.figures import reward_curves_figure

    by_step = stage_rows([
        *({"stage": "reward", "step": s, "loss": 0.7, "batch_loss": 0.6} for s in range(1, 7)),
        {"stage": "reward", "step": 3, "valid/heldout_loss": 0.5},
        {"stage": "reward", "step": 6, "valid/heldout_loss": 0.4},
    ], "reward")
    per_epoch = stage_rows([{"stage": "reward", "step": e, "train_loss": 0.6, "heldout_loss": 0.5} for e in (1, 2)],
                           "reward")
    for rows, x_label, points in ((by_step, "step", [6, 2]), (per_epoch, "epoch", [2, 2])):
        (ax,) = reward_curves_figure(rows).axes
        assert ax.get_xlabel() == x_label
        assert [len(line.get_xdata()) for line in ax.get_lines()] == points
