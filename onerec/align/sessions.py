"""Logged sessions with feedback labels: what the session reward model learns from.

Shape legend: R sessions, M session items (data.session_len), S history length, K signals.

A session is up to M consecutive logged interactions of one user (in time order); with
reward.session_gap > 0 a pause longer than the gap also ends it. Only rows with
`logged > 0` count when the data has that column (KuaiRand: impressions, not the earlier
watch history whose signals were not recorded). The session's history is the user's
sequence (the items the generator reads: all interactions, or the clicked ones when the
data has a sequence_column) strictly before the session's first interaction.

Labels per signal:
    binary:      y = share of the session's items with value > threshold   (a rate in [0, 1])
                 any = 1 if at least one item has it                        (for AUC)
    regression:  y = mean value over the session's items

Implicit data (no feedback columns, e.g. Amazon reviews): a signal reading the column
`consumed` sees 1 for every logged interaction, and `with_popularity_negatives` adds, for
each real session, sessions of items the user did not consume, drawn the way a popularity
recommender would show them, labelled 0: the reward model then learns to tell what a user
consumes next from what was merely popular.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onerec.config import SignalConfig
from onerec.data.splits import UserSequences, gather_examples

CONSUMED_COLUMN = "consumed"  # the implicit signal: 1 for every logged interaction


@dataclass
class LoggedSessions:
    user: np.ndarray  # [R] int64
    history: np.ndarray  # [R, S] int64, right-aligned, -1 padding
    items: np.ndarray  # [R, M] int64, -1 padding at the end
    labels: np.ndarray  # [R, K] float32 (rates for binary signals, means for regression ones)
    any_event: np.ndarray  # [R, K] bool (binary signals; False for regression ones)
    item_values: np.ndarray  # [R, M, K] float32 per-item label values (NaN at padding)

    def __len__(self) -> int:
        return len(self.user)

    def subset(self, rows: np.ndarray) -> "LoggedSessions":
        return LoggedSessions(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))


def item_signal_values(columns: dict[str, np.ndarray], signals: list[SignalConfig]) -> np.ndarray:
    """[rows, K] float32: binary signals as 0/1 (value > threshold), regression ones as the value."""
    out = []
    for signal in signals:
        if signal.column not in columns:
            raise ValueError(
                f"reward.signals: {signal.name!r} reads column {signal.column!r}, which the data does not have; "
                f"feedback columns: {sorted(columns)}"
            )
        values = np.asarray(columns[signal.column], dtype=np.float64)
        out.append((values > signal.threshold).astype(np.float32) if signal.kind == "binary" else values.astype(np.float32))
    return np.stack(out, axis=1)


def build_sessions(
    user: np.ndarray,
    item: np.ndarray,
    order: np.ndarray,
    values_K: np.ndarray,
    logged: np.ndarray | None,
    sequences: UserSequences,
    signals: list[SignalConfig],
    session_len: int,
    session_gap: float,
    max_history: int,
) -> LoggedSessions:
    """Cut the interaction log (sorted by user, then order) into labelled sessions."""
    keep = np.ones(len(user), dtype=bool) if logged is None else logged > 0
    # a regression signal with no value (NaN) cannot label a session
    keep &= np.isfinite(values_K).all(axis=1)
    user, item, order, values_K = user[keep], item[keep], order[keep], values_K[keep]
    if len(user) == 0:
        raise ValueError("no logged interactions with every reward signal present: nothing to train the reward model on")

    new_run = np.ones(len(user), dtype=bool)
    new_run[1:] = user[1:] != user[:-1]
    if session_gap > 0:
        new_run[1:] |= (order[1:] - order[:-1]) > session_gap
    run_start = np.maximum.accumulate(np.where(new_run, np.arange(len(user)), 0))
    position = np.arange(len(user)) - run_start
    new_session = new_run | (position % session_len == 0)
    session_of_row = np.cumsum(new_session) - 1
    R = int(session_of_row[-1]) + 1
    slot = position % session_len

    items_RM = np.full((R, session_len), -1, dtype=np.int64)
    items_RM[session_of_row, slot] = item
    K = values_K.shape[1]
    item_values = np.full((R, session_len, K), np.nan, dtype=np.float32)
    item_values[session_of_row, slot] = values_K
    counts_R = np.bincount(session_of_row, minlength=R).astype(np.float64)
    labels = np.stack(
        [np.bincount(session_of_row, weights=values_K[:, k], minlength=R) / counts_R for k in range(K)], axis=1
    ).astype(np.float32)
    binary = np.asarray([s.kind == "binary" for s in signals])
    any_event = (np.nan_to_num(item_values, nan=0.0) > 0).any(axis=1) & binary[None, :]

    first_row = np.flatnonzero(new_session)
    session_user, session_start = user[first_row], order[first_row]
    # history length = how many of the user's sequence items come strictly before the start
    seq_user = np.repeat(np.arange(len(sequences)), sequences.lengths())
    ranks = np.unique(np.concatenate([sequences.orders, session_start]), return_inverse=True)[1]
    scale = ranks.max() + 1
    seq_key = seq_user * scale + ranks[: len(sequences.orders)]
    start_key = session_user * scale + ranks[len(sequences.orders):]
    before = np.searchsorted(seq_key, start_key, side="left") - sequences.offsets[session_user]
    history = gather_examples(sequences, session_user, before, before, max_history, 1).history
    return LoggedSessions(session_user.astype(np.int64), history, items_RM, labels, any_event, item_values)


def with_popularity_negatives(
    sessions: LoggedSessions, num_negatives: int, item_counts_N: np.ndarray, seed: int
) -> LoggedSessions:
    """The real sessions followed by `num_negatives` negative sessions each: same user, same
    history, as many items as the real session, drawn in proportion to `item_counts_N` and
    never one of the real session's items. Every signal of a negative is 0 (binary only)."""
    if num_negatives == 0:
        return sessions
    counts_N = np.asarray(item_counts_N, dtype=np.float64)
    if counts_N.sum() <= 0:
        raise ValueError("no training interactions to draw popularity negatives from")
    probs_N = counts_N / counts_N.sum()
    R, M = sessions.items.shape
    rng = np.random.default_rng(seed)
    draws_RXM = rng.choice(len(probs_N), size=(R, num_negatives, M), p=probs_N)
    for _ in range(100):  # redraw the few draws that hit a consumed item
        clash_RXM = (draws_RXM[..., None] == sessions.items[:, None, None, :]).any(-1)
        if not clash_RXM.any():
            break
        draws_RXM[clash_RXM] = rng.choice(len(probs_N), size=int(clash_RXM.sum()), p=probs_N)
    else:
        raise ValueError("cannot draw negatives that differ from the real sessions: the catalogue is too small")
    real_RM = sessions.items >= 0
    draws_RXM = np.where(real_RM[:, None, :], draws_RXM, -1).reshape(R * num_negatives, M)
    K = sessions.labels.shape[1]
    neg_values = np.where(draws_RXM[..., None] >= 0, 0.0, np.nan).astype(np.float32).repeat(K, axis=-1)
    negatives = LoggedSessions(
        user=np.repeat(sessions.user, num_negatives),
        history=np.repeat(sessions.history, num_negatives, axis=0),
        items=draws_RXM,
        labels=np.zeros((R * num_negatives, K), dtype=np.float32),
        any_event=np.zeros((R * num_negatives, K), dtype=bool),
        item_values=neg_values,
    )
    return LoggedSessions(
        *(np.concatenate([getattr(sessions, f), getattr(negatives, f)]) for f in LoggedSessions.__dataclass_fields__)
    )


def holdout_users(num_users: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean [num_users]: the users whose sessions are held out (a fixed random share)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(num_users, dtype=bool)
    held[rng.choice(num_users, size=max(1, int(round(fraction * num_users))), replace=False)] = True
    return held
