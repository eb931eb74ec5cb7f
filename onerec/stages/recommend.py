"""`onerec recommend --model EXPORT --history "ID ID ..."`: top-K items for one history,
printed as a table (rank, raw item id, log-probability, title). The library behind it is
onerec/inference/recommend.py.

--top-k must be >= 1 and --beam-width >= --top-k (each of the K items is one beam); either
mistake is an argparse error (usage, exit code 2) before the model loads.
"""

from __future__ import annotations

import argparse
from typing import Optional


def _at_least_one(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected an integer >= 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="export directory, e.g. runs/demo/pretrain/export")
    parser.add_argument("--history", required=True, help='raw item ids, oldest first, e.g. "50 172 133"')
    parser.add_argument("--top-k", type=_at_least_one, default=10, help="items to print (>= 1)")
    parser.add_argument(
        "--beam-width", type=_at_least_one, default=20, help="beams searched (>= --top-k; more can find better items)"
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def check_arguments(args: argparse.Namespace) -> Optional[str]:
    """The error text when the arguments do not fit together (the CLI reports it as argparse does)."""
    if args.beam_width < args.top_k:
        return f"--beam-width {args.beam_width} is below --top-k {args.top_k}: each of the top K items is one beam"
    return None


def main(args: argparse.Namespace) -> list:
    # Imported here: `onerec --help` must not pay for torch.
    from pathlib import Path

    import torch

    from onerec.device import resolve_device
    from onerec.export import load_export
    from onerec.inference.recommend import recommend

    exported = load_export(Path(args.model), resolve_device(args.device, setting="--device"))
    with torch.inference_mode():
        results = recommend(exported, args.history.split(), args.top_k, args.beam_width)
    width = max((len(r.raw_id) for r in results), default=4)
    print(f"{'rank':>4}  {'item':<{width}}  {'log-prob':>9}  title")
    for r in results:
        print(f"{r.rank:>4}  {r.raw_id:<{width}}  {r.score:>9.3f}  {r.title}")
    return results
