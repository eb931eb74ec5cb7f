"""Top-K items for histories of raw item ids, from a model export: the library behind
`onerec recommend` and `onerec serve`.

A `Recommender` loads the export once and keeps what every call needs: the model on its
device, the raw item id -> item index dict and the code table. A call first checks every
request (nothing runs when one is bad, and the error names the request and the field), then
runs them through `constrained_beam_search`, `batch_size` requests per search.

    recommender = Recommender.from_pretrained("runs/demo/dpo/export")
    recommender.recommend([["50", "172"], ["133"]], k=5)   # one ranked list per history

What a request means:

- History: raw item ids of the training data, oldest first (ints are read as their decimal
  string). The model reads the last `data.max_history`, right-aligned as in training. An
  empty history is valid: the encoder then attends to its start token only (plus the user
  token when the model has one), so the answer is the model's list for a user it knows
  nothing about, the same for everyone when the model has no user token.
- User id (optional): read only by a model trained with `model.user_buckets > 0`, and
  ignored otherwise. An int is the user's `user_index` in the training data (`<out>/data`),
  as in training; a string is hashed with CRC-32 of its UTF-8 bytes (stable across processes
  and machines, unlike Python's `hash`). Either is taken modulo `user_buckets`; a request
  without one reads bucket 0.
- exclude_history (default: the export's `eval.exclude_history`): leave out every item of
  the given history, not only the last `max_history` the model reads.

The order is the beams' log-probability; with the export's `eval.item_score_weight` > 0 the
beams are reranked by the item head as in evaluation, and the score is that combined score.

A request's answer does not depend on the other requests of its call: every history is
padded to `max_history`, and requests that differ in beam width or exclude_history run in
separate searches.
"""

from __future__ import annotations

import numbers
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from onerec.export import ExportedModel
from onerec.inference.beam_search import (
    BeamSearchOutput,
    check_item_scores,
    constrained_beam_search,
    model_device,
)
from onerec.model.onerec import lookup_codes

DEFAULT_BATCH_SIZE = 64
# The longest history a served request may carry by default, in multiples of the model's
# max_history (`--max-history-items` of `onerec recommend --input` and `onerec serve`).
HISTORY_LIMIT_FACTOR = 10
# Unknown item ids listed in one error message; the rest are counted.
SHOWN_UNKNOWN = 5


@dataclass(frozen=True)
class Recommendation:
    rank: int  # 1-based
    item_id: str  # the raw item id of the training data
    title: str
    # log-probability of the item's code tuple under the model (+ eval.item_score_weight x the
    # item head's log-probability of the item, when the export sets it)
    score: float

    def to_dict(self) -> dict:
        """The wire form (`onerec recommend --input`, `onerec serve`)."""
        return {"item_id": self.item_id, "score": self.score, "title": self.title}


@dataclass(frozen=True)
class Request:
    """One checked request, ready to search: the item indices of its whole history (oldest
    first), its user bucket (None: no user token), and its search settings."""

    items: tuple[int, ...]
    user: Optional[int]
    k: int
    beam_width: int
    exclude_history: bool


def is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON true would otherwise pass as 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def user_bucket(user_id: Any, buckets: int, where: str = "request 0") -> Optional[int]:
    """The user-token bucket for `user_id` (see the module docstring); None without a user id
    or when the model has no user token (buckets == 0)."""
    if user_id is None:
        return None
    if not (is_int(user_id) or isinstance(user_id, str)):
        raise TypeError(f"{where}: user_id: {user_id!r} is a {type(user_id).__name__}: expected an int or a string")
    if buckets == 0:
        return None
    value = int(user_id) if is_int(user_id) else zlib.crc32(user_id.encode("utf-8"))
    return value % buckets


def history_limit(requested: Optional[int], max_history: int) -> Optional[int]:
    """The max_history_items for a `--max-history-items` value: None (not given) is
    HISTORY_LIMIT_FACTOR x max_history, 0 is no limit."""
    if requested is None:
        return HISTORY_LIMIT_FACTOR * max_history
    return None if requested == 0 else requested


def _positive_int(value: Any, field: str) -> int:
    if not is_int(value):
        raise TypeError(f"{field}: {value!r} is a {type(value).__name__}: expected an integer >= 1")
    if value < 1:
        raise ValueError(f"{field}={value}: expected an integer >= 1")
    return int(value)


class Recommender:
    """A model export loaded once, answering any number of `recommend` calls.

    beam_width: beams per request when a call gives none (None: the export's
    `eval.beam_width`, raised to k when k is larger). batch_size: requests per beam search.
    max_history_items: the longest history a request may carry (None: no limit); items
    beyond the model's `max_history` are not read, but they are excluded with
    exclude_history, so a limit bounds the memory a request can ask for.

    Calls are serialised by a lock: one search at a time per Recommender.
    """

    def __init__(
        self,
        exported: ExportedModel,
        beam_width: Optional[int] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_history_items: Optional[int] = None,
        source: str = "",
    ) -> None:
        self.exported = exported
        self.beam_width = None if beam_width is None else _positive_int(beam_width, "beam_width")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.max_history_items = None if max_history_items is None else _positive_int(
            max_history_items, "max_history_items"
        )
        self.source = source  # where the export was loaded from (for /health and messages)
        cfg = exported.cfg
        self.max_history = cfg.data.max_history
        self.user_buckets = cfg.model.user_buckets
        self.exclude_history = cfg.eval.exclude_history
        self.item_score_weight = cfg.eval.item_score_weight
        check_item_scores(exported.model, self.item_score_weight)  # at load, not at the first request
        self.device = model_device(exported.model, torch.device("cpu"))
        self._index_of = {raw: index for index, raw in enumerate(exported.raw_ids)}
        self._codes_NL = exported.semantic_ids.codes.to(self.device)
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        export_dir: str | Path,
        device: str = "auto",
        beam_width: Optional[int] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_history_items: Optional[int] = None,
        device_setting: str = "device",
    ) -> "Recommender":
        """Load and verify the export at `export_dir` (onerec.export.load_export) on `device`
        ("auto": the GPU when there is one); device_setting names the option in errors."""
        from onerec.device import resolve_device
        from onerec.export import load_export

        exported = load_export(Path(export_dir), resolve_device(device, setting=device_setting))
        return cls(exported, beam_width, batch_size, max_history_items, source=str(export_dir))

    @property
    def num_items(self) -> int:
        return len(self.exported.raw_ids)

    @property
    def uses_user_ids(self) -> bool:
        return self.user_buckets > 0

    def default_beam_width(self, k: int) -> int:
        return self.beam_width if self.beam_width is not None else max(self.exported.cfg.eval.beam_width, k)

    # ------------------------------------------------------------------ checking requests
    def prepare(
        self,
        history: Any,
        user_id: Any = None,
        k: Any = 10,
        exclude_history: Any = None,
        beam_width: Any = None,
        where: str = "request 0",
    ) -> Request:
        """A checked Request; ValueError or TypeError naming `where` and the field otherwise
        (an unknown item id, a bad type, k < 1, a beam width below k, a history over
        max_history_items)."""
        items = self._item_indices(history, where)
        user = user_bucket(user_id, self.user_buckets, where)
        k = _positive_int(k, f"{where}: k")
        if beam_width is None:
            beam_width = self.default_beam_width(k)
        beam_width = _positive_int(beam_width, f"{where}: beam_width")
        if beam_width < k:
            raise ValueError(
                f"{where}: k={k} is above the beam width {beam_width}: each of the top k items is one beam"
            )
        if exclude_history is None:
            exclude_history = self.exclude_history
        if not isinstance(exclude_history, bool):
            raise TypeError(f"{where}: exclude_history: {exclude_history!r} is not a bool")
        return Request(items, user, k, beam_width, exclude_history)

    def _item_indices(self, history: Any, where: str) -> tuple[int, ...]:
        if isinstance(history, (str, bytes)) or not isinstance(history, Iterable) or isinstance(history, dict):
            raise TypeError(
                f"{where}: history: {history!r} is a {type(history).__name__}: expected a list of item ids"
                + (" (one history per request: pass a list of histories)" if isinstance(history, str) else "")
            )
        raws = []
        for position, raw in enumerate(history):
            if is_int(raw):
                raw = str(int(raw))
            elif not isinstance(raw, str):
                raise TypeError(
                    f"{where}: history[{position}]: {raw!r} is a {type(raw).__name__}: item ids are strings "
                    "(or ints, read as their decimal string)"
                )
            raws.append(raw)
        if self.max_history_items is not None and len(raws) > self.max_history_items:
            raise ValueError(
                f"{where}: history: {len(raws)} items, above the limit of {self.max_history_items} per request "
                f"(max_history_items; the model reads only the last {self.max_history}): send the most recent items"
            )
        unknown = [(position, raw) for position, raw in enumerate(raws) if raw not in self._index_of]
        if unknown:
            shown = ", ".join(f"{raw!r} (position {position})" for position, raw in unknown[:SHOWN_UNKNOWN])
            more = f" and {len(unknown) - SHOWN_UNKNOWN} more" if len(unknown) > SHOWN_UNKNOWN else ""
            raise ValueError(
                f"{where}: history: unknown item id(s) {shown}{more}: ids are the raw item ids of the training data"
            )
        return tuple(self._index_of[raw] for raw in raws)

    # ------------------------------------------------------------------ answering
    def recommend(
        self,
        histories: Sequence[Any],
        k: int = 10,
        user_ids: Optional[Sequence[Any]] = None,
        exclude_history: Optional[bool] = None,
        beam_width: Optional[int] = None,
    ) -> list[list[Recommendation]]:
        """One ranked list of at most k Recommendations per history (fewer only when the
        catalogue, less the excluded items, is smaller), best first. Every request is checked
        before any search runs; see `prepare` for the errors."""
        if isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence):
            raise TypeError(f"histories: {histories!r} is a {type(histories).__name__}: expected a list of histories")
        k = _positive_int(k, "k")
        width = self.beam_width if beam_width is None else _positive_int(beam_width, "beam_width")
        if width is not None and width < k:
            raise ValueError(f"beam_width={width} is below k={k}: each of the top k items is one beam")
        if exclude_history is not None and not isinstance(exclude_history, bool):
            raise TypeError(f"exclude_history: {exclude_history!r} is not a bool")
        if user_ids is None:
            user_ids = [None] * len(histories)
        elif isinstance(user_ids, (str, bytes)) or not isinstance(user_ids, Sequence):
            raise TypeError(f"user_ids: {user_ids!r} is a {type(user_ids).__name__}: expected a list, one per history")
        elif len(user_ids) != len(histories):
            raise ValueError(f"user_ids has {len(user_ids)} entries for {len(histories)} histories: expected one each")
        requests = [
            self.prepare(history, user, k, exclude_history, beam_width, where=f"request {index}")
            for index, (history, user) in enumerate(zip(histories, user_ids))
        ]
        return self.run(requests)

    def run(self, requests: Sequence[Request]) -> list[list[Recommendation]]:
        """Answers for checked requests, in their order: one search per `batch_size` requests
        that share a beam width and exclude_history."""
        answers: list[Optional[list[Recommendation]]] = [None] * len(requests)
        groups: dict[tuple[int, bool], list[int]] = {}
        for position, request in enumerate(requests):
            groups.setdefault((request.beam_width, request.exclude_history), []).append(position)
        for (beam_width, exclude), positions in groups.items():
            for start in range(0, len(positions), self.batch_size):
                chunk = positions[start : start + self.batch_size]
                output = self._search([requests[p] for p in chunk], beam_width, exclude)
                items, scores = output.items_BW.tolist(), output.scores_BW.tolist()
                for row, position in enumerate(chunk):
                    answers[position] = self._ranked(items[row], scores[row], requests[position].k)
        return answers  # type: ignore[return-value]  # every position is filled above

    def _search(self, chunk: list[Request], beam_width: int, exclude: bool) -> BeamSearchOutput:
        """One beam search over `chunk`: histories cut to the last max_history items and
        right-aligned, -1 padding; the excluded items padded with -1 to the longest history."""
        S = self.max_history
        rows = [list(request.items[-S:]) for request in chunk]
        history_BS = torch.tensor([[-1] * (S - len(row)) + row for row in rows], dtype=torch.long)
        excluded_BX = None
        if exclude and any(request.items for request in chunk):
            width = max(len(request.items) for request in chunk)
            excluded_BX = torch.tensor(
                [list(request.items) + [-1] * (width - len(request.items)) for request in chunk], dtype=torch.long
            )
        user_B = None
        if self.user_buckets > 0:
            user_B = torch.tensor([0 if request.user is None else request.user for request in chunk])
        settings = f"the batch size ({self.batch_size}) or the beam width ({beam_width})"
        with self._lock, torch.inference_mode():
            history_BS = history_BS.to(self.device)
            return constrained_beam_search(
                self.exported.model,
                lookup_codes(history_BS, self._codes_NL),
                self.exported.trie,
                beam_width,
                user_B=user_B,
                history_items_BS=history_BS,
                exclude_items_BX=excluded_BX,
                settings=settings,
                item_score_weight=self.item_score_weight,
            )

    def _ranked(self, items: list[int], scores: list[float], k: int) -> list[Recommendation]:
        results = []
        for item, score in zip(items, scores):
            if item < 0 or len(results) == k:  # dead beams sort last
                break
            results.append(
                Recommendation(len(results) + 1, self.exported.raw_ids[item], self.exported.titles[item], float(score))
            )
        return results


def recommend(
    exported: ExportedModel,
    raw_history: list[str],
    top_k: int,
    beam_width: int,
    user: Any = None,
    exclude_history: Optional[bool] = None,
) -> list[Recommendation]:
    """Top-K for one history of an already loaded export (the one-call form; a Recommender
    keeps its lookup tables across calls). exclude_history (default: the export's
    eval.exclude_history) leaves out every item of the given history."""
    recommender = Recommender(exported)
    request = recommender.prepare(raw_history, user, top_k, exclude_history, beam_width, where="request")
    return recommender.run([request])[0]
