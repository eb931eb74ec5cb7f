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

W&B runs: one W&B group per run directory, one W&B run per stage.

    group     the run directory's onerec run id (<out>/.onerec-run.json): stable when the
              directory is moved or renamed, shared by every stage that writes there
    job_type  the stage (tokenize, pretrain, sasrec / sasrec_pp / hstu, reward, dpo, evaluate)
    name      <run dir name>/<stage>, or <logging.run_name>/<stage>
    id        kept in <out>/.onerec/wandb/<stage>.json {"stage", "wandb_id", "training_run_id",
              ...} (rank 0, atomically), so a restarted or requeued stage resumes the same W&B
              run (`resume="allow"`) instead of opening a second one
    config    the resolved config, plus "onerec": {version, git_commit, git_dirty (when the code
              is a git checkout), run_id, run_dir, stage, training_run_id}

A training stage's W&B run follows its training run (TrainState.run_id): a trainer that calls
`RunLogger.set_training_run(run_id)` once it knows the id keeps the W&B run when it resumed
that training run and opens a new one when it started from scratch (a caller that knows the id
before it builds the logger passes `training_run_id=`). Without either, the W&B run is kept
per stage. W&B's own step counter is left to W&B: each scalar is plotted against
`<stage>/step` (W&B's `define_metric`), so an attempt that logs steps again after a restart
adds points instead of having them dropped as "not monotonic".

Settings: an explicit `logging.*` value wins, then the environment, then the default, as with
`wandb.init()`, whose arguments win over WANDB_* variables:

    logging.wandb    | WANDB_MODE     | disabled   (online, offline, disabled; W&B's aliases
                                                    dryrun = offline and run = online too)
    logging.project  | WANDB_PROJECT  | onerec
    logging.entity   | WANDB_ENTITY   | your W&B default entity
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from onerec import __version__
from onerec.config import LoggingConfig
from onerec.errors import ConfigError
from onerec.run_dir import RUN_MARKER

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS_LOG = "metrics.jsonl"  # in the run directory: one JSON object per log call, every stage
WANDB_STATE_DIR = Path(".onerec") / "wandb"  # in the run directory: <stage>.json, the stage's W&B run id
WANDB_MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline", "run": "online"}

log = logging.getLogger("onerec.logging")

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


def console_format(environ) -> str:
    """The console line format: with the rank in it when several ranks run and no launcher
    prefixes the lines already (torchrun does, through launch/common.sh's LOG_PREFIX; the
    DeepSpeed launcher and srun do not)."""
    several = int(environ.get("WORLD_SIZE", "1") or 1) > 1
    if several and not environ.get("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"):
        return _CONSOLE_FORMAT.replace("%(levelname)s", f"[rank {environ.get('RANK', '?')}] %(levelname)s", 1)
    return _CONSOLE_FORMAT


def setup_console(level: int = logging.INFO) -> None:
    """Human-readable console logging for the `onerec` loggers (idempotent)."""
    root = logging.getLogger("onerec")
    if not any(getattr(handler, "_onerec_console", False) for handler in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(console_format(os.environ), datefmt="%H:%M:%S"))
        handler._onerec_console = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def progress_disabled() -> bool:
    """Progress bars are on unless ONEREC_NO_PROGRESS=1 (handy for CI logs)."""
    return os.environ.get("ONEREC_NO_PROGRESS", "0") == "1"


def resolve_wandb(cfg: LoggingConfig, environ: Optional[dict] = None) -> tuple[str, str, Optional[str]]:
    """(mode, project, entity) for W&B: the explicit config, else WANDB_MODE / WANDB_PROJECT /
    WANDB_ENTITY, else disabled / "onerec" / None (W&B's default entity)."""
    env = os.environ if environ is None else environ
    raw = cfg.wandb or env.get("WANDB_MODE", "").strip() or "disabled"
    if raw not in WANDB_MODES:
        raise ConfigError(f"WANDB_MODE={raw!r}: expected one of {', '.join(map(repr, WANDB_MODES))}")
    project = cfg.project or env.get("WANDB_PROJECT", "").strip() or "onerec"
    entity = cfg.entity or env.get("WANDB_ENTITY", "").strip() or None
    return WANDB_MODES[raw], project, entity


def wandb_state_path(run_dir: Path, stage: str) -> Path:
    """Where the W&B run id of `stage` is kept: <run dir>/.onerec/wandb/<stage>.json."""
    return Path(run_dir) / WANDB_STATE_DIR / f"{stage}.json"


def read_wandb_state(run_dir: Path, stage: str) -> Optional[dict]:
    """The stage's stored W&B run ({"wandb_id", "training_run_id", ...}); None if none (or unreadable)."""
    path = wandb_state_path(run_dir, stage)
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        log.warning("%s is unreadable (%s): the %s stage opens a new W&B run", path, err, stage)
        return None
    return state if isinstance(state, dict) and state.get("wandb_id") else None


def run_group(run_dir: Path) -> str:
    """A stable id of the run directory: its onerec run id, or (a directory onerec has not
    marked, e.g. a logger used on its own) a hash of its absolute path."""
    try:
        return str(json.loads((Path(run_dir) / RUN_MARKER).read_text(encoding="utf-8"))["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return "dir-" + hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:24]


def git_info(package_dir: Optional[Path] = None) -> dict[str, Any]:
    """{"git_commit", "git_dirty"} of the checkout holding the onerec package; {} when the code
    is not a git checkout (an installed wheel, an image without .git) or git is missing."""
    package = Path(package_dir or Path(__file__).resolve().parent)
    try:
        found = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=package,
                               capture_output=True, text=True, timeout=10)
        lines = found.stdout.splitlines()
        # Only a checkout of this code: not some other repository that happens to hold site-packages.
        if found.returncode != 0 or len(lines) < 2 or Path(lines[0]).resolve() / package.name != package.resolve():
            return {}
        info: dict[str, Any] = {"git_commit": lines[1].strip()}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=lines[0],
                                capture_output=True, text=True, timeout=10)
        if status.returncode == 0:
            info["git_dirty"] = bool(status.stdout.strip())
        return info
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """onerec's version and, in a git checkout, the commit (looked up once per process)."""
    return {"version": __version__, **git_info()}


class RunLogger:
    """Scalars to metrics.jsonl (+ W&B when enabled) on rank 0; a no-op elsewhere."""

    def __init__(
        self,
        cfg: LoggingConfig,
        run_dir: Path,
        stage: str,
        resolved_config: dict,
        rank: int = 0,
        training_run_id: Optional[str] = None,
    ) -> None:
        self.enabled = rank == 0
        self.stage = stage
        self._step_key = f"{stage}/step"
        self._wandb_run = None
        self._jsonl = None
        if not self.enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._run_dir = run_dir
        self._cfg = cfg
        self._resolved_config = resolved_config
        self._jsonl = open(run_dir / METRICS_LOG, "a", encoding="utf-8")
        self._mode, self._project, self._entity = resolve_wandb(cfg)
        if self._mode != "disabled":
            self._start_wandb(training_run_id)

    def _start_wandb(self, training_run_id: Optional[str]) -> None:
        """Open the stage's W&B run: the stored one when it belongs to the same training run
        (or the stage has none), a new one otherwise; the id is stored before W&B starts."""
        import wandb  # imported lazily: W&B start-up is slow and optional

        state = read_wandb_state(self._run_dir, self.stage)
        stored = None if state is None else state.get("training_run_id")
        if state is not None and (training_run_id is None or stored in (None, training_run_id)):
            wandb_id = str(state["wandb_id"])
            training_run_id = training_run_id or stored
        else:
            wandb_id = uuid.uuid4().hex[:16]
        group = run_group(self._run_dir)
        name = f"{self._cfg.run_name or self._run_dir.resolve().name}/{self.stage}"
        write_json_atomic(wandb_state_path(self._run_dir, self.stage), {
            "stage": self.stage, "wandb_id": wandb_id, "training_run_id": training_run_id, "group": group,
            "name": name, "project": self._project, "entity": self._entity,
            "opened": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        })
        meta = {**code_version(), "run_id": group, "run_dir": str(self._run_dir.resolve()), "stage": self.stage,
                "training_run_id": training_run_id}
        self._wandb_run = wandb.init(
            project=self._project,
            entity=self._entity,
            name=name,
            group=group,
            job_type=self.stage,
            mode=self._mode,
            dir=str(self._run_dir),
            id=wandb_id,
            resume="allow",
            config={**self._resolved_config, "onerec": meta},
            reinit="finish_previous",
        )
        # Plot against our own step, not W&B's: W&B drops values logged at a step below the
        # last one it saw, which a restarted stage does when it logs its steps again.
        self._wandb_run.define_metric(self._step_key, hidden=True)
        self._wandb_run.define_metric(f"{self.stage}/*", step_metric=self._step_key)

    @property
    def wandb_id(self) -> Optional[str]:
        """The id of the W&B run this logger sends to (None without W&B)."""
        return None if self._wandb_run is None else self._wandb_run.id

    def set_training_run(self, run_id: str) -> None:
        """Tell the logger the training run it logs (TrainState.run_id), once it is known.

        The stage's W&B run stays when it already belongs to this training run, or to none
        (it is then recorded as this run's); when it belongs to another training run, this
        one started from scratch, so that W&B run is finished and a new one opened.
        """
        if self._wandb_run is None or not run_id:
            return
        state = read_wandb_state(self._run_dir, self.stage)
        if state is not None and state.get("wandb_id") == self._wandb_run.id:
            if state.get("training_run_id") == run_id:
                return
            if state.get("training_run_id") is None:
                write_json_atomic(wandb_state_path(self._run_dir, self.stage), {**state, "training_run_id": run_id})
                self._wandb_run.config.update({"onerec": {**self._wandb_run.config.get("onerec", {}),
                                                          "training_run_id": run_id}}, allow_val_change=True)
                return
        log.info("%s: training run %s started from scratch: a new W&B run", self.stage, run_id)
        self._wandb_run.finish()
        self._wandb_run = None
        self._start_wandb(run_id)

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
            self._wandb_run.log({**self.wandb_payload(metrics), self._step_key: step})

    def log_figures(self, figures: dict[str, "Figure"], step: Optional[int] = None) -> None:
        """Each matplotlib figure as a `wandb.Image` under `<stage>/<name>`; nothing without W&B.

        The figure is drawn here with Agg into an RGB array: handing W&B the Figure itself
        would make it import pyplot (and pick a GUI backend) to find "the current figure".
        Without `step`, W&B files it at the last step logged.
        """
        if self._wandb_run is None or not figures:
            return
        import wandb

        payload = {f"{self.stage}/{name}": wandb.Image(figure_rgb(figure)) for name, figure in figures.items()}
        if step is not None:
            payload[self._step_key] = step
        self._wandb_run.log(payload)

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


def flat_scalars(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict (metrics.json) as `a/b/c` keys: numbers, booleans and strings are kept,
    lists and None are left out. For W&B summaries, whose keys name one value each."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_scalars(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
    return flat


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
