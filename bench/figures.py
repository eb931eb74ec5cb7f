"""Figures of the benchmark results: one function per bench script, each drawing from the very
dict that script writes as json, into a PNG beside it (bench/results/<stem>.png).

    python bench/figures.py bench/results/quality_beauty.json [more.json ...]   # redraw <stem>.png

The bench scripts call `save_figure` right after writing their json, so a figure never shows
a number the json does not hold; the command line redraws any committed json without rerunning
its benchmark. Which figure a json gets follows from its file name (`quality_beauty.json` ->
`quality`). Every figure carries a caption with the device, the date and the command from the
json. matplotlib is imported inside the functions (Agg backend, no display needed), so
importing this module costs nothing and a machine without matplotlib still runs the benches.

Error bars are one standard error of the mean over the evaluated users: for Recall@K (a share
of users with a hit) sqrt(p (1 - p) / n). Per-user NDCG values are not in the json files, so
NDCG bars carry an upper bound of that standard error, from Recall@K and NDCG@K alone (see
`ndcg_standard_error_bound`); each caption says which is which.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path

# Colours by role, the same in every figure: ours, our baselines, published rows.
OURS, BASELINE, BASELINE_2, BASELINE_3, BASELINE_4, PUBLISHED = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#9e9e9e"
)
CAPTION_WIDTH = 130  # characters per caption line at the figure widths used here
QUALITY_METRICS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or a GPU machine
    import matplotlib.pyplot as plt

    return plt


def _label(metric: str) -> str:
    """recall@10 -> R@10, ndcg@5 -> N@5 (the papers' column names)."""
    return metric.replace("recall", "R").replace("ndcg", "N")


def _caption(fig, result: dict, *notes: str) -> None:
    """Device, date and command from the json, then the figure's own notes, under the axes."""
    lines = [f"Device: {result.get('device', 'unknown')}; date: {result.get('date', 'unknown')}."]
    if result.get("command"):
        lines.append(f"Command: {result['command']}")
    lines += [note for note in notes if note]
    wrapped = "\n".join(textwrap.fill(line, CAPTION_WIDTH, subsequent_indent="  ") for line in lines)
    fig.text(0.01, 0.0, wrapped, ha="left", va="top", fontsize=8, family="monospace")


def _flops(per_second: float) -> str:
    """289.9 GFLOP/s on a CPU, 612.3 TFLOP/s on a GPU."""
    return f"{per_second / 1e12:,.1f} TFLOP/s" if per_second >= 1e12 else f"{per_second / 1e9:,.1f} GFLOP/s"


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # "tight" grows the canvas to hold the caption, which sits below the axes.
    fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.15)
    _pyplot().close(fig)
    return path


def recall_standard_error(p: float, n: int) -> float:
    """Standard error of a share p of n users (Recall@K with one target per user)."""
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n else float("nan")


def ndcg_standard_error_bound(ndcg: float, recall: float, k: int, n: int) -> float:
    """An upper bound of the standard error of the mean per-user NDCG@K over n users.

    With one target per user, a user's NDCG@K is 0 without a hit (probability 1 - p, p =
    Recall@K) and 1 / log2(rank + 2) in [a, 1], a = 1 / log2(K + 1), with one. The hits'
    mean is mu = NDCG / p; the variance of values in [a, 1] with mean mu is at most
    (1 - mu)(mu - a) (Bhatia-Davis), so Var <= p ((1 - mu)(mu - a) + mu^2) - NDCG^2.
    """
    if not n or recall <= 0:
        return 0.0 if n else float("nan")
    a = 1.0 / math.log2(k + 1)
    mu = min(max(ndcg / recall, a), 1.0)
    variance = recall * ((1.0 - mu) * (mu - a) + mu * mu) - ndcg * ndcg
    return math.sqrt(max(variance, 0.0) / n)


def users_from_hit_shares(shares: list[float], max_users: int = 5_000_000, tol: float = 1e-6) -> int | None:
    """The smallest n for which every share is a whole number of users out of n, or None.

    Recall@K is hits / n exactly (one target per user), so the json's recall values pin n
    down even where the file predates the recorded user count: with several independent
    shares, a wrong n makes some share x n miss a whole number by far more than rounding.
    """
    import numpy as np

    values = np.array([s for s in shares if 0.0 < s < 1.0], dtype=np.float64)
    if len(values) < 2:
        return None  # one share alone fits many n
    candidates = np.arange(1, max_users + 1, dtype=np.float64)
    ok = np.ones(len(candidates), dtype=bool)
    for share in values:
        counts = share * candidates
        ok &= np.abs(counts - np.round(counts)) < tol * np.maximum(counts, 1.0)
    found = np.flatnonzero(ok)
    return int(candidates[found[0]]) if len(found) else None


# ---------------------------------------------------------------------------------------------
# one function per bench script
# ---------------------------------------------------------------------------------------------


def quality_figure(result: dict, path: Path) -> Path:
    """bench/quality.py: R@5 / N@5 / R@10 / N@10 on the test split, one bar per model.

    Published rows in grey (no error bars: their per-user values are not known), ours in
    colour with one standard error; the target (published row x factor) as a dashed mark."""
    plt = _pyplot()
    measured = [
        ("popularity (ours)", result["popularity"]["test"], BASELINE_2),
        *[(label, result[key]["test"], colour) for key, label, colour in (
            ("sasrec", "SASRec (ours, CE)", BASELINE),
            ("sasrec_pp", "SASRec++ (ours, CE + crop/shuffle)", BASELINE_3),
            ("hstu", "HSTU (ours, CE)", BASELINE_4),
        ) if key in result],
        ("OneRec (ours)", result["ours"]["test"], OURS),
    ]
    published = list(result.get("published", {}).items())
    n, n_source = result.get("test_users"), "recorded in the json"
    if not n:
        shares = [row[m] for _, row, _ in measured for m in QUALITY_METRICS if m.startswith("recall")]
        n, n_source = users_from_hit_shares(shares), "recovered from the json's Recall values, which are hits / n"

    bars = [(name, row, PUBLISHED, False) for name, row in published] + [(name, row, c, True) for name, row, c in measured]
    fig, ax = plt.subplots(figsize=(12, 5.2))
    group_width = 0.84
    width = group_width / len(bars)
    x0 = range(len(QUALITY_METRICS))
    for b, (name, row, colour, ours) in enumerate(bars):
        xs = [x - group_width / 2 + (b + 0.5) * width for x in x0]
        values = [row[m] for m in QUALITY_METRICS]
        errors = None
        if ours and n:
            errors = [
                recall_standard_error(row[m], n) if m.startswith("recall")
                else ndcg_standard_error_bound(row[m], row[m.replace("ndcg", "recall")], int(m.split("@")[1]), n)
                for m in QUALITY_METRICS
            ]
        ax.bar(xs, values, width * 0.92, color=colour, yerr=errors, capsize=2.5, label=name,
               alpha=1.0 if ours else 0.35 + 0.6 * b / max(len(published), 1), edgecolor="black", linewidth=0.4,
               hatch=None if ours else "//")
    if result.get("target"):
        for x, m in zip(x0, QUALITY_METRICS):
            ax.hlines(result["target"][m], x - group_width / 2, x + group_width / 2, colors="crimson",
                      linestyles="--", linewidth=1.2, label=f"target ({result['target_label']})" if x == 0 else None)
    ax.set_xticks(list(x0), [_label(m) for m in QUALITY_METRICS])
    ax.set_xlabel("metric at cutoff K (R = Recall, N = NDCG; test split, full-catalogue ranking)")
    ax.set_ylabel("Recall@K or NDCG@K (0 to 1, mean over test users)")
    ax.set_title(f"Recommendation quality on {result['name']} (test split)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(ncol=2, fontsize=8, loc="upper left")
    if n:
        bars_note = (
            f"Error bars, on our rows only: one standard error over n = {n:,} test users, {n_source}. Recall@K: "
            "sqrt(p(1-p)/n). NDCG@K: an upper bound of its standard error from Recall@K and NDCG@K, since the json "
            "holds no per-user NDCG values."
        )
    else:
        bars_note = "No error bars: the number of test users is neither recorded in the json nor recoverable from it."
    published_note = "Published rows (hatched): as printed in their sources, no error bars." if published else ""
    _caption(fig, result, bars_note, published_note)
    return _save(fig, path)


def kernels_figure(result: dict, path: Path) -> Path:
    """bench/kernels.py: constrained-decoding latency vs catalogue size (log-log), ours vs the
    hf-style decode; MoE layer forward + backward time per implementation (bars from zero)."""
    plt = _pyplot()
    decode, moe = result.get("decode") or [], result.get("moe") or []
    panels = [p for p in ("decode", "moe") if result.get(p)]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(6.2 * max(len(panels), 1), 4.6), squeeze=False)
    axes = list(axes[0])
    notes = []
    if decode:
        ax = axes.pop(0)
        items = [r["items"] for r in decode]
        d0 = decode[0]
        ax.plot(items, [r["ours_ms_per_step"] for r in decode], "o-", color=OURS, label="ours (constrained_beam_step)")
        ax.plot(items, [r["hf_style_ms_per_step"] for r in decode], "s--", color=BASELINE,
                label="hf-style (prefix_allowed_tokens_fn)")
        for r in decode:
            ax.annotate(f"{r['speedup']:.0f}x", (r["items"], math.sqrt(r["ours_ms_per_step"] * r["hf_style_ms_per_step"])),
                        ha="center", fontsize=9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("catalogue size (items, log scale)")
        ax.set_ylabel("time per decode step (ms, log scale)")
        ax.set_title(f"Constrained decoding, B={d0['B']}, W={d0['W']}")
        ax.grid(which="both", alpha=0.3)
        ax.legend(fontsize=8)
        notes.append(f"Decoding: {d0['steps']} steps per decode; same precomputed logits for both methods, model not "
                     "timed; labels: speedup of ours.")
    if moe:
        ax = axes.pop(0)
        ran = [r for r in moe if "layer_ms" in r]
        colours = {"ours": OURS, "deepspeed": BASELINE, "megatron": BASELINE_2}
        names = [r["name"] for r in ran]
        bars = ax.bar(names, [r["layer_ms"] for r in ran], color=[colours.get(n, PUBLISHED) for n in names],
                      edgecolor="black", linewidth=0.4)
        for bar, r in zip(bars, ran):
            ax.annotate(f"{r['layer_ms']:.1f} ms\n{r['tflops']:.3g} TFLOP/s", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.margins(y=0.15)  # linear from zero: bar lengths compare directly
        c = result.get("moe_config", {})
        ax.set_xlabel("implementation")
        ax.set_ylabel("MoE layer forward + backward (ms)")
        ax.set_title(f"MoE FFN, T={c.get('T')}, E={c.get('E')}, top-{c.get('K')}, {c.get('dtype')}")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.set_axisbelow(True)
        skipped = [f"{r['name']} ({r['error'][:60]})" for r in moe if "error" in r]
        if skipped:
            notes.append("Not run: " + "; ".join(skipped) + ".")
        dense = c.get("dense_matmul") or {}
        if dense:
            notes.append(f"Dense {c.get('dtype')} matmul {dense['shape']}: {dense['tflops']:.0f} TFLOP/s.")
    fig.suptitle(f"Kernel benchmarks on {result.get('device', '?')}: median of repeats, timed by {result.get('clock', '?')}")
    fig.tight_layout()
    _caption(fig, result, f"torch {result.get('torch', '?')}, {result.get('threads', '?')} CPU thread(s).", *notes)
    return _save(fig, path)


def train_throughput_figure(result: dict, path: Path) -> Path:
    """bench/train_throughput.py: tokens/s and MFU per model preset, one bar per ep size."""
    plt = _pyplot()
    rows = result["rows"]
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    eps = sorted({r["ep"] for r in rows})
    fig, (ax_tok, ax_mfu) = plt.subplots(1, 2, figsize=(11, 4.4))
    width = 0.8 / max(len(eps), 1)
    colours = [OURS, BASELINE, BASELINE_2, PUBLISHED]
    for e, ep in enumerate(eps):
        by_preset = {r["preset"]: r for r in rows if r["ep"] == ep}
        xs = [p - 0.4 + (e + 0.5) * width for p in range(len(presets))]
        for ax, key, scale in ((ax_tok, "tokens_per_s", 1.0), (ax_mfu, "mfu", 100.0)):
            values = [by_preset[p][key] * scale if p in by_preset else 0.0 for p in presets]
            bars = ax.bar(xs, values, width * 0.9, color=colours[e % len(colours)], label=f"ep={ep}",
                          edgecolor="black", linewidth=0.4)
            for bar, p in zip(bars, presets):
                if p in by_preset:
                    text = f"{by_preset[p][key] * scale:,.0f}" if key == "tokens_per_s" else f"{by_preset[p][key]:.1%}"
                    ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                                va="bottom", fontsize=8)
    for ax in (ax_tok, ax_mfu):
        ax.set_xticks(range(len(presets)), presets)
        ax.set_xlabel("model preset")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.legend(fontsize=8, title="expert parallel", title_fontsize=8)
        ax.margins(y=0.15)
    ax_tok.set_ylabel("training throughput (tokens/s, all ranks)")
    ax_tok.set_title("Tokens per second")
    ax_mfu.set_ylabel("MFU (% of measured dense matmul FLOP/s)")
    ax_mfu.set_title("Model FLOPs utilisation")
    fig.suptitle(f"Training throughput, {result['ranks']} {result['backend']} rank(s), {result['precision']}")
    fig.tight_layout()
    missing = [f"{p} ep={ep}" for p in presets for ep in eps if not any(r["preset"] == p and r["ep"] == ep for r in rows)]
    notes = [
        f"Peak for MFU: dense matmul measured on the same ranks, {_flops(result['matmul_flops_per_s'])} in all; "
        "model FLOPs = 6 x active params x positions, per side (see bench/train_throughput.py).",
    ]
    if result.get("skipped"):
        notes.append("Skipped: " + "; ".join(result["skipped"]) + ".")
    elif missing:
        notes.append("Not run: " + ", ".join(missing) + ".")
    _caption(fig, result, *notes)
    return _save(fig, path)


def alignment_figure(result: dict, path: Path) -> Path:
    """bench/alignment.py: reward of the generated sessions and Recall/NDCG@10 before alignment
    (round 0) and after each IPA round, on the same held-out users."""
    plt = _pyplot()
    alignment = result["alignment"]
    rows = [alignment["pretrain"], *alignment["rounds"]]
    rounds = list(range(len(rows)))
    accepted = [True] + [r.get("accepted", True) for r in alignment["rounds"]]
    exported = result.get("exported_round", alignment.get("exported_round"))
    fig, (ax_r, ax_q) = plt.subplots(1, 2, figsize=(11, 4.4))
    for key, marker, colour in (("reward_mean", "o", OURS), ("reward_max", "s", BASELINE)):
        ax_r.plot(rounds, [r[key] for r in rows], marker + "-", color=colour, label=key.replace("_", " "))
    n = alignment.get("eval_users") or rows[0].get("users")
    for key, marker, colour in (("recall@10", "o", OURS), ("ndcg@10", "s", BASELINE)):
        values = [r[key] for r in rows]
        if n:
            errors = [
                recall_standard_error(r["recall@10"], n) if key == "recall@10"
                else ndcg_standard_error_bound(r["ndcg@10"], r["recall@10"], 10, n)
                for r in rows
            ]
        else:
            errors = None
        ax_q.errorbar(rounds, values, yerr=errors, fmt=marker + "-", color=colour, capsize=3, label=_label(key))
    for ax in (ax_r, ax_q):
        for i, ok in enumerate(accepted):
            if not ok:
                ax.axvspan(i - 0.3, i + 0.3, color="crimson", alpha=0.08)
        if exported is not None:
            ax.axvline(exported, color="black", linestyle=":", linewidth=1, label=f"exported (round {exported})")
        ax.set_xticks(rounds, ["pretrained"] + [f"round {i}" for i in rounds[1:]])
        ax.set_xlabel("IPA round (round 0 = the pretrained model)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_r.set_ylabel("reward-model score per generated session")
    ax_r.set_title("Reward of generated sessions")
    ax_q.set_ylabel(f"score on {n} held-out ({alignment.get('eval_split', 'valid')}) users")
    ax_q.set_title("Recall@10 and NDCG@10 of the first generated item")
    fig.suptitle(f"Preference alignment (IPA) on {result['name']}")
    fig.tight_layout()
    rejected = [f"round {i}" for i, ok in enumerate(accepted) if not ok]
    _caption(
        fig, result,
        f"Sessions of {result.get('session_len', '?')} item(s), {alignment['config'].get('num_samples', '?')} sampled per "
        "user by constrained beam search and scored by the reward model (mean over users of the mean / max session "
        "reward).",
        (f"Shaded: {', '.join(rejected)} rejected (Recall@10 fell more than align.max_recall_drop). " if rejected else "")
        + f"Error bars: one standard error over the {n} users (Recall: sqrt(p(1-p)/n); NDCG: an upper bound from "
        "Recall and NDCG, no per-user values in the json).",
    )
    return _save(fig, path)


def reward_figure(result: dict, path: Path) -> Path:
    """bench/reward.py: the reward model's held-out AUC per binary signal beside the item-mean
    and popularity baselines; regression signals (RMSE) are listed in the caption."""
    plt = _pyplot()
    report = result["reward"]["heldout"]
    popularity = report.get("baseline_popularity", {})
    binary = [s for s, v in report["model"].items() if "auc" in v]
    regression = [s for s, v in report["model"].items() if "auc" not in v]
    series = [
        ("reward model", lambda s: report["model"][s]["auc"], OURS),
        ("item-mean baseline", lambda s: report["baseline_item_mean"][s]["auc"], BASELINE),
        ("popularity", lambda s: popularity[s]["auc"] if s in popularity else None, BASELINE_2),
    ]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(binary) + 3), 4.4))
    width = 0.8 / len(series)
    for i, (name, value, colour) in enumerate(series):
        xs, ys = [], []
        for x, s in enumerate(binary):
            v = value(s)
            if v is not None:
                xs.append(x - 0.4 + (i + 0.5) * width)
                ys.append(v)
        bars = ax.bar(xs, ys, width * 0.9, color=colour, label=name, edgecolor="black", linewidth=0.4)
        for bar, y in zip(bars, ys):
            ax.annotate(f"{y:.3f}", (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom", fontsize=8)
    ax.axhline(0.5, color="black", linestyle="--", linewidth=1, label="chance (0.5)")
    ax.set_xticks(range(len(binary)), binary)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("signal")
    ax.set_ylabel("held-out AUC (unitless)")
    ax.set_title(f"Session reward model on {result['name']}: held-out AUC per signal")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper right")
    sessions = result["reward"].get("sessions", {})
    notes = [
        f"{sessions.get('heldout', '?')} held-out sessions of {sessions.get('session_len', '?')} item(s) "
        f"(best epoch {result['reward'].get('best_epoch', '?')}). No error bars: the json holds no per-session scores."
    ]
    if regression:
        notes.append("Regression signals (RMSE, not plotted): " + "; ".join(
            f"{s}: model {report['model'][s]['rmse']:.4f}, item-mean {report['baseline_item_mean'][s]['rmse']:.4f}"
            for s in regression) + ".")
    _caption(fig, result, *notes)
    return _save(fig, path)


def prefix_recall_figure(result: dict, path: Path) -> Path:
    """bench/prefix_recall.py: Recall@K of the code prefix at each depth of the semantic ID."""
    plt = _pyplot()
    recall = result["recall"]
    n = result.get("users")
    fig, ax = plt.subplots(figsize=(7, 4.4))
    colours = [OURS, BASELINE, BASELINE_2, PUBLISHED]
    for i, (name, values) in enumerate(recall.items()):
        depths = list(range(1, len(values) + 1))
        errors = [recall_standard_error(v, n) for v in values] if n else None
        ax.errorbar(depths, values, yerr=errors, fmt="o-", color=colours[i % len(colours)], capsize=3, label=_label(name))
    levels = len(next(iter(recall.values())))
    ax.set_xticks(range(1, levels + 1), [f"{d}" + (" (item)" if d == levels else "") for d in range(1, levels + 1)])
    ax.set_xlabel("code depth d (first d codes of the semantic ID match)")
    ax.set_ylabel(f"share of {n or '?'} validation users")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Recall by code depth on {result.get('name', '?')} (validation, beam {result.get('beam_width', '?')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _caption(fig, result, "Depth L (every level, dedup included) is item Recall@K. Error bars: one standard error, "
             "sqrt(p(1-p)/n)." if n else "")
    return _save(fig, path)


def pretrain_data_memory_figure(result: dict, path: Path) -> Path:
    """bench/pretrain_data_memory.py: bytes of training data per interaction, dense prefixes
    (before) against the CSR examples gathered per batch (after), as the log grows."""
    plt = _pyplot()
    rows = result["rows"]
    sizes = [row["interactions"] for row in rows]
    fig, ax = plt.subplots(figsize=(7, 4.4))
    ax.plot(sizes, [row["before"]["host_bytes_per_interaction"] for row in rows], "o-", color=BASELINE,
            label="before: dense [prefixes, S] arrays (host)")
    ax.plot(sizes, [row["before"]["device_bytes_gpu_per_interaction"] for row in rows], "s--", color=BASELINE_2,
            label="before: the same copied to every device")
    ax.plot(sizes, [row["after"]["host_bytes_per_interaction"] for row in rows], "o-", color=OURS,
            label="after: CSR + permutation (host; one batch on the device)")
    ax.axhline(12, color="grey", linestyle=":", linewidth=1, label="target: 12 bytes per interaction")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("interactions in the log")
    ax.set_ylabel("bytes per interaction")
    ax.set_title(f"Pretraining data memory per rank (S={result.get('max_history')}, M={result.get('session_len')})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _caption(fig, result)
    return _save(fig, path)


def scale_figure(result: dict, path: Path) -> Path:
    """bench/scale.py: wall time and peak RSS of each stage process against the rows of the log,
    log-log, with a line of slope 1 (linear growth) through each stage's largest size."""
    plt = _pyplot()
    labels = {"data": "data", "tokenize": "tokenize (K ~ sqrt(items))", "pretrain": "pretrain (20 steps)",
              "tokenize_onerec": "tokenize, K = 8192"}
    styles = {"data": ("o-", OURS), "tokenize": ("s-", BASELINE), "pretrain": ("^-", BASELINE_2),
              "tokenize_onerec": ("D--", PUBLISHED)}
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.4))
    unfinished = []
    for name, label in labels.items():
        points = []
        for size in result["sizes"]:
            stage = size["stages"].get(name)
            if stage and stage["status"] == "ok":
                points.append((size["rows"], stage["wall_s"], stage["peak_rss_bytes"] / 2**30))
            elif stage:
                unfinished.append(f"{label} at {size['rows']:,} rows: {stage['status']}")
        if not points:
            continue
        marker, colour = styles[name]
        rows = [p[0] for p in points]
        for ax, column in ((ax_t, 1), (ax_m, 2)):
            ax.plot(rows, [p[column] for p in points], marker, color=colour, label=label)
            if len(points) > 1:  # slope 1 through the largest size, over the last decade before it
                span = [max(rows[0], rows[-1] / 10), rows[-1]]
                ax.plot(span, [points[-1][column] * r / rows[-1] for r in span], ":", color=colour, linewidth=1.2)
    from matplotlib.ticker import FuncFormatter

    for ax in (ax_t, ax_m):
        ax.set_xscale("log")
        ax.set_yscale("log")
        # plain numbers (0.5, 2, 40) rather than powers of ten: the y ranges span few decades
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "25" else ""))
        ax.set_xlabel("interactions in the log (rows)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    ax_t.set_ylabel("wall time of the stage process (s)")
    ax_t.set_title("Time per stage")
    ax_m.set_ylabel("peak RSS of the stage process (GiB)")
    ax_m.set_title("Peak host memory per stage")
    settings = result.get("settings", {})
    fig.suptitle(f"Growth with the log: {settings.get('rows_per_user', '?')} rows per user and "
                 f"{settings.get('rows_per_item', '?')} per item, Zipf s = {settings.get('zipf', '?')}")
    fig.tight_layout()
    _caption(fig, result, "Dotted: linear growth (slope 1) through each stage's largest size, over the decade "
             "below it. Wall time includes process start-up and imports; peak RSS is the process's ru_maxrss.",
             ("Did not finish: " + "; ".join(unfinished) + ".") if unfinished else "")
    return _save(fig, path)


def kmeans_scale_figure(result: dict, path: Path) -> Path:
    """bench/kmeans_scale.py: wall time and peak RSS of residual k-means against the number of
    items, one line per (levels x codebook, mode)."""
    plt = _pyplot()
    fig, (ax_time, ax_rss) = plt.subplots(1, 2, figsize=(11.5, 4.6))
    series: dict[str, list[dict]] = {}
    for row in result["results"]:
        series.setdefault(f"{row['levels']} x {row['k']}, {row['mode']}, iters {row['iters']}", []).append(row)
    for i, (name, rows) in enumerate(sorted(series.items())):
        rows = sorted(rows, key=lambda r: r["n"])
        n = [r["n"] for r in rows]
        style = {"color": plt.cm.tab10(i % 10), "marker": "os^Dv"[i % 5], "label": name}
        ax_time.plot(n, [r["total_s"] / 60 for r in rows], "-", **style)
        ax_rss.plot(n, [r["peak_rss_mb"] / 1024 for r in rows], "-", **style)
    for ax, label in ((ax_time, "wall time (min)"), (ax_rss, "peak RSS (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("items N")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    ax_time.legend(fontsize=7)
    fig.suptitle("Balanced residual k-means at scale (chunked assignment, sampled seeding)")
    first = result["results"][0] if result["results"] else {}
    _caption(fig, {"device": first.get("processor"), "date": str(first.get("date", ""))[:10],
                   "command": first.get("command")})
    return _save(fig, path)


def ipa_sampling_figure(result: dict, path: Path) -> Path:
    """bench/ipa_sampling.py: sessions/s of one IPA round's sampling (beam search, reward, pair,
    reference log-probs, gather), one bar per number of ranks and expert-parallel size."""
    plt = _pyplot()
    rows = result["rows"]
    base = next((r for r in rows if r["ranks"] == 1), rows[0])["sessions_per_s"]
    labels = [f"{r['ranks']} rank{'s' if r['ranks'] > 1 else ''}" + (f"\nep={r['ep']}" if r["ep"] > 1 else "")
              for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(rows) + 1.5), 4.2))
    bars = ax.bar(range(len(rows)), [r["sessions_per_s"] for r in rows], color=OURS)
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['sessions_per_s']:,.0f}/s\n{r['sessions_per_s'] / base:.2f}x", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("generated sessions per second (all ranks)")
    ax.set_ylim(0, max(r["sessions_per_s"] for r in rows) * 1.25)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"IPA sampling: {result['users']} users x {result['num_samples']} sessions")
    fig.tight_layout()
    _caption(fig, result, result.get("model", ""), "Speed-up against 1 rank. " + result.get("note", ""))
    return _save(fig, path)


def inference_figure(result: dict, path: Path) -> Path:
    """bench/inference.py: requests/s per system at each batch and beam (log scale), one panel
    per catalogue, with the ratio over transformers' T5 above each of our bars."""
    plt = _pyplot()
    catalogues = result["catalogues"]
    names = {"ours": "ours (KV cache)", "ours_nocache": "ours, no cache", "t5": "transformers T5"}
    colors = {"ours": OURS, "ours_nocache": "#9ecae1", "t5": "#bdbdbd"}
    fig, axes = plt.subplots(1, len(catalogues), figsize=(6.2 * len(catalogues), 4.4), squeeze=False)
    for ax, (name, catalogue) in zip(axes[0], catalogues.items()):
        cells = catalogue["cells"]
        settings = sorted({(c["batch"], c["beam"]) for c in cells})
        systems = [s for s in names if any(c["system"] == s for c in cells)]
        width = 0.8 / len(systems)
        for i, system in enumerate(systems):
            by_setting = {(c["batch"], c["beam"]): c for c in cells if c["system"] == system}
            xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(settings))]
            values = [by_setting[s]["requests_per_s"] if s in by_setting else 0.0 for s in settings]
            bars = ax.bar(xs, values, width, label=names[system], color=colors[system])
            for bar, setting in zip(bars, settings):
                t5 = next((c for c in cells if c["system"] == "t5" and (c["batch"], c["beam"]) == setting), None)
                if system != "t5" and t5 and setting in by_setting:
                    ratio = by_setting[setting]["requests_per_s"] / t5["requests_per_s"]
                    ax.annotate(f"{ratio:.1f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(range(len(settings)), [f"batch {b}\nbeam {w}" for b, w in settings])
        ax.set_ylabel("requests per second (top-10 each)")
        ax.set_title(f"{name}: {catalogue['items']:,} items")
        ax.grid(axis="y", alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    split = result.get("test_split") or {}
    notes = [f"Above our bars: requests/s over T5's. Torch threads: {result.get('threads')}."]
    if split.get("ours"):
        notes.append(f"Beauty's test split ({split['users']:,} users, beam {split['beam']}) decoded in "
                     f"{split['ours']['seconds']:.1f} s with the KV cache"
                     + (f", {split['ours_nocache']['seconds']:.1f} s without." if split.get("ours_nocache") else "."))
    _caption(fig, result, *notes)
    return _save(fig, path)


FIGURES = {
    "quality": quality_figure,
    "kernels": kernels_figure,
    "train_throughput": train_throughput_figure,
    "alignment": alignment_figure,
    "reward": reward_figure,
    "prefix_recall": prefix_recall_figure,
    "pretrain_data_memory": pretrain_data_memory_figure,
    "kmeans_scale": kmeans_scale_figure,
    "scale": scale_figure,
    "ipa_sampling": ipa_sampling_figure,
    "inference": inference_figure,
}


def figure_kind(stem: str) -> str:
    """The bench a result file came from, by its name: quality_beauty -> quality."""
    for kind in sorted(FIGURES, key=len, reverse=True):  # longest first: no prefix of another wins
        if stem == kind or stem.startswith(kind + "_"):
            return kind
    raise ValueError(f"{stem}: no figure for this result file (known: {', '.join(sorted(FIGURES))})")


def save_figure(result: dict, json_path: Path) -> Path | None:
    """Draw <json_path without .json>.png from `result`; what the bench scripts call after
    writing their json. Without matplotlib it says so and returns None: the json is the result,
    and `python bench/figures.py <json>` redraws the figure later."""
    json_path = Path(json_path)
    png = json_path.with_suffix(".png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"figure skipped: matplotlib is not installed; later: python bench/figures.py {json_path}", file=sys.stderr)
        return None
    return FIGURES[figure_kind(json_path.stem)](result, png)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="result json(s), e.g. bench/results/kernels_cpu.json")
    parser.add_argument("--out", type=Path, help="PNG path (one input only); default: beside the json")
    args = parser.parse_args(argv)
    if args.out and len(args.results) > 1:
        parser.error("--out takes a single result file")
    written = []
    for json_path in args.results:
        result = json.loads(json_path.read_text(encoding="utf-8"))
        png = args.out or json_path.with_suffix(".png")
        written.append(FIGURES[figure_kind(json_path.stem)](result, png))
        print(written[-1])
    return written


if __name__ == "__main__":
    main()
