"""`onerec <command>`: data, tokenize, pretrain, reward, dpo, evaluate, baseline, recommend, pipeline.

Stage commands take `--config FILE` and any number of `key=value` overrides
(e.g. `train.lr=3e-4 run.out_dir=runs/x`), applied after the file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Optional

from onerec.config import ConfigError, RootConfig, load_config
from onerec.logging import setup_console

STAGES = ("data", "tokenize", "pretrain", "reward", "dpo", "evaluate", "baseline", "pipeline")


def _stage_main(name: str) -> Callable[[RootConfig], object]:
    if name == "data":
        from onerec.data.stage import main
    elif name == "tokenize":
        from onerec.tokenizer.stage import main
    elif name == "pretrain":
        from onerec.train.pretrain import main
    elif name == "reward":
        from onerec.align.reward_stage import main
    elif name == "dpo":
        from onerec.align.dpo_stage import main
    elif name == "evaluate":
        from onerec.inference.stage import main
    elif name == "baseline":
        from onerec.baselines.stage import main
    else:
        from onerec.pipeline import main
    return main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onerec", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in STAGES:
        sub = commands.add_parser(name, help=f"run the {name} stage" if name != "pipeline" else "run every stage")
        sub.add_argument("--config", help="YAML config (only differences from the defaults)")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=3e-4")
        if name in ("pretrain", "pipeline"):
            sub.add_argument(
                "--resume",
                nargs="?",
                const="auto",
                help="resume training: 'auto' (latest valid checkpoint, the default) or a checkpoint directory",
            )
    rec = commands.add_parser("recommend", help="top-K items for a history, from a model export")
    rec.add_argument("--model", required=True, help="export directory, e.g. runs/demo/pretrain/export")
    rec.add_argument("--history", required=True, help='raw item ids, oldest first, e.g. "50 172 133"')
    rec.add_argument("--top-k", type=int, default=10)
    rec.add_argument("--beam-width", type=int, default=20)
    rec.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_console()
    # Text encoders and tokenizers load from site-packages only; never reach a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command == "recommend":
            from onerec.inference.recommend import main as recommend_main

            recommend_main(args.model, args.history, args.top_k, args.beam_width, args.device)
            return 0
        overrides = list(args.overrides)
        if getattr(args, "resume", None):
            overrides.append(f"train.resume={args.resume}")
        cfg = load_config(args.config, overrides)
        _stage_main(args.command)(cfg)
        return 0
    except Exception as err:
        if not _is_user_error(err) or os.environ.get("ONEREC_DEBUG") == "1":  # full traceback for bug reports
            raise
        logging.getLogger("onerec").error("%s", err)
        return 2


def _is_user_error(err: Exception) -> bool:
    """Errors whose message already says what to fix: bad config or input, a damaged checkpoint,
    a run that kept producing NaN/inf (NonFiniteLossError is a FloatingPointError)."""
    if isinstance(err, (ConfigError, ValueError, FileNotFoundError, FloatingPointError)):
        return True
    # onerec.checkpoint imports torch; look it up only if a stage has loaded it already.
    checkpoint = sys.modules.get("onerec.checkpoint")
    return checkpoint is not None and isinstance(err, checkpoint.CheckpointError)


if __name__ == "__main__":
    sys.exit(main())
