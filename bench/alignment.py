"""Preference alignment, measured: the reward of generated sessions before and after each IPA round.

    python bench/alignment.py --config configs/kuairand/pipeline.yaml --name kuairand [key=value ...]

Runs `onerec pipeline` (data -> tokenize -> pretrain -> reward -> dpo -> evaluate; the config
must enable reward and align), then writes bench/results/alignment_<name>.{json,md}: the
reward model's held-out AUC per signal beside the item-mean baseline, and OneRec's Table 1
for our model: mean and max reward over the generated sessions, per signal, and Recall/NDCG@10
of the first generated items, before alignment and after each round, on the same held-out
(validation) users. --skip-pipeline re-tabulates a finished run. Its figure,
bench/results/alignment_<name>.png, plots the reward and Recall/NDCG@10 per round.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from onerec.config import load_config
from onerec.logging import setup_console
from onerec.paths import RunPaths

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import bench_parser, pipeline_metrics, run_record, write_results  # noqa: E402  (same folder, same conventions)


def relative(after: float, before: float) -> float:
    return (after - before) / abs(before) if before else float("nan")


def _test_line(test: dict) -> str:
    if not test.get("pretrained"):
        return ""
    aligned, pretrained = test["aligned"], test["pretrained"]
    return (
        f"Test split, all users: Recall@10 {aligned['recall@10']:.4f} exported vs {pretrained['recall@10']:.4f} "
        f"pretrained ({relative(aligned['recall@10'], pretrained['recall@10']):+.2%}), NDCG@10 "
        f"{aligned['ndcg@10']:.4f} vs {pretrained['ndcg@10']:.4f}."
    )


def markdown(result: dict) -> str:
    alignment = result["alignment"]
    signals = list(alignment["pretrain"]["per_signal"])
    head = ["model", "reward mean", "reward max", "recall@10", "ndcg@10"] + [f"{s} (mean / max)" for s in signals]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    rows = [("pretrained", alignment["pretrain"])] + [
        (f"IPA round {i}" + ("" if r.get("accepted", True) else " (rejected)"), r)
        for i, r in enumerate(alignment["rounds"], 1)
    ]
    for name, row in rows:
        cells = [name, f"{row['reward_mean']:.4f}", f"{row['reward_max']:.4f}", f"{row['recall@10']:.4f}", f"{row['ndcg@10']:.4f}"]
        cells += [f"{row['per_signal'][s]['mean']:.4f} / {row['per_signal'][s]['max']:.4f}" for s in signals]
        lines.append("| " + " | ".join(cells) + " |")
    change = result["change_of_exported_model"]
    reward = result["reward_model"]
    popularity = reward.get("baseline_popularity", {})  # absent in runs from before it was reported
    auc_lines = ["| signal | reward model | item-mean baseline | popularity |", "|---|---|---|---|"]
    for name, values in reward["model"].items():
        metric = "auc" if "auc" in values else "rmse"
        pop = f"{popularity[name]['auc']:.4f}" if name in popularity else "-"
        auc_lines.append(
            f"| {name} ({metric.upper()}) | {values[metric]:.4f} | {reward['baseline_item_mean'][name][metric]:.4f} | {pop} |"
        )
    return "\n".join([
        f"## Preference alignment on {result['name']}",
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}; device: {result['device']}; wall time {result['seconds'] / 60:.1f} min "
        f"(reward {result['stage_seconds'].get('reward', 0) / 60:.1f}, dpo {result['stage_seconds'].get('dpo', 0) / 60:.1f}).",
        "",
        f"Generated sessions of {result['session_len']} items, {alignment['config']['num_samples']} per user by "
        f"constrained beam search, scored by the reward model, on {alignment['eval_users']} held-out "
        f"({alignment['eval_split']}) users:",
        "",
        *lines,
        "",
        f"Exported (the last round within align.max_recall_drop={alignment['config'].get('max_recall_drop', 1.0)} "
        f"of the pretrained Recall@10): round {result['exported_round']}: reward mean {change['reward_mean']:+.2%}, "
        f"reward max {change['reward_max']:+.2%}, Recall@10 {change['recall@10']:+.2%} (relative to the pretrained model).",
        "",
        _test_line(result["test"]),
        "",
        "Reward model on held-out users' logged sessions (AUC: concordance with the session's event rate):",
        "",
        *auc_lines,
    ]) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = bench_parser(__doc__, "pipeline YAML with reward.enabled and align.enabled", "kuairand")
    parser.add_argument("--skip-pipeline", action="store_true", help="reuse <out>/metrics.json from a finished run")
    args = parser.parse_args(argv)
    setup_console()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_config(args.config, args.overrides)
    if not (cfg.reward.enabled and cfg.align.enabled):
        raise SystemExit("the config must set reward.enabled=true and align.enabled=true")
    paths = RunPaths.of(cfg.run.out_dir)
    started = time.perf_counter()
    metrics = pipeline_metrics(cfg, args.skip_pipeline)
    alignment = metrics["alignment"]
    exported_round = alignment.get("exported_round", len(alignment["rounds"]))
    first = alignment["pretrain"]
    last = alignment["rounds"][exported_round - 1] if exported_round else first
    result = {
        **run_record("alignment.py", args.name, argv, cfg),
        "session_len": cfg.data.session_len,
        "alignment": alignment,
        "reward_model": json.loads((paths.reward / "reward.json").read_text())["heldout"],
        "exported_round": exported_round,
        "change_of_exported_model": {k: relative(last[k], first[k]) for k in ("reward_mean", "reward_max", "recall@10")},
        "test": {"aligned": metrics["test"], "pretrained": metrics.get("pretrain_model", {}).get("test")},
        "seconds": metrics.get("wall_seconds", time.perf_counter() - started),
        "stage_seconds": metrics.get("stage_seconds", {}),
    }
    write_results(Path(args.results_dir), f"alignment_{args.name}", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
