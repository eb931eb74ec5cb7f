"""`onerec <stage>` for one rank of a launcher, as the CLI runs it (onerec.stages.run_stage:
checks, lock, provenance record), with a pause of STEP_DELAY_S seconds after every training
step, so that a test can signal a tiny job while it is still training.

Usage (as a launcher's ENTRY): ENTRY=tests/distributed/slow_steps_worker.py STEP_DELAY_S=1
    launch/torchrun.sh --config ... key=value ...        (or launch/slurm/*.sbatch)

The pause reaches the training loop as the after_step callback (stages without one run
unchanged); it changes nothing but the timing. Exit codes are the CLI's, 75 included.
"""

from __future__ import annotations

import inspect
import os
import sys
import time

from onerec.cli import build_parser
from onerec.config import load_config
from onerec.logging import setup_console
from onerec.stages import BY_NAME, run_stage


def main(argv: list[str]) -> None:
    setup_console()
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if getattr(args, "resume", None):
        overrides.append(f"train.resume={args.resume}")
    stage = BY_NAME[args.command]
    delay = float(os.environ.get("STEP_DELAY_S", "1"))
    kwargs = {}
    if "after_step" in inspect.signature(stage.load().main).parameters:
        kwargs["after_step"] = lambda step: time.sleep(delay)
    run_stage(stage, load_config(args.config, overrides), **kwargs)


if __name__ == "__main__":
    main(sys.argv[1:])
