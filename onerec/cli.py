"""`onerec <command>`: one sub-command per row of the stage table (onerec/stages/__init__.py).

Commands that read a config take `--config FILE` and any number of `key=value` overrides
(e.g. `train.lr=3e-4 run.out_dir=runs/x`), applied after the file. `onerec config` prints
the resolved config and exits; `onerec --version` prints the version.

Exit codes: 0 done; 2 a user error (bad config or input, a missing earlier stage, a damaged
checkpoint) with a one-line message; 75 training stopped on SIGUSR1/SIGTERM after a
checkpoint: run the same command again to continue (onerec/train/preemption.py); anything
else is a bug and shows its traceback (ONEREC_DEBUG=1 shows it for user errors too).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

from onerec import __version__
from onerec.config import load_config
from onerec.errors import UserError
from onerec.logging import setup_console
from onerec.stages import BY_NAME, STAGES, run_stage

# `key=value` where key is a dotted config key (train.lr, model.moe.top_k, reward.signals).
_OVERRIDE = re.compile(r"[A-Za-z_][\w.\[\]]*=")

RESUME_HELP = (
    "resume training: alone, from the latest valid checkpoint (auto); with a value, from that "
    "checkpoint directory. A key=value right after --resume is a config override, not a directory "
    "(`--resume train.lr=1e-4` resumes the latest checkpoint with that override)"
)


class _CommandParser(argparse.ArgumentParser):
    """The parser of one command: argparse, plus what it cannot do alone.

    - Overrides in command-line order wherever they stand. argparse fills the `key=value`
      positional only once, and `--resume` takes an optional value, so `--resume train.lr=1e-4`
      would read the override as a checkpoint directory, and an override after an option
      (`a=1 --config f.yaml b=2`) would be refused as unrecognised; both are overrides.
    - `check_arguments(args)`, set from a command module that defines one: a check across
      arguments (e.g. recommend's --beam-width >= --top-k) that returns an error text, reported
      as argparse reports its own (usage, exit code 2).
    """

    check_arguments: Optional[Callable[[argparse.Namespace], Optional[str]]] = None

    def parse_known_args(self, args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        namespace, extras = super().parse_known_args(argv, namespace)
        if hasattr(namespace, "overrides"):
            extras = _gather_overrides(argv, namespace, extras)
        if self.check_arguments is not None:
            problem = self.check_arguments(namespace)
            if problem:
                self.error(problem)
        return namespace, extras


def _gather_overrides(argv: list[str], namespace: argparse.Namespace, extras: list[str]) -> list[str]:
    """Put every override argparse left elsewhere into namespace.overrides, in argv order (a later
    override of the same key wins); returns the extras that are not overrides."""
    found = list(namespace.overrides) + [arg for arg in extras if _OVERRIDE.match(arg)]
    resume = getattr(namespace, "resume", None)
    if resume is not None and _OVERRIDE.match(resume) and not Path(resume).exists():
        found.append(resume)  # an existing directory named like `lr=1e-4` stays a checkpoint
        namespace.resume = "auto"
    pending = Counter(found)
    namespace.overrides = []
    for arg in argv:
        if pending[arg] > 0:
            namespace.overrides.append(arg)
            pending[arg] -= 1
    return [arg for arg in extras if not _OVERRIDE.match(arg)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onerec", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--version", action="version", version=f"onerec {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="<command>", parser_class=_CommandParser
    )
    for stage in STAGES:
        sub = commands.add_parser(stage.name, help=stage.summary, description=stage.summary)
        if not stage.takes_config:
            module = stage.load()
            module.add_arguments(sub)
            sub.check_arguments = getattr(module, "check_arguments", None)
            continue
        sub.add_argument("--config", help="YAML config (only differences from the defaults)")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=3e-4")
        if stage.name in ("pipeline", "plan"):
            sub.add_argument("--force", action="store_true", help="rerun every stage, also those whose output is fresh")
        if stage.resumable:
            sub.add_argument("--resume", nargs="?", const="auto", metavar="DIR", help=RESUME_HELP)
    return parser


def run(args: argparse.Namespace) -> object:
    """Run the parsed command (see onerec.stages.run_stage for what is checked first)."""
    stage = BY_NAME[args.command]
    if not stage.takes_config:
        return stage.load().main(args)
    overrides = list(args.overrides)
    if getattr(args, "resume", None):
        overrides.append(f"train.resume={args.resume}")
    kwargs = {"force": True} if getattr(args, "force", False) else {}
    return run_stage(stage, load_config(args.config, overrides), **kwargs)


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
