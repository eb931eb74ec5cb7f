"""Run logging: console, a metrics.jsonl of training curves, and Weights & Biases.

Only rank 0 writes anything. When W&B is disabled the W&B sink is simply absent, so
callers never branch on it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

from onerec.config import LoggingConfig

_CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_console(level: int = logging.INFO) -> None:
    """Human-readable console logging for the `onerec` loggers (idempotent)."""
    root = logging.getLogger("onerec")
    if not any(getattr(handler, "_onerec_console", False) for handler in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_CONSOLE_FORMAT, datefmt="%H:%M:%S"))
        handler._onerec_console = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def progress_disabled() -> bool:
    """Progress bars are on unless ONEREC_NO_PROGRESS=1 (handy for CI logs)."""
    return os.environ.get("ONEREC_NO_PROGRESS", "0") == "1"


class RunLogger:
    """Scalars to metrics.jsonl (+ W&B when enabled) on rank 0; a no-op elsewhere."""

    def __init__(
        self,
        cfg: LoggingConfig,
        run_dir: Path,
        stage: str,
        resolved_config: dict,
        rank: int = 0,
    ) -> None:
        self.enabled = rank == 0
        self.stage = stage
        self._wandb_run = None
        self._jsonl = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if cfg.wandb != "disabled":
            import wandb  # imported lazily: W&B start-up is slow and optional

            self._wandb_run = wandb.init(
                project=cfg.project,
                entity=cfg.entity or None,
                name=cfg.run_name or None,
                group=Path(resolved_config.get("run", {}).get("out_dir", "")).name or None,
                job_type=stage,
                mode=cfg.wandb,
                dir=str(run_dir),
                config=resolved_config,
                reinit="finish_previous",
            )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"stage": self.stage, "step": step, **metrics}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({f"{self.stage}/{k}": v for k, v in metrics.items()}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb_run is not None:
            self._wandb_run.summary.update(values)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def write_json_atomic(path: Path, payload: Any, indent: Optional[int] = 2) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=indent)
        handle.write("\n")
    os.replace(tmp, path)
