"""One rank of a 2-process training run (started by torchrun) whose loss is NaN on one rank only.

Usage: torchrun --standalone --nproc_per_node 2 nonfinite_worker.py OUT_DIR BAD_RANK BAD_STEP

Rank BAD_RANK returns a NaN loss at step BAD_STEP. Every rank writes OUT_DIR/rank<r>.json:
steps run, non-finite steps counted, and its final weights, for the test to compare.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from onerec.config import LoggingConfig, TrainConfig  # noqa: E402
from onerec.distributed.deepspeed import init_distributed  # noqa: E402
from onerec.logging import RunLogger, setup_console  # noqa: E402
from onerec.train.trainer import Trainer  # noqa: E402


def main(out: Path, bad_rank: int, bad_step: int) -> None:
    setup_console()
    dist_info = init_distributed("cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator)
    y = x.sum(-1, keepdim=True)
    calls = {"n": 0}

    def step_fn(engine, idx):
        calls["n"] += 1
        loss = (engine(x[idx]) - y[idx]).pow(2).mean()
        if dist_info.rank == bad_rank and calls["n"] == bad_step:
            loss = loss * float("nan")
        return loss, {}

    cfg = TrainConfig(batch_size=8, max_steps=6, lr=1e-2, warmup_steps=1, eval_every=100, checkpoint_every=100,
                      log_every=1, patience=0)
    logger = RunLogger(LoggingConfig(), out, "nonfinite", {}, rank=dist_info.rank)
    trainer = Trainer(cfg, model, len(x), step_fn, out, dist_info, logger, {}, seed=1)
    result = trainer.fit()
    logger.close()
    (out / f"rank{dist_info.rank}.json").write_text(json.dumps({
        "steps": result.steps,
        "nonfinite_total": trainer.state.nonfinite_total,
        "weights": [p.detach().flatten().tolist() for p in model.parameters()],
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
