"""The whole pipeline through the CLI on a small synthetic log with a learnable pattern."""

import json

import pytest

from onerec.cli import main as cli_main

NUM_ITEMS = 48
NUM_USERS = 60


def _load_bench(name: str):
    """bench/<name>.py as a module (bench/ is scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[2] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_log(root):
    """Each user walks the catalogue in steps of +1 from their own start: next item = last + 1."""
    root.mkdir()
    rows = ["user,item,ts"]
    for user in range(NUM_USERS):
        start = (user * 7) % NUM_ITEMS
        length = 6 + user % 5
        for t in range(length):
            rows.append(f"u{user},i{(start + t) % NUM_ITEMS},{1000 * user + t}")
    (root / "log.csv").write_text("\n".join(rows) + "\n")
    items = ["item_id,title,genre"] + [f"i{i},Item number {i},genre {i % 6}" for i in range(NUM_ITEMS)]
    (root / "items.csv").write_text("\n".join(items) + "\n")


def _overrides(tmp):
    out = tmp / "run"
    return [
        f"run.out_dir={out}",
        "data.format=csv",
        f"data.root={tmp / 'raw'}",
        "data.interactions_file=log.csv",
        "data.items_file=items.csv",
        "data.user_column=user",
        "data.item_column=item",
        "data.time_column=ts",
        "data.max_history=8",
        "data.text_fields=[title,genre]",
        "tokenizer.encoder=hashing",
        "tokenizer.levels=2",
        "tokenizer.codebook_size=8",
        "model.d_model=32",
        "model.num_heads=2",
        "model.encoder_layers=1",
        "model.decoder_layers=1",
        "model.d_ff=64",
        "model.dropout=0.0",
        "train.batch_size=32",
        "train.max_epochs=30",
        "train.lr=3e-3",
        "train.warmup_steps=10",
        "train.eval_every=40",
        "train.checkpoint_every=40",
        "train.patience=0",
        "eval.beam_width=10",
        "sasrec.d_model=16",
        "sasrec.layers=1",
        "sasrec.max_epochs=5",
    ]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    _write_log(tmp / "raw")
    assert cli_main(["pipeline", *_overrides(tmp)]) == 0
    return tmp / "run"


def test_pipeline_writes_the_metrics_contract(pipeline_run):
    metrics = json.loads((pipeline_run / "metrics.json").read_text())
    keys = {"recall@5", "ndcg@5", "recall@10", "ndcg@10"}
    assert set(metrics["test"]) == keys and set(metrics["valid"]) == keys
    assert set(metrics["baselines"]["popularity"]["test"]) == keys
    assert metrics["data"] == {"users": NUM_USERS, "items": NUM_ITEMS, "interactions": sum(6 + u % 5 for u in range(NUM_USERS))}
    assert metrics["semantic_ids"]["codebook_size"] == 8
    assert 0.0 <= metrics["semantic_ids"]["collision_rate_before_dedup"] <= 1.0
    assert metrics["wall_seconds"] > 0
    for split in ("valid", "test"):
        m = metrics[split]
        assert 0.0 <= m["ndcg@5"] <= m["recall@5"] <= m["recall@10"] <= 1.0


def test_model_learns_the_pattern_better_than_popularity(pipeline_run):
    metrics = json.loads((pipeline_run / "metrics.json").read_text())
    assert metrics["test"]["recall@10"] > metrics["baselines"]["popularity"]["test"]["recall@10"] + 0.2


def test_stages_leave_their_outputs(pipeline_run):
    for path in ("config.yaml", "data/meta.json", "semantic_ids", "pretrain/export/model.safetensors",
                 "pretrain/export/config.json", "pretrain/best/model.safetensors", "metrics.jsonl"):
        assert (pipeline_run / path).exists(), path


def test_recommend_prints_real_items_with_titles(pipeline_run, capsys):
    assert cli_main(["recommend", "--model", str(pipeline_run / "pretrain/export"), "--history", "i3 i4 i5",
                     "--top-k", "5", "--beam-width", "10"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6  # header + 5
    assert all("Item number" in line for line in lines[1:])


def test_recommend_can_leave_out_the_history(pipeline_run):
    from onerec.export import load_export
    from onerec.inference.recommend import recommend

    exported = load_export(pipeline_run / "pretrain/export")
    n = len(exported.raw_ids)
    plain = recommend(exported, ["i3"], top_k=n, beam_width=n, exclude_history=False)
    history = [r.item_id for r in plain[:3]]  # the model's own favourites after i3, as history
    kept = recommend(exported, ["i3", *history], top_k=5, beam_width=10, exclude_history=True)
    assert len(kept) == 5 and not {r.item_id for r in kept} & {"i3", *history}


def test_recommend_rejects_unknown_items(pipeline_run, capsys):
    assert cli_main(["recommend", "--model", str(pipeline_run / "pretrain/export"), "--history", "i3 nope"]) == 2


def test_quality_bench_tables_ours_sasrec_popularity_and_published_rows(pipeline_run, tmp_path):
    quality = _load_bench("quality")
    published = tmp_path / "published.json"
    paper = {"recall@5": 0.1, "ndcg@5": 0.05, "recall@10": 0.2, "ndcg@10": 0.1}
    published.write_text(json.dumps({"rows": {"Paper": paper}, "target": {"row": "Paper", "factor": 1.1}}))
    result = quality.main(
        ["--name", "tiny", "--published", str(published), "--skip-pipeline", "--tokenizer-report",
         "--results-dir", str(tmp_path / "results"), *_overrides(pipeline_run.parent)]
    )
    saved = json.loads((tmp_path / "results" / "quality_tiny.json").read_text())
    metrics = json.loads((pipeline_run / "metrics.json").read_text())
    assert saved["ours"]["test"] == metrics["test"]  # the table reports what the evaluate stage measured
    assert saved["popularity"] == metrics["baselines"]["popularity"]
    assert set(saved["sasrec"]["test"]) == set(paper) and saved["sasrec"] == result["sasrec"]
    assert saved["target"]["recall@10"] == pytest.approx(0.22)
    assert saved["target_met"]["recall@10"] == (metrics["test"]["recall@10"] >= 0.22)
    for method in ("rq_kmeans", "rq_vae"):
        assert len(saved["tokenizers"][method]["utilization"]) == 2
    table = (tmp_path / "results" / "quality_tiny.md").read_text()
    assert "| Paper |" in table and "| SASRec (ours, CE) |" in table and "| OneRec (ours) |" in table


def test_quality_bench_over_seeds_reports_mean_spread_and_each_seed(pipeline_run, tmp_path):
    """--seeds 2 with --skip-pipeline over two copies of one finished run (as two seeds' runs
    would sit, in <run.out_dir>-seed<N>): OneRec's numbers are the same in both, so their
    spread is 0; SASRec is trained once per seed, with that seed."""
    import shutil
    import statistics

    from onerec.config import load_config

    quality = _load_bench("quality")
    overrides = _overrides(tmp_path)
    base = load_config(None, overrides).run.seed
    for seed in (base, base + 1):
        shutil.copytree(pipeline_run, tmp_path / f"run-seed{seed}")
    shutil.copytree(pipeline_run.parent / "raw", tmp_path / "raw")
    result = quality.main(["--name", "tiny", "--seeds", "2", "--skip-pipeline", "--results-dir",
                           str(tmp_path / "results"), *overrides])
    metrics = json.loads((pipeline_run / "metrics.json").read_text())
    assert result["seeds"] == [base, base + 1] and [r["seed"] for r in result["per_seed"]] == result["seeds"]
    assert result["ours"]["test"] == pytest.approx(metrics["test"]) and set(result["ours"]["test_std"].values()) == {0.0}
    per_seed = [r["sasrec"]["test"]["ndcg@10"] for r in result["per_seed"]]
    assert result["sasrec"]["test"]["ndcg@10"] == pytest.approx(statistics.fmean(per_seed))
    assert result["sasrec"]["test_se"]["ndcg@10"] == pytest.approx(statistics.stdev(per_seed) / 2**0.5)
    for seed in (base, base + 1):  # each seed's SASRec in its own run directory
        assert (tmp_path / f"run-seed{seed}" / "baselines" / "sasrec" / "metrics.json").is_file()
    table = (tmp_path / "results" / "quality_tiny.md").read_text()
    assert "measured, mean ± std of 2 seeds" in table and f"Seeds (run.seed): {base}, {base + 1}" in table
    assert quality.seed_overrides(load_config(None, overrides), 1) == [[]]  # one seed: the run as configured


def test_validation_bench_scores_valid_only_and_matches_the_evaluate_stage(pipeline_run, capsys):
    validation = _load_bench("validation")
    rows = validation.main(["--run", str(pipeline_run), "--exclude-history", "both"])
    metrics = json.loads((pipeline_run / "metrics.json").read_text())
    plain = next(r for r in rows if not r["exclude_history"])
    assert {k: plain[k] for k in metrics["valid"]} == metrics["valid"]  # the same search, the same users
    assert len(rows) == 2 and [r["exclude_history"] for r in rows] == [False, True]
    assert "| history excluded |" in capsys.readouterr().out


def test_prefix_hits_count_users_by_the_depth_of_their_best_matching_beam():
    import torch

    prefix_hits = _load_bench("prefix_recall").prefix_hits
    beams_BWL = torch.tensor([[[1, 2, 3], [1, 2, 4], [5, 0, 0]], [[7, 7, 7], [-1, -1, -1], [-1, -1, -1]]])
    targets_BL = torch.tensor([[1, 2, 4], [7, 8, 7]])
    # user 0: beam 1 is the item (depth 3); in the top 1 only depth 2. user 1: depth 1 only (the
    # third code matches, but not after a mismatch).
    assert prefix_hits(beams_BWL, targets_BL, k=1).tolist() == [2, 1, 0]
    assert prefix_hits(beams_BWL, targets_BL, k=3).tolist() == [2, 1, 1]


def test_prefix_recall_bench_ends_at_the_item_recall_of_the_evaluate_stage(pipeline_run, capsys):
    recall = _load_bench("prefix_recall").main(["--run", str(pipeline_run)])
    metrics = json.loads((pipeline_run / "metrics.json").read_text())
    for name, by_depth in recall.items():
        assert by_depth == sorted(by_depth, reverse=True)  # a deeper prefix can only match less often
        assert by_depth[-1] == pytest.approx(metrics["valid"][name], abs=1e-4)  # rounded to 4 places
    assert "| code depth |" in capsys.readouterr().out


def test_semantic_ids_from_sasrec_vectors_train_the_baseline_first_and_the_bench_reuses_it(tmp_path):
    _write_log(tmp_path / "raw")
    overrides = _overrides(tmp_path) + [
        "tokenizer.collaborative_weight=0.5",
        "tokenizer.collaborative_source=sasrec",
        "train.max_epochs=2",
        "sasrec.max_epochs=2",
    ]
    assert cli_main(["pipeline", *overrides]) == 0
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["stage_seconds"]) == ["data", "baseline", "tokenize", "pretrain", "evaluate"]
    baseline = json.loads((run / "baselines/sasrec/metrics.json").read_text())

    quality = _load_bench("quality")
    result = quality.main(["--name", "tiny", "--skip-pipeline", "--results-dir", str(tmp_path / "results"), *overrides])
    assert result["sasrec_in_pipeline"] and result["sasrec"]["test"] == baseline["test"]
    assert result["seconds"]["sasrec"] == baseline["wall_seconds"]  # reused, not trained again
    assert "Every model was read back from a finished run (--skip-pipeline)" in (tmp_path / "results" / "quality_tiny.md").read_text()


def test_launch_pipeline_script_runs_the_stage_tables_stages_and_skips_finished_ones(tmp_path):
    """launch/pipeline.sh follows `onerec plan`: with a SASRec source it runs the baseline
    stage before tokenize, exactly as `onerec pipeline` does; a rerun skips every fresh stage."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    _write_log(tmp_path / "raw")
    overrides = _overrides(tmp_path) + [
        "tokenizer.collaborative_weight=0.5",
        "tokenizer.collaborative_source=sasrec",
        "train.max_steps=4",
        "sasrec.max_epochs=1",
    ]
    env = dict(os.environ, LAUNCHER="none", ONEREC_VENV=str(Path(sys.executable).parent.parent),
               ONEREC_NO_PROGRESS="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    script = [str(repo / "launch" / "pipeline.sh"), *overrides]
    first = subprocess.run(script, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ran = [line.split()[2] for line in first.stdout.splitlines() if line.startswith("pipeline: == ")]
    assert ran == ["data", "baseline", "tokenize", "pretrain", "evaluate"]
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "config.yaml").is_file()
    again = subprocess.run(script, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("up to date, skipping") == 5


def test_launch_pipeline_runs_every_stage_on_two_ranks(tmp_path):
    """launch/pipeline.sh under torchrun with 2 gloo ranks and a tokenizer that needs SASRec
    vectors: data, baseline, tokenize, pretrain, reward, dpo and evaluate all run to the end,
    the distributed ones (tokenize, pretrain, reward, dpo) on both ranks."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    _write_log(tmp_path / "raw")
    overrides = _overrides(tmp_path) + [
        "tokenizer.collaborative_weight=0.5", "tokenizer.collaborative_source=sasrec", "sasrec.max_epochs=1",
        "train.max_steps=4", "train.batch_size=16",
        "reward.enabled=true", "reward.d_model=16", "reward.max_epochs=2", "reward.batch_size=32",
        "reward.negatives=1", "reward.signals=[{name: consumed, column: consumed, threshold: 0.5}]",
        "align.enabled=true", "align.rounds=1", "align.users_fraction=0.3", "align.num_samples=4",
        "align.batch_size=8", "align.eval_users=16", "align.max_recall_drop=1.0",
    ]
    env = dict(os.environ, LAUNCHER="torchrun", NPROC_PER_NODE="2", MAX_RESTARTS="0",
               ONEREC_VENV=str(Path(sys.executable).parent.parent), ONEREC_NO_PROGRESS="1", WANDB_MODE="disabled",
               HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    result = subprocess.run([str(repo / "launch" / "pipeline.sh"), *overrides], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    ran = [line.split()[2] for line in result.stdout.splitlines() if line.startswith("pipeline: == ")]
    assert ran == ["data", "baseline", "tokenize", "pretrain", "reward", "dpo", "evaluate"]
    run = tmp_path / "run"
    assert (run / "metrics.json").is_file() and (run / "dpo" / "alignment.json").is_file()
    reward = json.loads((run / "reward" / "reward.json").read_text())
    assert reward["training"]["ranks"] == 2
