"""One function per report figure, each returning a matplotlib Figure built from plain numbers.

The figures are `matplotlib.figure.Figure` objects made without pyplot: no global figure
state to leak between calls, no GUI backend chosen behind our back, and they are freed like
any other object. Saving one (`figure.savefig(path)`) renders it with Agg. matplotlib is
imported inside the functions so that importing onerec stays fast.

Shape legend: T logged steps, L MoE layers, E experts, C codebook size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from onerec.report.run_files import CodebookUsage, StepRow, series

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Curves with at least this many points also get a smoothed line: a loss logged every few
# steps is a single batch's loss, too noisy to read the trend from.
_SMOOTH_FROM_POINTS = 30
_STATUS_COLOURS = {"pretrained": "#444444", "accepted": "#2a9d3a", "rejected": "#d62728"}


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _ema(values: np.ndarray, points: int) -> np.ndarray:
    """Exponential moving average with a span of about a tenth of the curve."""
    alpha = 2.0 / (max(points // 10, 2) + 1)
    out = np.empty_like(values)
    out[0] = values[0]
    for i in range(1, len(values)):
        out[i] = alpha * values[i] + (1 - alpha) * out[i - 1]
    return out


def _curve(ax: "Axes", steps: np.ndarray, values: np.ndarray, label: str, colour: str, **style: Any) -> None:
    if len(values) >= _SMOOTH_FROM_POINTS:
        ax.plot(steps, values, color=colour, alpha=0.3, linewidth=0.8)
        ax.plot(steps, _ema(values, len(values)), color=colour, label=f"{label} (smoothed)", **style)
    else:
        ax.plot(steps, values, color=colour, label=label, marker="." if len(values) < 15 else None, **style)


def _empty(ax: "Axes", text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def pretrain_curves_figure(rows: list[StepRow]) -> "Figure":
    """Pretraining: total and next-token loss, router losses, learning rate, validation metrics."""
    figure = _figure(11, 7.5)
    (loss_ax, router_ax), (lr_ax, valid_ax) = figure.subplots(2, 2, sharex=True)
    figure.suptitle("Pretraining (values logged every train.log_every steps; validation every train.eval_every)")
    colours = _colours()

    loss_ax.set_title("Training loss")
    for i, (key, label) in enumerate((("loss", "total loss"), ("ntp_loss", "next-token loss"))):
        steps, values = series(rows, key)
        if len(values):
            _curve(loss_ax, steps, values, label, colours[i])
    loss_ax.set_ylabel("cross-entropy (nats / code token)")

    router_ax.set_title("MoE router losses (before their weights)")
    plotted = 0
    for i, (key, label) in enumerate((("aux_loss", "load-balancing aux loss"), ("z_loss", "router z-loss"))):
        steps, values = series(rows, key)
        if len(values) and np.any(values != 0):
            _curve(router_ax, steps, values, label, colours[2 + i])
            plotted += 1
    router_ax.set_ylabel("loss")
    if not plotted:
        _empty(router_ax, "no router losses logged (dense model?)")

    lr_ax.set_title("Learning rate")
    steps, values = series(rows, "lr")
    if len(values):
        lr_ax.plot(steps, values, color=colours[4])
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    lr_ax.set_ylabel("learning rate")

    valid_ax.set_title("Validation (selection split)")
    names = sorted({k for row in rows for k in row.values if k.startswith("valid/")}, key=_metric_order)
    ks = sorted({_metric_k(name) for name in names})
    for name in names:
        steps, values = series(rows, name)
        metric = name.split("/", 1)[1]
        colour = colours[ks.index(_metric_k(name)) % len(colours)]
        style = "-" if metric.startswith("recall") else "--"
        valid_ax.plot(steps, values, style, marker="o", markersize=4, color=colour, label=metric)
    valid_ax.set_ylabel("metric value (0 to 1)")
    if not names:
        _empty(valid_ax, "no validation logged yet")

    for ax in (loss_ax, router_ax, lr_ax, valid_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    for ax in (lr_ax, valid_ax):
        ax.set_xlabel("training step")
    return figure


def expert_load_figure(steps_T: np.ndarray, load_TLE: np.ndarray) -> "Figure":
    """Heat map per MoE layer: experts down, logged steps across, colour = share of routed copies.

    The colour scale is centred on 1/E (white = perfectly balanced): red experts take more
    than their share, blue ones less, so collapse onto a few experts shows as red rows over
    blue ones.
    """
    from matplotlib.colors import TwoSlopeNorm

    T, L, E = load_TLE.shape
    if T == 0 or L == 0 or E == 0:
        raise ValueError("expert_load_figure needs at least one logged step, layer and expert")
    figure = _figure(11, 1.2 + L * min(max(1.6, 0.22 * E), 3.0))
    axes = figure.subplots(L, 1, sharex=True, squeeze=False)[:, 0]
    balanced = 1.0 / E
    # The scale tops out at 4x the balanced share: one early collapsed step (an expert taking
    # half the tokens) would otherwise wash every later imbalance out to near-white.
    highest = float(np.nanmax(load_TLE))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=balanced, vmax=min(max(2.0 * balanced, highest), 4.0 * balanced))
    x_edges = _cell_edges(steps_T.astype(np.float64))
    y_edges = np.arange(E + 1) - 0.5
    mesh = None
    for layer, ax in enumerate(axes):
        shares_ET = np.ma.masked_invalid(load_TLE[:, layer, :].T)
        mesh = ax.pcolormesh(x_edges, y_edges, shares_ET, cmap="RdBu_r", norm=norm, shading="flat")
        logged_T = np.flatnonzero(np.isfinite(load_TLE[:, layer]).any(axis=1))
        if len(logged_T):
            last = load_TLE[logged_T[-1], layer]
            title = (
                f"MoE layer {layer}: at step {int(steps_T[logged_T[-1]])} the busiest expert takes "
                f"{np.nanmax(last):.3f} = {np.nanmax(last) * E:.2f} x its balanced share"
            )
        else:
            title = f"MoE layer {layer}: no load logged"
        ax.set_title(title, fontsize="medium")
        ax.set_ylabel("expert")
        ax.set_yticks(range(E) if E <= 32 else range(0, E, max(1, E // 16)))
        ax.invert_yaxis()  # expert 0 at the top, as in a table
    axes[-1].set_xlabel("training step")
    figure.suptitle(f"Expert load per MoE layer ({E} experts: white = balanced share 1/E = {balanced:.3f})")
    colorbar = figure.colorbar(
        mesh,
        ax=list(axes),
        label="share of the layer's routed token copies",
        extend="max" if highest > norm.vmax else "neither",  # an arrow: some cells are above the scale
    )
    # The two halves of the bar are scaled differently, so ticks are spaced evenly in each half.
    colorbar.set_ticks([0.0, balanced / 2, *np.linspace(balanced, norm.vmax, 4)])
    colorbar.ax.yaxis.set_major_formatter("{x:.3f}")
    return figure


def codebook_figure(usage: CodebookUsage) -> "Figure":
    """Per semantic-ID level: items per code, most used first, beside the balanced count N/C."""
    levels = usage.levels
    columns = min(len(levels), 3)
    rows = -(-len(levels) // columns)
    figure = _figure(4.2 * columns + 0.5, 3.6 * rows)
    axes = figure.subplots(rows, columns, squeeze=False).reshape(-1)
    for ax, level in zip(axes, levels):
        counts = np.sort(level.items_per_code)[::-1]
        C = level.codebook_size
        used = int((counts > 0).sum())
        balanced = usage.num_items / C
        # A few codes holding most items (a collapsed level) would flatten the rest to nothing
        # on a linear axis.
        log_scale = counts[0] > 20 * max(balanced, 1.0)
        if C <= 128:
            ax.bar(np.arange(used), counts[:used], width=1.0, color="#4c72b0", edgecolor="white", linewidth=0.5)
        else:  # thousands of bars: one filled outline draws the same picture far faster
            ax.stairs(counts[:used], np.arange(used + 1) - 0.5, fill=True, color="#4c72b0",
                      baseline=0.5 if log_scale else 0)
        if used < C:
            ax.axvspan(used - 0.5, C - 0.5, color="#dddddd", zorder=0, label=f"unused codes ({C - used})")
        ax.axhline(balanced, color="#d62728", linestyle="--", label=f"balanced: N/C = {balanced:.1f}")
        ax.set_xlim(-0.5, C - 0.5)
        if log_scale:
            ax.set_yscale("log")
            ax.set_ylim(0.5, 5 * counts[0])  # headroom for the legend
        else:
            ax.set_ylim(0, 1.3 * max(counts[0], balanced))
        ax.set_title(
            f"Level {level.level}: {used}/{C} codes used ({level.used_fraction:.0%})\n"
            f"perplexity {level.perplexity:.1f} of {C} (entropy {level.entropy_bits:.2f} bits)",
            fontsize="medium",
        )
        ax.set_xlabel("code rank (most items first)")
        ax.set_ylabel("items per code" + (" (log scale)" if log_scale else ""))
        ax.legend(fontsize="small", loc="upper right")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(levels):]:
        ax.set_visible(False)
    collisions = f"{usage.collision_rate:.1%} of items share their full semantic tuple"
    figure.suptitle(
        f"Codebook utilisation: {usage.num_items:,} items, {usage.unique_tuples:,} distinct tuples; {collisions}"
    )
    return figure


def alignment_figure(alignment: dict) -> "Figure":
    """IPA: held-out reward and recall/NDCG before alignment and after each round.

    A round is accepted when its held-out recall@10 stays above the floor set by
    align.max_recall_drop; the first rejected round ends IPA and the last accepted one
    is exported (the dpo stage).
    """
    from matplotlib.lines import Line2D

    points = [alignment["pretrain"], *alignment["rounds"]]
    status = ["pretrained"] + [_round_status(r) for r in alignment["rounds"]]
    x = np.arange(len(points))
    labels = ["before IPA"] + [f"round {i}" for i in range(1, len(points))]
    metric_keys = [k for k in points[0] if k.startswith(("recall@", "ndcg@")) and _is_num(points[0][k])]
    recall_keys = sorted((k for k in metric_keys if k.startswith("recall@")), key=_metric_k)
    ndcg_keys = sorted((k for k in metric_keys if k.startswith("ndcg@")), key=_metric_k)
    panels = [("Held-out reward of sampled sessions", ["reward_mean", "reward_max"], "reward-model score")]
    if recall_keys:
        panels.append(("Held-out recall", recall_keys, "recall (0 to 1)"))
    if ndcg_keys:
        panels.append(("Held-out NDCG", ndcg_keys, "NDCG (0 to 1)"))
    figure = _figure(4.4 * len(panels) + 0.5, 4.2)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    colours = _colours()
    exported = alignment.get("exported_round")
    floor = _recall_floor(alignment)
    for ax, (title, keys, ylabel) in zip(axes, panels):
        for i, key in enumerate(keys):
            values = np.array([float(p[key]) if _is_num(p.get(key)) else np.nan for p in points])
            ax.plot(x, values, color=colours[i], linewidth=1.5, label=key.replace("_", " "), zorder=2)
            for xi, yi, st in zip(x, values, status):
                marker = {"pretrained": "s", "accepted": "o", "rejected": "X"}.get(st, "D")
                ax.plot(xi, yi, marker=marker, markersize=8, color=colours[i],
                        markeredgecolor=_STATUS_COLOURS.get(st, "black"), markeredgewidth=1.5, zorder=3)
        for xi, st in zip(x, status):
            if st == "rejected":
                ax.axvspan(xi - 0.5, xi + 0.5, color=_STATUS_COLOURS["rejected"], alpha=0.1, zorder=0)
                ax.text(xi, 0.98, "rejected", transform=ax.get_xaxis_transform(), ha="center", va="top",
                        color=_STATUS_COLOURS["rejected"], fontsize="small")
        if isinstance(exported, int) and 0 <= exported < len(points):
            ax.axvline(exported, color=_STATUS_COLOURS["accepted"], linestyle=":", linewidth=1.5,
                       label=f"exported ({labels[exported]})")
        if floor is not None and "recall@10" in keys:
            ax.axhline(floor, color="grey", linestyle="--", linewidth=1, label=f"acceptance floor {floor:.3f}")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xticks(x, labels)
        ax.set_xlim(-0.5, len(points) - 0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    status_handles = [
        Line2D([], [], linestyle="", marker=m, markersize=8, color="white", markeredgecolor=_STATUS_COLOURS[s],
               markeredgewidth=1.5, label=s)
        for s, m in (("pretrained", "s"), ("accepted", "o"), ("rejected", "X"))
    ]
    figure.legend(handles=status_handles, loc="outside lower center", ncols=3, fontsize="small", title="round status")
    figure.suptitle(
        f"Iterative preference alignment, measured on {alignment.get('eval_users', '?')} held-out users "
        f"of the {alignment.get('eval_split', 'validation')} split"
    )
    return figure


def reward_curves_figure(rows: list[StepRow]) -> "Figure":
    """The session reward model's training loss and its held-out loss after each epoch.

    The reward stage trains through the shared Trainer, which logs by step ("batch_loss":
    the global batch's mean, "valid/heldout_loss"); runs written before it logged per epoch
    ("train_loss", "heldout_loss") and are drawn by epoch.
    """
    figure = _figure(7, 4)
    ax = figure.subplots()
    colours = _colours()
    curves = (("batch_loss", "training loss (global batch)", None), ("valid/heldout_loss", "held-out loss", "o"))
    x_label = "step"
    if not any(len(series(rows, key)[1]) for key, _, _ in curves):
        curves = (("train_loss", "training loss (last batch)", "o"), ("heldout_loss", "held-out loss", "o"))
        x_label = "epoch"
    for i, (key, label, marker) in enumerate(curves):
        steps, values = series(rows, key)
        if len(values):
            ax.plot(steps, values, marker=marker, markersize=4, color=colours[i], label=label)
    ax.set_title("Reward model training")
    ax.set_xlabel(x_label)
    ax.set_ylabel("loss (BCE or MSE, mean over signals)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return figure


def _round_status(values: dict) -> str:
    accepted = values.get("accepted")
    return "unknown" if accepted is None else ("accepted" if accepted else "rejected")


def _recall_floor(alignment: dict) -> Optional[float]:
    drop = (alignment.get("config") or {}).get("max_recall_drop")
    recall = alignment["pretrain"].get("recall@10")
    if not _is_num(drop) or not _is_num(recall):
        return None
    return (1.0 - float(drop)) * float(recall)


def _cell_edges(steps: np.ndarray) -> np.ndarray:
    """Cell boundaries half way between logged steps, so uneven logging keeps true widths."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    middles = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[steps[0] - (middles[0] - steps[0])], middles, [steps[-1] + (steps[-1] - middles[-1])]])


def _metric_k(name: str) -> int:
    """The K of 'valid/recall@10' (0 when there is none)."""
    tail = name.rsplit("@", 1)[-1]
    return int(tail) if "@" in name and tail.isdigit() else 0


def _metric_order(name: str) -> tuple:
    return (_metric_k(name), name)


def _colours() -> list[str]:
    return ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
