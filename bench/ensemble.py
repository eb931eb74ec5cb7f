"""An ensemble of finished runs (e.g. the seeds of bench/quality.py --seeds N), each with its
own semantic-ID assignment: every run's constrained beam search ranks items for the same
users, and the ranked lists are fused per item.

    python bench/ensemble.py --runs runs/beauty-seed0 runs/beauty-seed1 runs/beauty-seed2
    python bench/ensemble.py --runs ... --split test --fusion probability   # once, after choosing

Each run decodes with its own export's settings (beam width, history exclusion), and the item
head's rerank weight of --item-score-weight (default: the export's eval.item_score_weight).
Fusions (choose on validation, the default split):
  probability  sum over runs of the softmax of each run's final beam scores (its W beams)
  rank         reciprocal-rank fusion, sum over runs of 1 / (60 + rank)
--baseline sasrec fuses the runs' SASRec baselines instead (baselines/sasrec/, the same
seeds): its top W items over the full catalogue stand in for the beams, W the beam width, so
an ensemble of generative models can be set against an ensemble of the same size of SASRecs.
The table has every run alone and every fusion of all of them; beams are cached per run and
split under --cache (decoding is the slow part), so a second fusion costs nothing.
The runs must share their prepared data (the same item indices): a run whose targets differ
from the first run's is refused.

Shape legend: B users in a batch, U users of the split, W beam width, M runs, K cutoff.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from onerec.checkpoint import load_weights
from onerec.config import load_config
from onerec.data.prepared import load_prepared
from onerec.data.splits import make_splits
from onerec.export import load_export
from onerec.inference.beam_search import constrained_beam_search
from onerec.inference.metrics import MetricAccumulator
from onerec.logging import write_json_atomic
from onerec.model.onerec import lookup_codes
from onerec.paths import RunPaths
from onerec.baselines.sasrec import WEIGHTS_FILE
from onerec.stages.baseline import MODEL_CLASSES, history_length

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import RESULTS, device_name  # noqa: E402  (same folder)

RRF_OFFSET = 60  # the usual reciprocal-rank-fusion constant (Cormack et al., 2009)


def decode_split(
    run: str, split: str, device: str, cache: Path, item_score_weight: float | None, max_users: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(items_UW int64, scores_UW float32, target_U int64) of one run on the rows of `split`
    (the first max_users, 0: all), read from `cache` when decoded before with these settings."""
    paths = RunPaths.of(run)
    weight = "" if item_score_weight is None else f"-w{item_score_weight:g}"
    first = f"-first{max_users}" if max_users else ""
    cached = cache / f"{Path(run).resolve().name}-{split}{weight}{first}.npz"
    data_meta = json.loads((paths.require(paths.data, "data") / "meta.json").read_text())
    if cached.is_file():
        saved = np.load(cached)
        if json.loads(str(saved["meta"])) == data_meta:
            return saved["items"], saved["scores"], saved["target"]
    exported = load_export(paths.require(paths.export, "pretrain"), device)
    cfg = exported.cfg
    if item_score_weight is None:
        item_score_weight = cfg.eval.item_score_weight
    examples = make_splits(load_prepared(paths.data).sequences, cfg.data)[split]
    num_rows = min(max_users, len(examples)) if max_users else len(examples)
    codes_NL = exported.semantic_ids.codes.to(device)
    trie = exported.trie.to(device)
    items, scores = [], []
    exported.model.eval()
    for start in tqdm(range(0, num_rows, cfg.eval.batch_size), desc=f"{Path(run).name} {split}"):
        rows = np.arange(start, min(start + cfg.eval.batch_size, num_rows))
        history_BS = torch.as_tensor(examples.history[rows]).long().to(device)
        users = torch.as_tensor(examples.user[rows]).long().to(device) if cfg.model.user_buckets > 0 else None
        output = constrained_beam_search(
            exported.model, lookup_codes(history_BS, codes_NL), trie, cfg.eval.beam_width, user_B=users,
            history_items_BS=history_BS, exclude_items_BX=history_BS if cfg.eval.exclude_history else None,
            item_score_weight=item_score_weight,
        )
        items.append(output.items_BW.cpu().numpy())
        scores.append(output.scores_BW.float().cpu().numpy())
    items_UW, scores_UW = np.concatenate(items), np.concatenate(scores)
    target_U = np.asarray(examples.target[np.arange(num_rows), 0], dtype=np.int64)
    cache.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".partial.npz")
    np.savez(partial, items=items_UW, scores=scores_UW, target=target_U, meta=json.dumps(data_meta))
    partial.replace(cached)
    return items_UW, scores_UW, target_U


@torch.no_grad()
def decode_baseline(run: str, split: str, name: str, device: str, max_users: int = 0):
    """(items_UW, scores_UW log-softmax over the catalogue, target_U) of a run's next-item
    baseline `name`: its top W items (W = eval.beam_width), the history left out as the run's
    eval.exclude_history says."""
    paths = RunPaths.of(run)
    cfg = load_config(paths.root / "config.yaml")
    section = getattr(cfg, name)
    max_len = history_length(cfg, section)
    if max_len != cfg.data.max_history:
        raise SystemExit(f"{run}: {name} reads {max_len} items of history, the data {cfg.data.max_history}")
    prepared = load_prepared(paths.require(paths.data, "data"))
    examples = make_splits(prepared.sequences, cfg.data)[split]
    model = MODEL_CLASSES[name](section, len(prepared.items), max_len).to(device)
    if model.uses_time:
        raise SystemExit(f"--baseline {name}: only models without time inputs are supported here")
    load_weights(model, paths.baselines / name / WEIGHTS_FILE)
    model.eval()
    num_rows = min(max_users, len(examples)) if max_users else len(examples)
    items, scores = [], []
    for start in tqdm(range(0, num_rows, 1024), desc=f"{Path(run).name} {name} {split}"):
        history_BS = torch.as_tensor(examples.history[np.arange(start, min(start + 1024, num_rows))]).long().to(device)
        scores_BN = torch.log_softmax(model.item_logits(model(history_BS)[:, -1]), dim=-1)
        if cfg.eval.exclude_history:
            scores_BN = model.without_history(scores_BN, history_BS)
        top = scores_BN.topk(cfg.eval.beam_width, dim=-1)
        items.append(top.indices.cpu().numpy())
        scores.append(top.values.cpu().numpy())
    target_U = np.asarray(examples.target[np.arange(num_rows), 0], dtype=np.int64)
    return np.concatenate(items), np.concatenate(scores), target_U


def fuse(items_MUW: list[np.ndarray], scores_MUW: list[np.ndarray], fusion: str, k: int) -> np.ndarray:
    """The top-k items_UK of the runs' ranked lists fused per item (-1 where fewer than k)."""
    num_users = len(items_MUW[0])
    # One dense score per (user, distinct item) over the runs' lists: a sparse sum via np.unique.
    columns_UX = np.concatenate(items_MUW, axis=1)
    weights = []
    for items_UW, scores_UW in zip(items_MUW, scores_MUW):
        alive_UW = items_UW >= 0
        if fusion == "probability":
            finite_UW = np.where(alive_UW, scores_UW, -np.inf)
            best_U1 = np.where(alive_UW.any(axis=1, keepdims=True), finite_UW.max(axis=1, keepdims=True), 0.0)
            shifted_UW = np.where(alive_UW, np.exp(finite_UW - best_U1), 0.0)
            weights.append(shifted_UW / np.maximum(shifted_UW.sum(axis=1, keepdims=True), 1e-30))
        elif fusion == "rank":
            ranks_W = np.arange(1, items_UW.shape[1] + 1)
            weights.append(np.where(alive_UW, 1.0 / (RRF_OFFSET + ranks_W), 0.0))
        else:
            raise ValueError(f"fusion={fusion!r}: expected 'probability' or 'rank'")
    weights_UX = np.concatenate(weights, axis=1)
    top_UK = np.full((num_users, k), -1, dtype=np.int64)
    for u in range(num_users):
        keys, inverse = np.unique(columns_UX[u], return_inverse=True)
        totals = np.bincount(inverse, weights=weights_UX[u], minlength=len(keys))
        totals[keys < 0] = -1.0  # dead beams never rank
        order = np.argsort(-totals, kind="stable")[:k]
        chosen = keys[order][totals[order] >= 0]
        top_UK[u, : len(chosen)] = chosen
    return top_UK


def metrics_of(ranked_UK: np.ndarray, target_U: np.ndarray, ks: list[int]) -> dict[str, float]:
    accumulator = MetricAccumulator(ks)
    accumulator.update(torch.as_tensor(ranked_UK[:, : max(ks)]), torch.as_tensor(target_U))
    return accumulator.compute()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="run.out_dir of finished pretrains")
    parser.add_argument("--split", choices=("valid", "test"), default="valid")
    parser.add_argument("--fusion", choices=("probability", "rank", "both"), default="both")
    parser.add_argument("--ks", default="5,10")
    parser.add_argument("--max-users", type=int, default=0, help="the first N rows of the split (a quick check); 0: all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--item-score-weight", type=float, default=None,
                        help="the item head's weight in each run's beam ranking; default: each export's")
    parser.add_argument("--baseline", choices=("sasrec",), default=None,
                        help="fuse the runs' baseline of this name instead of their generative models")
    parser.add_argument("--cache", default=None, help="where decoded beams are kept (default: <first run>/ensemble)")
    parser.add_argument("--name", default=None, help="write bench/results/ensemble_<name>_<split>.json")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("--runs: an ensemble needs two or more runs")
    ks = [int(k) for k in args.ks.split(",")]
    cache = Path(args.cache) if args.cache else Path(args.runs[0]) / "ensemble"

    started = time.perf_counter()
    if args.baseline:
        decoded = [decode_baseline(run, args.split, args.baseline, args.device, args.max_users) for run in args.runs]
    else:
        decoded = [decode_split(run, args.split, args.device, cache, args.item_score_weight, args.max_users)
                   for run in args.runs]
    targets = [target for _, _, target in decoded]
    if any(not np.array_equal(targets[0], t) for t in targets[1:]):
        raise SystemExit(f"--runs: the runs' {args.split} targets differ; an ensemble needs the same prepared data")
    rows = {Path(run).name + (f" {args.baseline}" if args.baseline else ""): metrics_of(items, targets[0], ks) for run, (items, _, _) in zip(args.runs, decoded)}
    fusions = ["probability", "rank"] if args.fusion == "both" else [args.fusion]
    for fusion in fusions:
        fused = fuse([d[0] for d in decoded], [d[1] for d in decoded], fusion, max(ks))
        rows[f"ensemble of {len(args.runs)}{f' {args.baseline}' if args.baseline else ''} ({fusion})"] = metrics_of(fused, targets[0], ks)

    names = list(next(iter(rows.values())))
    command = f"python bench/ensemble.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    print(f"{args.split} split, {len(targets[0])} users; device: {device_name(args.device)}; `{command}`\n")
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{values[m]:.4f}" for m in names) + " |")
    result = {"command": command, "split": args.split, "users": len(targets[0]), "device": device_name(args.device),
              "seconds": time.perf_counter() - started, "rows": rows}
    if args.name:
        suffix = f"_{args.baseline}" if args.baseline else ""
        write_json_atomic(RESULTS / f"ensemble_{args.name}_{args.split}{suffix}.json", result)
    return result


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
