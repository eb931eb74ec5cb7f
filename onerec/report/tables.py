"""The report's tables as (columns, rows) of plain values: the same rows feed the HTML page
and `RunLogger.log_table` (a wandb.Table), so the two never disagree."""

from __future__ import annotations

from typing import Any

from onerec.report.run_files import CodebookUsage

Table = tuple[list[str], list[list[Any]]]

def metrics_table(metrics: dict) -> Table:
    """metrics.json as rows of (split, model, metric values...): the evaluated model, the
    pretrained model before IPA when alignment ran, then every baseline."""
    splits = [s for s in ("valid", "test") if isinstance(metrics.get(s), dict)]
    names: list[str] = []
    for split in splits:
        names += [k for k in metrics[split] if k not in names]
    rows = []
    for split in splits:
        candidates = [(_model_label(metrics), metrics[split])]
        if isinstance(metrics.get("pretrain_model"), dict) and split in metrics["pretrain_model"]:
            candidates.append(("OneRec (before IPA)", metrics["pretrain_model"][split]))
        for baseline, values in (metrics.get("baselines") or {}).items():
            if isinstance(values, dict) and isinstance(values.get(split), dict):
                candidates.append((f"{baseline} baseline", values[split]))
        for label, values in candidates:
            rows.append([split, label, *[values.get(name) for name in names]])
    return ["split", "model", *names], rows


def codebook_table(usage: CodebookUsage) -> Table:
    columns = ["level", "codebook size", "codes used", "used fraction", "perplexity", "entropy (bits)",
               "most items on one code", "balanced items per code"]
    rows = [
        [level.level, level.codebook_size, int((level.items_per_code > 0).sum()), level.used_fraction,
         level.perplexity, level.entropy_bits, int(level.items_per_code.max()), usage.num_items / level.codebook_size]
        for level in usage.levels
    ]
    return columns, rows


def alignment_table(alignment: dict) -> Table:
    """One row per evaluation: before IPA, then each round with its training statistics."""
    points = [("before IPA", alignment["pretrain"], "pretrained")]
    for i, values in enumerate(alignment["rounds"], start=1):
        accepted = values.get("accepted")
        status = "?" if accepted is None else ("accepted" if accepted else "rejected")
        points.append((f"round {i}", values, status))
    exported = alignment.get("exported_round")
    metric_names = [k for k in alignment["pretrain"] if k.startswith(("recall@", "ndcg@"))]
    train_names = ["pairs", "chosen_reward", "rejected_reward", "preference_accuracy", "dpo_loss", "ntp_loss"]
    columns = ["round", "status", "reward mean", "reward max", *metric_names,
               *[f"train {n.replace('_', ' ')}" for n in train_names]]
    rows = []
    for index, (label, values, status) in enumerate(points):
        if index == exported:
            status += ", exported"
        train = values.get("train") or {}
        rows.append([label, status, values.get("reward_mean"), values.get("reward_max"),
                     *[values.get(n) for n in metric_names], *[train.get(n) for n in train_names]])
    return columns, rows


def _model_label(metrics: dict) -> str:
    """What the evaluate stage scored: the pretrained export, or the IPA export (which is the
    pretrained model again when no round was accepted)."""
    model = metrics.get("model", "")
    if model == "pretrain/export":
        return "OneRec (pretrained)"
    if model == "dpo/export":
        exported = (metrics.get("alignment") or {}).get("exported_round")
        if exported == 0:
            return "OneRec (after IPA: no round accepted)"
        return f"OneRec (after IPA, round {exported})" if isinstance(exported, int) else "OneRec (after IPA)"
    return f"OneRec ({model})" if model else "OneRec"
