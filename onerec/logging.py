"""Run logging: console, a metrics.jsonl of training curves, and Weights & Biases.

Only rank 0 writes anything. When W&B is disabled the W&B sink is simply absent, so
callers never branch on it. Every scalar goes to both sinks under the same name; W&B
prefixes it with the stage (`pretrain/loss`, `tokenize/codebook/level0/utilization`).

What the stages log (metric names, all scalars so metrics.jsonl stays plain JSON):

    pretrain  loss, ntp_loss, aux_loss, z_loss, lr, epoch, samples_per_s, tokens, tokens_per_s,
              moe/load/layer{l}/expert{e} (share of routed copies), moe/load_max/layer{l}
              (max share x E: 1.0 when balanced), valid/<metric>
    tokenize  codebook/level{l}/{utilization, entropy, perplexity}, codebook/collision_rate

Figures and tables go to W&B only (`log_figures`, `log_table`): metrics.jsonl keeps scalars, and
`onerec report` redraws the figures from it and the stages' output files.

`logging.wandb=offline` needs no network: the run is written under
<run dir>/wandb/offline-run-*/ (a run-*.wandb event file) and uploaded later with
`wandb sync <that directory>`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from onerec.config import LoggingConfig

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS_LOG = "metrics.jsonl"  # in the run directory: one JSON object per log call, every stage

_CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record (not the one at set-up),
    so a caller that redirects stderr later, such as a test capturing it, still gets the log."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; sys.stderr is used instead
        pass


def setup_console(level: int = logging.INFO) -> None:
    """Human-readable console logging for the `onerec` loggers (idempotent)."""
    root = logging.getLogger("onerec")
    if not any(getattr(handler, "_onerec_console", False) for handler in root.handlers):
        handler = _StderrHandler()
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
        self._jsonl = open(run_dir / METRICS_LOG, "a", encoding="utf-8")
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

    @property
    def uses_wandb(self) -> bool:
        """True on the rank that sends to W&B: lets a caller skip drawing figures nobody receives."""
        return self._wandb_run is not None

    def wandb_payload(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The dict sent to W&B for `metrics`: the same scalars, prefixed with the stage."""
        return {f"{self.stage}/{k}": v for k, v in metrics.items()}

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"stage": self.stage, "step": step, **metrics}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(self.wandb_payload(metrics), step=step)

    def log_figures(self, figures: dict[str, "Figure"], step: Optional[int] = None) -> None:
        """Each matplotlib figure as a `wandb.Image` under `<stage>/<name>`; nothing without W&B.

        The figure is drawn here with Agg into an RGB array: handing W&B the Figure itself
        would make it import pyplot (and pick a GUI backend) to find "the current figure".
        """
        if self._wandb_run is None or not figures:
            return
        import wandb

        payload = {f"{self.stage}/{name}": wandb.Image(figure_rgb(figure)) for name, figure in figures.items()}
        if step is None:
            self._wandb_run.log(payload)
        else:
            self._wandb_run.log(payload, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A table (e.g. the metrics beside the baselines) as a `wandb.Table` under `<stage>/<name>`."""
        widths = {len(row) for row in rows}
        if widths - {len(columns)}:  # checked with W&B off too, so a bad table fails in every run
            raise ValueError(f"table {name!r}: {len(columns)} columns but rows of length {sorted(widths)}")
        if self._wandb_run is None:
            return
        import wandb

        self._wandb_run.log({f"{self.stage}/{name}": wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

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


def expert_load_scalars(load_LE: Any) -> dict[str, float]:
    """Per-layer expert load as scalars: the share of routed copies per expert, and the
    busiest expert's share times E (1.0 when perfectly balanced, E when one expert takes all).

    load_LE: [MoE layers, E] shares (ModelOutput.expert_load), a tensor or nested lists.
    """
    rows = load_LE.tolist() if hasattr(load_LE, "tolist") else load_LE
    scalars: dict[str, float] = {}
    for layer, shares in enumerate(rows):
        for expert, share in enumerate(shares):
            scalars[f"moe/load/layer{layer}/expert{expert}"] = float(share)
        if shares:
            scalars[f"moe/load_max/layer{layer}"] = float(max(shares)) * len(shares)
    return scalars


def figure_rgb(figure: "Figure") -> Any:
    """A matplotlib figure drawn by Agg, as a [height, width, 3] uint8 numpy array."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def codebook_scalars(stats: dict[str, Any]) -> dict[str, float]:
    """Codebook health from the tokenizer's statistics (semantic_ids.codebook_stats)."""
    scalars: dict[str, float] = {}
    for level, values in enumerate(stats.get("per_level", [])):
        for name in ("utilization", "entropy", "perplexity"):
            if name in values:
                scalars[f"codebook/level{level}/{name}"] = float(values[name])
    if "collision_rate_before_dedup" in stats:
        scalars["codebook/collision_rate"] = float(stats["collision_rate_before_dedup"])
    return scalars


class RateMeter:
    """Units per second over the last `window` steps, from the times between step calls.

    update(n) is called at the start of each step with that step's units; the rate covers
    the steps that have finished since the oldest remembered call (the current step's own
    work is not timed yet). 0.0 until two calls have been seen.
    """

    def __init__(self, window: int) -> None:
        self._calls: deque[tuple[float, float]] = deque(maxlen=max(1, window) + 1)

    def reset(self) -> None:
        """Forget the window (e.g. after an evaluation, so its time is not counted as training)."""
        self._calls.clear()

    def update(self, units: float, now: Optional[float] = None) -> float:
        self._calls.append((time.perf_counter() if now is None else now, float(units)))
        if len(self._calls) < 2:
            return 0.0
        first_time = self._calls[0][0]
        finished = sum(units for _, units in list(self._calls)[:-1])
        elapsed = self._calls[-1][0] - first_time
        return finished / elapsed if elapsed > 0 else 0.0


def write_json_atomic(path: Path, payload: Any, indent: Optional[int] = 2) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=indent)
        handle.write("\n")
    os.replace(tmp, path)
