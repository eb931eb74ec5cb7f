"""Top-K items for a history of raw item ids, from a model export (the library behind `onerec recommend`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onerec.export import ExportedModel
from onerec.inference.beam_search import constrained_beam_search
from onerec.model.onerec import lookup_codes


@dataclass
class Recommendation:
    rank: int
    raw_id: str
    title: str
    score: float


def history_to_indices(exported: ExportedModel, raw_history: list[str]) -> list[int]:
    index_of = {raw: i for i, raw in enumerate(exported.raw_ids)}
    unknown = [raw for raw in raw_history if raw not in index_of]
    if unknown:
        raise ValueError(
            f"unknown item id(s) in --history: {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''} (ids are the raw ids of the training data)"
        )
    return [index_of[raw] for raw in raw_history]


def recommend(
    exported: ExportedModel,
    raw_history: list[str],
    top_k: int,
    beam_width: int,
    user: int | None = None,
    exclude_history: bool | None = None,
) -> list[Recommendation]:
    """exclude_history (default: the export's eval.exclude_history) leaves out every item of
    the given history, not only the most recent max_history the model reads."""
    if beam_width < top_k:
        raise ValueError(f"beam width {beam_width} must be >= top-k {top_k}")
    max_history = exported.cfg.data.max_history
    all_indices = history_to_indices(exported, raw_history)
    indices = all_indices[-max_history:]
    model_device = next(exported.model.parameters()).device
    history_1S = torch.full((1, max_history), -1, dtype=torch.long)
    if indices:
        history_1S[0, -len(indices):] = torch.tensor(indices)
    codes_NL = exported.semantic_ids.codes.to(model_device)
    history_codes = lookup_codes(history_1S.to(model_device), codes_NL)
    user_B = None
    if exported.cfg.model.user_buckets > 0:
        user_B = torch.tensor([user if user is not None else 0], device=model_device)
    if exclude_history is None:
        exclude_history = exported.cfg.eval.exclude_history
    excluded = torch.tensor([all_indices], device=model_device) if exclude_history and all_indices else None
    output = constrained_beam_search(
        exported.model,
        history_codes,
        exported.trie,
        beam_width,
        user_B=user_B,
        history_items_BS=history_1S.to(model_device),
        exclude_items_BX=excluded,
    )
    results = []
    for rank, (item, score) in enumerate(zip(output.items_BW[0].tolist(), output.scores_BW[0].tolist())):
        if item < 0 or len(results) == top_k:
            break
        results.append(Recommendation(rank + 1, exported.raw_ids[item], exported.titles[item], score))
    return results
