"""`onerec <command>`: one sub-command per row of the stage table (onerec/stages/__init__.py).

Commands that read a config take `--config FILE` and any number of `key=value` overrides
(e.g. `train.lr=3e-4 run.out_dir=runs/x`), applied after the file. `onerec config` prints
the resolved config and exits; `onerec --version` prints the version.

Exit codes: 0 done; 2 a user error (bad config or input, a missing earlier stage, a damaged
checkpoint) with a one-line message; anything else is a bug and shows its traceback
(ONEREC_DEBUG=1 shows it for user errors too).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from onerec import __version__
from onerec.config import load_config
from onerec.errors import UserError
from onerec.logging import setup_console
from onerec.stages import BY_NAME, STAGES, run_stage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onerec", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--version", action="version", version=f"onerec {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for stage in STAGES:
        sub = commands.add_parser(stage.name, help=stage.summary, description=stage.summary)
        if not stage.takes_config:
            stage.load().add_arguments(sub)
            continue
        sub.add_argument("--config", help="YAML config (only differences from the defaults)")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=3e-4")
        if stage.resumable:
            sub.add_argument(
                "--resume",
                nargs="?",
                const="auto",
                help="resume training: 'auto' (latest valid checkpoint, the default) or a checkpoint directory",
            )
    return parser


def run(args: argparse.Namespace) -> object:
    """Run the parsed command (see onerec.stages.run_stage for what is checked first)."""
    stage = BY_NAME[args.command]
    if not stage.takes_config:
        return stage.load().main(args)
    overrides = list(args.overrides)
    if getattr(args, "resume", None):
        overrides.append(f"train.resume={args.resume}")
    return run_stage(stage, load_config(args.config, overrides))


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_console()
    # Text encoders and tokenizers load from site-packages only; never reach a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run(args)
        return 0
    except Exception as err:
        if not _is_user_error(err) or os.environ.get("ONEREC_DEBUG") == "1":  # full traceback for bug reports
            raise
        logging.getLogger("onerec").error("%s", err)
        return 2


def _is_user_error(err: Exception) -> bool:
    """Errors whose message already says what to fix: onerec.errors.UserError, and the builtin
    types the readers raise with such messages (bad input, a missing file, a run that kept
    producing NaN/inf: NonFiniteLossError is a FloatingPointError)."""
    if isinstance(err, (UserError, ValueError, FileNotFoundError, FloatingPointError)):
        return True
    # onerec.checkpoint imports torch; look it up only if a stage has loaded it already.
    checkpoint = sys.modules.get("onerec.checkpoint")
    return checkpoint is not None and isinstance(err, checkpoint.CheckpointError)


if __name__ == "__main__":
    sys.exit(main())
