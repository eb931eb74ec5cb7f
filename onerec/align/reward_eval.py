"""How good is a session reward model: AUC per binary signal, RMSE per regression signal,
beside the simple baseline every reward model must beat (each item's mean signal).

Shape legend: R sessions, M session items, K signals, N items.
"""

from __future__ import annotations

import numpy as np


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties averaged); NaN when one class is absent."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # average 1-based rank of each distinct score
    upper = np.cumsum(counts)
    average_rank = upper - (counts - 1) / 2.0
    rank_sum = average_rank[inverse][labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def concordance(scores: np.ndarray, labels: np.ndarray) -> float:
    """Share of session pairs with different labels that the scores order the same way (ties
    count half): Harrell's C. With 0/1 labels it is exactly the ROC AUC; with session rates
    (0, 1/M, ..., 1) it is the AUC generalised to graded labels. NaN when all labels agree."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    levels = np.unique(labels)
    concordant, pairs = 0.0, 0.0
    for level in levels[1:]:  # pairs (label == level) vs (label < level), each pair counted once
        subset = labels <= level
        positive = labels[subset] == level
        weight = positive.sum() * (~positive).sum()
        concordant += roc_auc(scores[subset], positive) * weight
        pairs += weight
    return float(concordant / pairs) if pairs else float("nan")


def item_mean_signal(
    items_RM: np.ndarray, item_values_RMK: np.ndarray, num_items: int, prior: float = 10.0
) -> np.ndarray:
    """[N, K] each item's mean signal over the given sessions, shrunk towards the global mean
    by `prior` pseudo-observations (an item seen once is not trusted fully)."""
    real = items_RM >= 0
    items = items_RM[real]
    values_xK = item_values_RMK[real].astype(np.float64)
    K = values_xK.shape[1]
    global_K = values_xK.mean(axis=0)
    counts_N = np.bincount(items, minlength=num_items).astype(np.float64)
    sums_NK = np.stack([np.bincount(items, weights=values_xK[:, k], minlength=num_items) for k in range(K)], axis=1)
    return ((sums_NK + prior * global_K) / (counts_N[:, None] + prior)).astype(np.float32)


def baseline_predictions(items_RM: np.ndarray, item_mean_NK: np.ndarray) -> np.ndarray:
    """[R, K] the session's prediction: mean over its items of their mean signal."""
    real_RM = items_RM >= 0
    values_RMK = item_mean_NK[items_RM.clip(min=0)] * real_RM[..., None]
    return values_RMK.sum(axis=1) / real_RM.sum(axis=1, keepdims=True).clip(min=1)


def signal_report(
    predictions_RK: np.ndarray, labels_RK: np.ndarray, any_event_RK: np.ndarray, kinds: list[str], names: list[str]
) -> dict[str, dict[str, float]]:
    """Per signal, against the session label: RMSE and Pearson r (both kinds); for binary signals
    also the AUC (concordance with the session's event rate) and the AUC of telling sessions
    with at least one event from sessions with none."""
    report = {}
    for k, (name, kind) in enumerate(zip(names, kinds)):
        pred, label = predictions_RK[:, k].astype(np.float64), labels_RK[:, k].astype(np.float64)
        entry = {"rmse": float(np.sqrt(np.mean((pred - label) ** 2)))}
        entry["pearson"] = float(np.corrcoef(pred, label)[0, 1]) if pred.std() > 0 and label.std() > 0 else float("nan")
        if kind == "binary":
            entry["auc"] = concordance(pred, label)
            entry["auc_any_event"] = roc_auc(pred, any_event_RK[:, k])
            entry["event_rate"] = float(label.mean())
        report[name] = entry
    return report


def popularity_report(sessions, item_counts_N: np.ndarray, kinds: list[str], names: list[str]) -> dict[str, dict[str, float]]:
    """Per binary signal, the AUC of scoring each session by its items' mean log training count."""
    log_counts_N1 = np.log1p(np.asarray(item_counts_N, dtype=np.float64))[:, None]
    scores_R = baseline_predictions(sessions.items, log_counts_N1)[:, 0]
    return {
        name: {"auc": concordance(scores_R, sessions.labels[:, k])}
        for k, (name, kind) in enumerate(zip(names, kinds))
        if kind == "binary"
    }
