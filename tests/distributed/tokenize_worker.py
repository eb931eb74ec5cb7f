"""`onerec tokenize` for one rank of a torchrun job, several runs in one job, recording every
file this rank writes.

Usage (as launch/torchrun.sh's ENTRY): ENTRY=tests/distributed/tokenize_worker.py STAGE=tokenize
    AUDIT_ROOT=DIR AUDIT_OUT=DIR TOKENIZE_RUNS=JSON launch/torchrun.sh ... key=value ...

TOKENIZE_RUNS lists the runs, in order, as [run.out_dir, EXACT_SEEDING_MAX or null, [extra
key=value ...]]: each is the stage with the launcher's arguments plus the extras and that
run.out_dir, with rq_kmeans.EXACT_SEEDING_MAX set as given (0: a tiny catalogue takes the
sharded k-means that a catalogue above the threshold takes). A Python audit hook
(sys.addaudithook) sees every file this process opens for writing, creates, renames or
removes under AUDIT_ROOT; each run's list goes to AUDIT_OUT/rank<RANK>.json, keyed by the
run directory's name, for the test to read. (safetensors writes its files from Rust, unseen,
but always to a temporary name that is then renamed: the rename is seen.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Audit events that change the file system, besides "open" (checked for write flags).
CHANGES = {"os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.copyfile", "os.truncate",
           "os.link", "os.symlink", "os.chmod", "os.utime"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _recorder(root: Path) -> list:
    prefix = str(root.resolve()) + os.sep
    writes: list = []

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, _, flags = args
            paths = [path] if isinstance(flags, int) and flags & WRITE_FLAGS else []
        elif event in CHANGES:
            paths = list(args[:2]) if event in ("os.rename", "shutil.copyfile", "os.link", "os.symlink") else [args[0]]
        else:
            return
        for path in paths:
            if isinstance(path, (str, bytes, os.PathLike)):
                path = os.path.abspath(os.fsdecode(path))
                if path.startswith(prefix):
                    writes.append([event, path])

    sys.addaudithook(hook)
    return writes


def main(argv: list[str]) -> int:
    writes = _recorder(Path(os.environ["AUDIT_ROOT"]))
    from onerec.cli import main as cli_main
    from onerec.tokenizer import rq_kmeans

    assert argv[0] == "tokenize", "this worker only runs the tokenize stage"
    default_max = rq_kmeans.EXACT_SEEDING_MAX
    runs, codes = {}, []
    for out_dir, exact_seeding_max, extra in json.loads(os.environ["TOKENIZE_RUNS"]):
        rq_kmeans.EXACT_SEEDING_MAX = default_max if exact_seeding_max is None else exact_seeding_max
        codes.append(cli_main([*argv, *extra, f"run.out_dir={out_dir}"]))
        runs[Path(out_dir).name], writes[:] = list(writes), []
    rank = os.environ["RANK"]
    (Path(os.environ["AUDIT_OUT"]) / f"rank{rank}.json").write_text(json.dumps(runs, indent=1))
    return max(codes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
