"""`write_report`: the figures and tables of a run directory as RUN_DIR/report.html.

Each section is drawn only from its own stage's output, so a run that stopped early (or
skipped reward and IPA) still gets a page: the missing sections say which stage to run.

    RUN_DIR/report.html                 the page (static, opens offline)
    RUN_DIR/report/<figure>.png         its figures, linked by relative path
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from onerec.paths import RunPaths
from onerec.report import figures, tables
from onerec.report.html import Section, render_page
from onerec.report.run_files import (
    codebook_usage,
    expert_load_by_step,
    read_alignment,
    read_json,
    read_metrics_log,
    stage_rows,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("onerec.report")

REPORT_HTML = "report.html"
FIGURE_DIR = "report"
# Every figure the report can draw (file stem = W&B name); stale copies of these are removed.
FIGURE_NAMES = ("pretrain_curves", "expert_load", "codebook_utilization", "reward_curves", "alignment")


def training_figures(run_dir: Path) -> dict[str, "Figure"]:
    """The expert-load heat map and the codebook-utilisation plots of a run, by name, for
    `RunLogger.log_figures` at the end of pretraining; a figure whose inputs are missing
    (no MoE, no semantic IDs) is left out."""
    run_dir = Path(run_dir)
    out: dict[str, "Figure"] = {}
    steps_T, load_TLE = expert_load_by_step(stage_rows(read_metrics_log(run_dir), "pretrain"))
    if load_TLE.size:
        out["expert_load"] = figures.expert_load_figure(steps_T, load_TLE)
    usage = codebook_usage(run_dir)
    if usage is not None:
        out["codebook_utilization"] = figures.codebook_figure(usage)
    return out


def write_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report.html and RUN_DIR/report/*.png; returns the path of the page."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory (the run.out_dir of a pipeline run)")
    figure_dir = run_dir / FIGURE_DIR
    figure_dir.mkdir(exist_ok=True)
    drawn: set[str] = set()

    def save(name: str, make: Callable[[], "Figure"]) -> str:
        figure = make()
        figure.savefig(figure_dir / f"{name}.png", format="png", dpi=100)
        drawn.add(name)
        return f"{FIGURE_DIR}/{name}.png"

    paths = RunPaths.of(run_dir)
    records = read_metrics_log(run_dir)
    pretrain_rows = stage_rows(records, "pretrain")
    reward_rows = stage_rows(records, "reward")
    usage = codebook_usage(run_dir)
    alignment = read_alignment(run_dir)
    metrics = read_json(paths.metrics)
    no_pretrain = "No pretraining records in metrics.jsonl: run `onerec pretrain` with this run.out_dir."

    sections = []

    section = Section("pretrain", "Pretraining curves")
    if pretrain_rows:
        section.intro = (
            "Training loss (a single batch's, every train.log_every steps, smoothed when there are many points), "
            "the MoE router losses, the learning-rate schedule, and Recall/NDCG@K on the validation users at "
            "each evaluation (NDCG dashed)."
        )
        section.image = save("pretrain_curves", lambda: figures.pretrain_curves_figure(pretrain_rows))
    else:
        section.note = no_pretrain
    sections.append(section)

    section = Section("expert-load", "MoE expert load")
    steps_T, load_TLE = expert_load_by_step(pretrain_rows)
    if load_TLE.size:
        section.intro = (
            "Share of each MoE layer's routed token copies (top-k: each token counts once per chosen expert) "
            "taken by each expert at every logged training step. White is the balanced share 1/E; red rows are "
            "overloaded experts, blue rows starved ones."
        )
        section.image = save("expert_load", lambda: figures.expert_load_figure(steps_T, load_TLE))
    else:
        no_load = "Pretraining logged no expert load (model.moe.enabled=false?)."
        section.note = no_load if pretrain_rows else no_pretrain
    sections.append(section)

    section = Section("codebook", "Codebook utilisation")
    if usage is not None:
        section.intro = (
            "Items per code at each semantic-ID level, most used code first. A balanced quantiser puts N/C items "
            "on every code (dashed line); perplexity is the effective number of codes in use (2^entropy)."
        )
        section.image = save("codebook_utilization", lambda: figures.codebook_figure(usage))
        section.tables.append(("Per level", tables.codebook_table(usage)))
        dedup = f"; the dedup level needs {usage.dedup_size} codes" if usage.dedup_size is not None else ""
        section.intro += (
            f" {usage.unique_tuples} distinct tuples for {usage.num_items} items; "
            f"{usage.collision_rate:.1%} of items share their tuple with another item{dedup}."
        )
    else:
        section.note = f"No semantic IDs in {paths.semantic_ids}: run `onerec tokenize` with this run.out_dir."
    sections.append(section)

    section = Section("reward", "Reward model training")
    if reward_rows:
        section.intro = (
            "The session reward model's training loss and its held-out loss after each epoch; training "
            "stops when the held-out loss stops improving."
        )
        section.image = save("reward_curves", lambda: figures.reward_curves_figure(reward_rows))
    else:
        section.note = "No reward-model records in metrics.jsonl: the reward stage has not run (reward.enabled=false?)."
    sections.append(section)

    section = Section("alignment", "Preference alignment (IPA)")
    if alignment is not None:
        section.intro = (
            "Reward and accuracy of the model's beam-search sessions on the same held-out users before alignment "
            "and after each round. A round is rejected (red, X) when its recall@10 falls below the acceptance "
            "floor; IPA then stops and the last accepted model is exported."
        )
        section.image = save("alignment", lambda: figures.alignment_figure(alignment))
        section.tables.append(("Per round", tables.alignment_table(alignment)))
    else:
        section.note = f"No {paths.dpo / 'alignment.json'}: IPA has not run (align.enabled=false, or run `onerec dpo`)."
    sections.append(section)

    section = Section("metrics", "Evaluation metrics")
    if metrics is not None and (isinstance(metrics.get("valid"), dict) or isinstance(metrics.get("test"), dict)):
        section.intro = (
            "Recall/NDCG@K of the evaluated model over the full catalogue, beside the popularity baseline "
            "(and the model before IPA when alignment ran), from metrics.json."
        )
        section.tables.append(("Validation and test", tables.metrics_table(metrics)))
    else:
        section.note = f"No evaluation in {paths.metrics}: run `onerec evaluate` with this run.out_dir."
    sections.append(section)

    for name in FIGURE_NAMES:  # a figure from an earlier report whose inputs are gone would mislead
        if name not in drawn:
            (figure_dir / f"{name}.png").unlink(missing_ok=True)
    page = render_page(f"OneRec run report: {run_dir.name}", _meta_line(run_dir, metrics), sections)
    out = run_dir / REPORT_HTML
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    log.debug("wrote %s (%d figures)", out, len(drawn))
    return out


def _meta_line(run_dir: Path, metrics: Optional[dict]) -> str:
    parts = [f"run directory {run_dir.resolve()}"]
    data = (metrics or {}).get("data") or {}
    if data:
        counts = [f"{data[k]:,} {k}" for k in ("users", "items", "interactions") if isinstance(data.get(k), int)]
        parts.append(", ".join(counts))
    if isinstance((metrics or {}).get("wall_seconds"), (int, float)):
        parts.append(f"pipeline wall time {metrics['wall_seconds']:.0f} s")
    return " · ".join(parts)
