"""The session reward model alone, measured: held-out AUC per signal against two baselines.

    python bench/reward.py --config configs/beauty/pipeline.yaml --name beauty [key=value ...]

Runs `onerec reward` in a run directory that already holds data/ and semantic_ids/ (from
`onerec pipeline`, or the `data` and `tokenize` stages), then writes
bench/results/reward_<name>.{json,md,png}: per signal the reward model's held-out AUC (binary) or
RMSE (regression), the item-mean baseline and, for binary signals, ranking by popularity. On
implicit data (the `consumed` signal with reward.negatives) this is the question whether the
model tells the real next session from one a popularity recommender would have shown.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from onerec.config import load_config
from onerec.logging import setup_console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import bench_parser, run_record, write_results  # noqa: E402  (same folder, same conventions)


def markdown(result: dict) -> str:
    report = result["reward"]["heldout"]
    popularity = report.get("baseline_popularity", {})
    lines = ["| signal | reward model | item-mean baseline | popularity |", "|---|---|---|---|"]
    for name, values in report["model"].items():
        metric = "auc" if "auc" in values else "rmse"
        pop = f"{popularity[name]['auc']:.4f}" if name in popularity else "-"
        lines.append(f"| {name} ({metric.upper()}) | {values[metric]:.4f} | {report['baseline_item_mean'][name][metric]:.4f} | {pop} |")
    sessions, used = result["reward"]["sessions"], result["reward"]["interactions"]
    negatives = result["config"]["reward"]["negatives"]
    return "\n".join([
        f"## Reward model on {result['name']}",
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}; device: {result['device']}; wall time {result['seconds'] / 60:.1f} min "
        f"(best epoch {result['reward']['best_epoch']}).",
        "",
        f"Sessions of {sessions['session_len']} item(s) from the {used['used']} of {used['logged']} logged "
        f"interactions that precede each user's validation target"
        + (f", each real session with {negatives} drawn by popularity (label 0)" if negatives else "")
        + f": {sessions['train']} for training, {sessions['heldout']} of held-out users for this table.",
        "",
        *lines,
    ]) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = bench_parser(__doc__, "pipeline YAML with reward.signals", "beauty").parse_args(argv)
    setup_console()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_config(args.config, args.overrides)
    from onerec.stages.reward import main as reward_main

    started = time.perf_counter()
    reward = reward_main(cfg)
    result = {
        **run_record("reward.py", args.name, argv, cfg),
        "reward": reward,
        "seconds": time.perf_counter() - started,
    }
    write_results(Path(args.results_dir), f"reward_{args.name}", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
