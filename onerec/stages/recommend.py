"""`onerec recommend --model EXPORT --history "ID ID ..."`: top-K items for one history,
printed as a table (rank, raw item id, log-probability, title). The library behind it is
onerec/inference/recommend.py.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="export directory, e.g. runs/demo/pretrain/export")
    parser.add_argument("--history", required=True, help='raw item ids, oldest first, e.g. "50 172 133"')
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--beam-width", type=int, default=20)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def main(args: argparse.Namespace) -> list:
    # Imported here: `onerec --help` must not pay for torch.
    from pathlib import Path

    import torch

    from onerec.distributed.deepspeed import resolve_device
    from onerec.export import load_export
    from onerec.inference.recommend import recommend

    exported = load_export(Path(args.model), resolve_device(args.device))
    with torch.inference_mode():
        results = recommend(exported, args.history.split(), args.top_k, args.beam_width)
    width = max((len(r.raw_id) for r in results), default=4)
    print(f"{'rank':>4}  {'item':<{width}}  {'log-prob':>9}  title")
    for r in results:
        print(f"{r.rank:>4}  {r.raw_id:<{width}}  {r.score:>9.3f}  {r.title}")
    return results
