"""`onerec recommend --model EXPORT`: top-K items from a model export, in one of two forms.

- `--history "ID ID ..."` [--user-id U]: one history, printed as a table (rank, raw item id,
  log-probability, title; the combined score instead when the export reranks by its item
  head, eval.item_score_weight > 0).
- `--input requests.jsonl --output out.jsonl`: a request file, one JSON object per line
  ("-" for standard input/output), answered in input order with the model loaded once and
  `--batch-size` requests per beam search, a progress bar on stderr. The format and what a bad
  line does: onerec/serve/jsonl.py. A bad line becomes an error line in the output and the
  command exits 2 after writing every other answer, with a summary on stderr; `--strict`
  instead stops at the first bad line, naming FILE:LINE and the field, before writing
  anything. An output path is written atomically (temporary file, then rename).

The library behind both is onerec/inference/recommend.py. --top-k must be >= 1 and
--beam-width >= --top-k (each of the K items is one beam); either mistake, and options that
belong to the other form, are argparse errors (usage, exit code 2) before the model loads.
"""

from __future__ import annotations

import argparse
import re
from typing import Optional, Union


def bounded_int(low: int, high: Optional[int] = None, expected: Optional[str] = None):
    """argparse type: an integer in [low, high] (no upper bound when high is None); `expected`
    says what was wanted in the error (default "an integer >= low")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value}: expected {expected or f'an integer >= {low}'}")
        return value

    return parse


at_least_one = bounded_int(1)
at_least_zero = bounded_int(0)


def user_id_argument(text: str) -> Union[int, str]:
    """--user-id: an integer literal is the user's user_index of the training data; anything
    else is a string id, hashed (onerec/inference/recommend.py)."""
    return int(text) if re.fullmatch(r"[+-]?\d+", text.strip()) else text


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def add_history_limit_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-history-items", type=at_least_zero, default=None, metavar="N",
        help="longest history a request may carry (default: 10 x the export's data.max_history; 0: no limit); "
             "the model reads only the last data.max_history",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="export directory, e.g. runs/demo/pretrain/export")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--history", help='one history: raw item ids, oldest first, e.g. "50 172 133"')
    source.add_argument("--input", metavar="FILE", help='request file, one JSON object per line ("-": stdin)')
    parser.add_argument("--output", metavar="FILE", help='with --input: where the answers go (default "-": stdout)')
    parser.add_argument("--user-id", type=user_id_argument, help="with --history: the user (an int or a string)")
    parser.add_argument("--top-k", type=at_least_one, default=10, help="items per request (>= 1)")
    parser.add_argument(
        "--beam-width", type=at_least_one, default=20, help="beams searched (>= --top-k; more can find better items)"
    )
    parser.add_argument("--batch-size", type=at_least_one, default=64, help="with --input: requests per beam search")
    add_history_limit_argument(parser)
    parser.add_argument("--strict", action="store_true",
                        help="with --input: stop at the first bad line, writing nothing, instead of an error line")
    add_device_argument(parser)


def check_arguments(args: argparse.Namespace) -> Optional[str]:
    """The error text when the arguments do not fit together (the CLI reports it as argparse does)."""
    if args.beam_width < args.top_k:
        return f"--beam-width {args.beam_width} is below --top-k {args.top_k}: each of the top K items is one beam"
    if args.input is None:
        for option, value in (("--output", args.output), ("--strict", args.strict or None)):
            if value is not None:
                return f"{option} goes with --input (a request file), not --history"
    elif args.user_id is not None:
        return '--user-id goes with --history; in a request file each line gives its own "user_id"'
    return None


def main(args: argparse.Namespace) -> object:
    if args.input is None:
        return _one_history(args)
    return _request_file(args)


def _load(args: argparse.Namespace):
    # Imported here: `onerec --help` must not pay for torch.
    from pathlib import Path

    from onerec.device import resolve_device
    from onerec.export import load_export
    from onerec.inference.recommend import Recommender, history_limit

    exported = load_export(Path(args.model), resolve_device(args.device, setting="--device"))
    limit = history_limit(args.max_history_items, exported.cfg.data.max_history)
    return Recommender(exported, args.beam_width, args.batch_size, limit, source=args.model)


def _one_history(args: argparse.Namespace) -> list:
    recommender = _load(args)
    request = recommender.prepare(args.history.split(), args.user_id, args.top_k, beam_width=args.beam_width,
                                  where="--history")
    results = recommender.run([request])[0]
    width = max((len(r.item_id) for r in results), default=4)
    # Reranked by the item head (the export's eval.item_score_weight > 0): a combined score.
    score_name = "score" if recommender.item_score_weight > 0 else "log-prob"
    print(f"{'rank':>4}  {'item':<{width}}  {score_name:>9}  title")
    for r in results:
        print(f"{r.rank:>4}  {r.item_id:<{width}}  {r.score:>9.3f}  {r.title}")
    return results


def _request_file(args: argparse.Namespace) -> int:
    import logging
    import sys

    from tqdm.auto import tqdm

    from onerec.errors import DataError
    from onerec.logging import progress_disabled
    from onerec.serve.jsonl import STDIO, answer_lines, output_stream, parse_line, read_lines, source_name

    log = logging.getLogger("onerec.recommend")
    output = args.output or STDIO
    texts = read_lines(args.input)  # before the model loads: a missing file is a message in a second
    recommender = _load(args)
    source = source_name(args.input)
    lines = [parse_line(text, number, source, recommender, args.top_k, args.beam_width) for number, text in texts]
    bad = [line for line in lines if line.error is not None]
    if bad and args.strict:
        raise DataError(f"{bad[0].error} (--strict: {len(bad)} bad line(s) in {source}, nothing was written)")
    bar = tqdm(total=len(lines) - len(bad), desc="recommend", unit=" requests", file=sys.stderr,
               disable=progress_disabled(), dynamic_ncols=True)
    with bar, output_stream(output) as out:
        failed = answer_lines(recommender, lines, out, bar, strict=args.strict)
    unanswered = len(bad) + failed
    log.info("answered %d of %d request(s) from %s -> %s", len(lines) - unanswered, len(lines), source,
             "<stdout>" if output == STDIO else output)
    if unanswered:
        first = f"; the first bad line: {bad[0].error}" if bad else ""
        raise DataError(
            f"{unanswered} of {len(lines)} request(s) in {source} could not be answered ({len(bad)} bad line(s), "
            f'{failed} failed search(es); their output lines hold an "error" instead of "items"){first}'
        )
    return len(lines)
