"""Where a generative recommender loses its hits: Recall@K by code depth, on validation only.

    python bench/prefix_recall.py --run runs/beauty --max-users 4000 [--name beauty]

For each depth d = 1..L: the share of validation users whose target's first d codes are the
first d codes of at least one of the top-K beams. Depth L (every level, dedup included) is
the usual item Recall@K; the drop from one depth to the next shows which level of the semantic
ID the model gets wrong (e.g. a large drop at the dedup level: right group, wrong item in it).
Beams as in evaluation (eval.beam_width, history left out when eval.exclude_history).
Prints a markdown table; with --name it also writes bench/results/prefix_recall_<name>.{json,md,png}.

Shape legend: B users in a batch, S history length, W beams, K cutoff, L code levels.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from onerec.inference.beam_search import constrained_beam_search
from onerec.model.onerec import lookup_codes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from figures import save_figure  # noqa: E402
from quality import RESULTS, device_name  # noqa: E402  (same folder, same device naming)
from validation import load_validation  # noqa: E402  (same export, same validation subset)


def prefix_hits(beam_codes_BWL: torch.Tensor, target_codes_BL: torch.Tensor, k: int) -> torch.Tensor:
    """[L] counts: users whose target shares its first d codes (d = 1..L) with a top-k beam.

    Dead beams (codes -1) never match, since no target code is -1."""
    same_BKL = beam_codes_BWL[:, :k] == target_codes_BL[:, None, :]
    prefix_match_BKL = same_BKL.cumprod(dim=-1).bool()  # first d levels all equal
    return prefix_match_BKL.any(dim=1).sum(dim=0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--run", required=True, help="run.out_dir of a finished pretrain (its pretrain/export)")
    parser.add_argument("--max-users", type=int, default=0, help="0: every validation user")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", help="data set name: write bench/results/prefix_recall_<name>.{json,md,png}")
    parser.add_argument("--results-dir", default=str(RESULTS), help="where the result files go (with --name)")
    args = parser.parse_args(argv)

    exported, valid, rows = load_validation(args.run, args.max_users, args.device)
    cfg = exported.cfg
    history_BS = torch.as_tensor(valid.history[rows]).long()
    target_B = torch.as_tensor(valid.target[rows, 0]).long()
    users_B = torch.as_tensor(valid.user[rows]).long() if cfg.model.user_buckets > 0 else None
    codes_NL = exported.semantic_ids.codes.to(args.device)
    trie = exported.trie.to(args.device)
    ks = sorted(cfg.eval.ks)
    hits = {k: torch.zeros(codes_NL.shape[1], dtype=torch.long) for k in ks}

    exported.model.eval()
    for start in range(0, len(target_B), cfg.eval.batch_size):
        batch = slice(start, start + cfg.eval.batch_size)
        history = history_BS[batch].to(args.device)
        output = constrained_beam_search(
            exported.model, lookup_codes(history, codes_NL), trie, cfg.eval.beam_width,
            user_B=None if users_B is None else users_B[batch].to(args.device), history_items_BS=history,
            exclude_items_BX=history if cfg.eval.exclude_history else None,
        )
        target_codes_BL = codes_NL[target_B[batch].to(args.device)]
        for k in ks:
            hits[k] += prefix_hits(output.codes_BWL, target_codes_BL, k).cpu()

    levels = codes_NL.shape[1]
    recall = {f"recall@{k}": [round(int(h) / len(rows), 4) for h in hits[k]] for k in ks}
    command = f"python bench/prefix_recall.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    lines = [
        f"Validation only, {len(rows)} users, beam {cfg.eval.beam_width}; device: {device_name(args.device)}; "
        f"`{command}`",
        "",
        "| code depth | " + " | ".join(recall) + " |",
        "|---|" + "---|" * len(recall),
    ]
    for depth in range(levels):
        name = f"{depth + 1}" + (" (item)" if depth == levels - 1 else "")
        lines.append(f"| {name} | " + " | ".join(f"{values[depth]:.4f}" for values in recall.values()) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.name:
        result = {
            "name": args.name, "command": command, "date": datetime.date.today().isoformat(),
            "device": device_name(args.device), "run": args.run, "users": len(rows),
            "beam_width": cfg.eval.beam_width, "levels": levels, "recall": recall,
        }
        stem = Path(args.results_dir) / f"prefix_recall_{args.name}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        stem.with_suffix(".md").write_text(table, encoding="utf-8")
        save_figure(result, stem.with_suffix(".json"))
    return recall


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
