"""`onerec report RUN_DIR`: RUN_DIR/report.html with the run's figures (training and
validation curves, expert load per layer over steps, codebook utilisation per level, IPA
reward and recall per round) and its metrics beside the baselines. Drawn by onerec/report.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("onerec.report")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (run.out_dir of an earlier run), e.g. runs/demo")


def main(args: argparse.Namespace) -> Path:
    from onerec.report import write_report  # matplotlib loads only for this command

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    page = write_report(run_dir)
    log.info("wrote %s", page)
    return page
