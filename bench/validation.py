"""Score a run's exported model on the validation split only, under several inference settings.

    python bench/validation.py --run runs/beauty --beam-widths 20,40 --exclude-history on
    python bench/validation.py --run runs/exp/base --max-users 3000 --exclude-history both
    python bench/validation.py --run runs/exp/item-head --item-score-weight 0.5

For choices made after training (beam width, leaving the history out, the item head's weight
in the final ranking: eval.item_score_weight), so that they are made on validation without
the test split being decoded at all (`onerec evaluate` scores both).
The rows are the same users the pretrain stage validates on when --max-users equals its
eval.max_valid_users (the same seeded subset); 0 scores every validation user. Prints a
markdown table with the device and the command.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

from onerec.data.prepared import load_prepared
from onerec.data.splits import make_splits, validation_subset
from onerec.export import load_export
from onerec.inference.evaluate import evaluate_examples
from onerec.paths import RunPaths

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import device_name  # noqa: E402  (same folder, same device naming)

EXCLUDE = {"on": [True], "off": [False], "both": [False, True]}


def load_validation(run: str, max_users: int, device: str):
    """(exported model, validation Examples, the scored rows): a run's export and its seeded
    validation subset (max_users=0: every validation user), the one the pretrain stage uses."""
    paths = RunPaths.of(run)
    exported = load_export(paths.require(paths.export, "pretrain"), device)
    valid = make_splits(load_prepared(paths.require(paths.data, "data")).sequences, exported.cfg.data)["valid"]
    return exported, valid, validation_subset(len(valid), max_users, exported.cfg.run.seed)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--run", required=True, help="run.out_dir of a finished pretrain (its pretrain/export)")
    parser.add_argument("--beam-widths", default=None, help="comma-separated; default: the export's eval.beam_width")
    parser.add_argument("--exclude-history", choices=sorted(EXCLUDE), default="both")
    parser.add_argument("--max-users", type=int, default=0, help="0: every validation user")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--item-score-weight", type=float, default=None,
                        help="rerank the beams by the item head with this weight; default: the export's "
                             "eval.item_score_weight")
    args = parser.parse_args(argv)

    exported, valid, rows = load_validation(args.run, args.max_users, args.device)
    cfg = exported.cfg
    widths = [int(w) for w in args.beam_widths.split(",")] if args.beam_widths else [cfg.eval.beam_width]
    users = valid.user[rows] if cfg.model.user_buckets > 0 else None
    item_score_weight = cfg.eval.item_score_weight if args.item_score_weight is None else args.item_score_weight

    results = []
    for beam_width, exclude in itertools.product(widths, EXCLUDE[args.exclude_history]):
        started = time.perf_counter()
        metrics = evaluate_examples(
            exported.model, valid.history[rows], valid.target[rows, 0], users, exported.semantic_ids.codes,
            exported.trie, beam_width=beam_width, ks=list(cfg.eval.ks), batch_size=cfg.eval.batch_size,
            device=args.device, exclude_history=exclude, item_score_weight=item_score_weight,
        )
        results.append({"beam_width": beam_width, "exclude_history": exclude, "item_score_weight": item_score_weight,
                        **metrics, "seconds": time.perf_counter() - started})

    metric_names = [k for k in results[0] if "@" in k]
    print(f"Validation only, {len(rows)} users; item head weight {item_score_weight:g}; "
          f"device: {device_name(args.device)}; "
          f"`python bench/validation.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    print("| beam | history excluded | " + " | ".join(metric_names) + " |")
    print("|---|---|" + "---|" * len(metric_names))
    for r in results:
        print(f"| {r['beam_width']} | {'yes' if r['exclude_history'] else 'no'} | "
              + " | ".join(f"{r[m]:.4f}" for m in metric_names) + " |")
    return results


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
