"""A training stage (`onerec pretrain`, `reward` or `dpo`) for one rank of a torchrun job,
with one rank SIGKILLing itself mid-run.

Usage (as launch/torchrun.sh's ENTRY): ENTRY=tests/distributed/sigkill_worker.py
    SIGKILL_AT=RANK:STEP [STAGE=reward|dpo] launch/torchrun.sh --config ... key=value ...

Rank RANK kills itself right after step STEP (for dpo: numbered over all rounds, as the
stage's run log numbers them) on the job's first attempt only (torchrun counts restarts in
TORCHELASTIC_RESTART_COUNT), so a job run with --max-restarts must come back by itself and
resume from its newest checkpoint (dpo: from the round's files). The fault reaches the
training loop as a callback; production code has no fault switch. The stage runs through
run_stage, as the CLI runs it: run-directory checks, the stage lock, provenance.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from onerec.cli import build_parser
from onerec.config import load_config
from onerec.logging import setup_console
from onerec.stages import BY_NAME, run_stage

TRAINING_STAGES = ("pretrain", "reward", "dpo")  # the stages whose main takes after_step


def main(argv: list[str]) -> None:
    setup_console()
    args = build_parser().parse_args(argv)
    assert args.command in TRAINING_STAGES, f"this worker runs a training stage ({', '.join(TRAINING_STAGES)}), not {args.command}"
    cfg = load_config(args.config, list(args.overrides))
    kill_rank, _, kill_step = os.environ["SIGKILL_AT"].partition(":")
    rank = int(os.environ.get("RANK", "0"))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

    def after_step(step: int) -> None:
        if first_attempt and rank == int(kill_rank) and step == int(kill_step):
            logging.getLogger("onerec").warning("rank %d kills itself after step %d", rank, step)
            os.kill(os.getpid(), signal.SIGKILL)

    run_stage(BY_NAME[args.command], cfg, after_step=after_step)


if __name__ == "__main__":
    main(sys.argv[1:])
