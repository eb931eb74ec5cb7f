"""`onerec dpo` for one rank of a torchrun job, with one rank SIGKILLing itself mid-round.

Usage (as launch/torchrun.sh's ENTRY): STAGE=dpo ENTRY=tests/distributed/dpo_sigkill_worker.py
    SIGKILL_AT=RANK:STEP launch/torchrun.sh --config ... key=value ...

Rank RANK kills itself right after DPO step STEP (numbered over all rounds, as the dpo
stage's run log numbers them) on the job's first attempt only (torchrun counts restarts in
TORCHELASTIC_RESTART_COUNT), so a job run with --max-restarts must come back by itself and
resume from the round's files. As tests/distributed/sigkill_worker.py does for pretrain.
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


def main(argv: list[str]) -> None:
    setup_console()
    args = build_parser().parse_args(argv)
    assert args.command == "dpo", "this worker only runs the dpo stage"
    cfg = load_config(args.config, list(args.overrides))
    kill_rank, _, kill_step = os.environ["SIGKILL_AT"].partition(":")
    rank = int(os.environ.get("RANK", "0"))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

    def after_step(step: int) -> None:
        if first_attempt and rank == int(kill_rank) and step == int(kill_step):
            logging.getLogger("onerec").warning("rank %d kills itself after step %d", rank, step)
            os.kill(os.getpid(), signal.SIGKILL)

    # Through run_stage, as the CLI runs it: the run-directory checks, the stage lock, provenance.
    run_stage(BY_NAME["dpo"], cfg, after_step=after_step)


if __name__ == "__main__":
    main(sys.argv[1:])
