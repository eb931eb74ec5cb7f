"""Per-user sequences -> train / validation / test examples.

Shape legend: N examples, B rows gathered at once (a batch), S history length (max_history),
M session items (session_len), U users, I interactions.

leave_one_out (the published protocol):
    seq = [i_1 ... i_{n-2} | i_{n-1} | i_n]
           training part    valid    test
    valid: history seq[:n-2] -> target i_{n-1};   test: history seq[:n-1] -> target i_n
time: global cut-offs t_valid < t_test at interaction-time quantiles; a user's valid target
    is their first interaction in [t_valid, t_test), the test target their first at or after
    t_test, each with every earlier interaction as history; training uses times < t_valid.
Training examples: every prefix train[:t] (t >= 1) predicts the next session
train[t : t + M] (padded with -1 where the training part ends).
Histories keep the last S items, right-aligned: padding -1 on the left, newest item last.

Nothing of size examples x S is ever stored: an `Examples` is the users' items in CSR form
(int32 where they fit, shared by the three splits) plus a few numbers per user, and rows of
(user, history, target) are gathered when indexed, one batch at a time:

    items:            [ u0: a b c d e f | u1: g h i | ... ]      offsets [U + 1]
    example rows:     [ u0: 0 1 2 | u1: (none) | ... ]           example_offsets [U + 1]
    row r of user u:  end = first_end[u] + (r - example_offsets[u]),  limit = limit[u]
                      history = seq_u[:end][-S:],  target = seq_u[end : min(end + M, limit)]

With int32 items and offsets, the three splits together cost 4 bytes per interaction and
36 per user, whatever S and M: items and offsets are shared; example_offsets and limit take
4 bytes per user each, first_end as well except for training, where it is always 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from onerec.config import DataConfig


@dataclass
class UserSequences:
    """Chronological items per user in CSR form: user u owns items[offsets[u]:offsets[u+1]]."""

    offsets: np.ndarray  # [U + 1] int64
    items: np.ndarray  # [I] int64 item_index
    orders: np.ndarray  # [I] int64 timestamp or position
    has_time: bool = True  # False: orders are positions, not timestamps

    @classmethod
    def from_sorted(
        cls, user_index: np.ndarray, item_index: np.ndarray, order: np.ndarray, num_users: int, has_time: bool = True
    ) -> "UserSequences":
        counts = np.bincount(user_index, minlength=num_users)
        return cls(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), item_index, order, has_time)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


INT32_MAX = 2**31 - 1


def _narrow(values: np.ndarray) -> np.ndarray:
    """`values` as int32 when every value fits (no copy if they already are), else unchanged:
    the arrays training holds for its whole run cost half as much."""
    if values.dtype == np.int32 or (values.size and (values.min() < -INT32_MAX or values.max() > INT32_MAX)):
        return values
    return values.astype(np.int32)


@dataclass
class ExampleRows:
    """Dense rows of examples (a batch, or a split gathered whole)."""

    user: np.ndarray  # [B] int64
    history: np.ndarray  # [B, S] int64, right-aligned, -1 padding on the left
    target: np.ndarray  # [B, M] int64, -1 padding at the end

    def __len__(self) -> int:
        return len(self.user)


def history_rows(
    offsets: np.ndarray, items: np.ndarray, users: np.ndarray, ends: np.ndarray, max_history: int
) -> np.ndarray:
    """[B, S] int64: seq_u[:end][-S:] right-aligned, -1 on the left."""
    base = offsets[users].astype(np.int64)
    hist_pos = ends[:, None] - max_history + np.arange(max_history)[None, :]  # position within the user's sequence
    history = np.where(hist_pos >= 0, items[base[:, None] + np.maximum(hist_pos, 0)], -1)
    return history.astype(np.int64)


def _target_rows(
    offsets: np.ndarray, items: np.ndarray, users: np.ndarray, ends: np.ndarray, limits: np.ndarray, session_len: int
) -> np.ndarray:
    """[B, M] int64: seq_u[end : min(end + M, limit)], -1 at the end."""
    base = offsets[users].astype(np.int64)
    tgt_pos = ends[:, None] + np.arange(session_len)[None, :]
    in_range = tgt_pos < limits[:, None]
    target = np.where(in_range, items[base[:, None] + np.where(in_range, tgt_pos, 0)], -1)
    return target.astype(np.int64)


def gather_examples(
    seqs: UserSequences, users: np.ndarray, ends: np.ndarray, limits: np.ndarray, max_history: int, session_len: int
) -> ExampleRows:
    """history = seq_u[:end][-S:], target = seq_u[end : min(end + M, limit)] for each (u, end, limit)."""
    return ExampleRows(
        np.asarray(users).astype(np.int64),
        history_rows(seqs.offsets, seqs.items, users, ends, max_history),
        _target_rows(seqs.offsets, seqs.items, users, ends, limits, session_len),
    )


class Examples:
    """Examples as positions in the users' CSR sequences; rows are gathered when indexed (see
    the module doc). `user`, `history` and `target` read like the arrays [N], [N, S] and [N, M]:

        examples.history[rows]    # [len(rows), S] int64, gathered for these rows only
        examples.target[rows, 0]  # any numpy index after the rows
        len(examples)

    and become whole arrays only when a consumer asks for one (np.asarray, torch.as_tensor).
    Rows are ordered by user, each user's examples by end: a user's last row is their latest.
    """

    def __init__(
        self,
        offsets: np.ndarray,
        items: np.ndarray,
        counts: np.ndarray,
        first_end: np.ndarray | int,
        limit: np.ndarray,
        max_history: int,
        session_len: int,
    ) -> None:
        """User u has counts[u] examples, ending at first_end[u], first_end[u] + 1, ..., each
        with target limit limit[u]; offsets/items are the CSR sequences (shared, not copied)."""
        self.offsets = offsets  # [U + 1] into items
        self.items = items  # [I] item_index, users' sequences back to back
        self.example_offsets = _narrow(np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]))  # [U + 1]
        # A scalar first end (every training user's is 1) is broadcast: no per-user storage.
        self.first_end = (np.broadcast_to(np.asarray(first_end, dtype=np.int32), (len(counts),))
                          if np.ndim(first_end) == 0 else _narrow(np.asarray(first_end)))  # [U]
        self.limit = _narrow(np.asarray(limit))  # [U]
        self.max_history = max_history
        self.session_len = session_len

    def __len__(self) -> int:
        return int(self.example_offsets[-1])

    def __repr__(self) -> str:
        return (f"Examples({len(self)} rows of {len(self.limit)} users, S={self.max_history}, "
                f"M={self.session_len})")

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user, end, limit), each [B] int64, of example rows [B] (already in range)."""
        rows = np.asarray(rows, dtype=np.int64)
        # side="right": users without examples repeat their successor's offset and are skipped
        user = np.searchsorted(self.example_offsets, rows, side="right") - 1
        end = self.first_end[user].astype(np.int64) + (rows - self.example_offsets[user])
        return user, end, self.limit[user].astype(np.int64)

    def gather(self, rows: np.ndarray) -> ExampleRows:
        """Dense (user, history, target) of `rows`: what a training step reads."""
        user, end, limit = self.locate(rows)
        return ExampleRows(
            user,
            history_rows(self.offsets, self.items, user, end, self.max_history),
            _target_rows(self.offsets, self.items, user, end, limit, self.session_len),
        )

    def column(self, name: str, rows: np.ndarray) -> np.ndarray:
        """One of user [B], history [B, S], target [B, M] of `rows` [B], without the other two."""
        user, end, limit = self.locate(rows)
        if name == "user":
            return user
        if name == "history":
            return history_rows(self.offsets, self.items, user, end, self.max_history)
        assert name == "target", name
        return _target_rows(self.offsets, self.items, user, end, limit, self.session_len)

    @property
    def user(self) -> "ExampleColumn":
        return ExampleColumn(self, "user", ())

    @property
    def history(self) -> "ExampleColumn":
        return ExampleColumn(self, "history", (self.max_history,))

    @property
    def target(self) -> "ExampleColumn":
        return ExampleColumn(self, "target", (self.session_len,))


class ExampleColumn:
    """One column of `Examples` as an int64 array-like [N, *row_shape]: indexing gathers only
    the indexed rows; numpy (__array__) and torch (__dlpack__) get the whole column in one
    vectorised gather rather than row by row, as they would through __getitem__."""

    def __init__(self, examples: Examples, name: str, row_shape: tuple[int, ...]) -> None:
        self.examples = examples
        self.name = name
        self.shape = (len(examples), *row_shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.int64)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ExampleColumn({self.name}, shape={self.shape})"

    def _rows(self, key: Any) -> tuple[np.ndarray, tuple[int, ...]]:
        """(row indices [R], the shape the row axis takes in the result) of a first-axis index:
        () for a scalar, which drops the axis as in numpy."""
        n = len(self)
        if isinstance(key, slice):
            rows = np.arange(*key.indices(n), dtype=np.int64)
            return rows, rows.shape
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        key = np.asarray(key)
        if key.dtype == bool:
            if key.shape != (n,):
                raise IndexError(f"boolean index of shape {key.shape} for {n} examples")
            rows = np.flatnonzero(key)
            return rows, rows.shape
        if key.size == 0:  # [] comes out of np.asarray as float64
            return np.zeros(0, dtype=np.int64), key.shape
        if not np.issubdtype(key.dtype, np.integer):
            raise IndexError(f"examples are indexed by integers, slices or a boolean mask, got {key.dtype}")
        rows = np.where(key < 0, key + n, key).astype(np.int64).reshape(-1)
        if rows.min() < 0 or rows.max() >= n:
            raise IndexError(f"index out of bounds for {n} examples")
        return rows, key.shape

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        rows, rows_shape = self._rows(key)
        values = self.examples.column(self.name, rows)
        values = values.reshape(rows_shape + values.shape[1:])
        values = values[(slice(None),) * len(rows_shape) + rest] if rest else values
        return values[()] if values.ndim == 0 else values  # a scalar, as numpy gives one

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def __dlpack__(self, **kwargs: Any) -> Any:
        # torch.as_tensor reads objects through DLPack before it falls back to the sequence
        # protocol, which would gather one row per __getitem__ call.
        return self[:].__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU: gathered on the host

    def tolist(self) -> list:
        return self[:].tolist()


def time_cutoffs(seqs: UserSequences, cfg: DataConfig) -> tuple[float, float]:
    """(t_valid, t_test): interaction-time quantiles; training uses times < t_valid."""
    t_valid = float(np.quantile(seqs.orders, 1.0 - cfg.valid_fraction - cfg.test_fraction))
    t_test = float(np.quantile(seqs.orders, 1.0 - cfg.test_fraction))
    return t_valid, t_test


def _count_per_user(seqs: UserSequences, mask: np.ndarray) -> np.ndarray:
    """[U] int64: how many of each user's interactions `mask` [I] selects.

    reduceat over the non-empty users only: an empty user's start equals the next user's (its
    sum would be one element, not zero) and a trailing one's is out of range. dtype= sums the
    mask in int64 chunk by chunk, with no int64 copy of it (8 bytes per interaction)."""
    counts = np.zeros(len(seqs), dtype=np.int64)
    nonempty = seqs.lengths() > 0
    if nonempty.any():
        counts[nonempty] = np.add.reduceat(mask, seqs.offsets[:-1][nonempty], dtype=np.int64)
    return counts


def training_lengths(seqs: UserSequences, cfg: DataConfig) -> np.ndarray:
    """Length of each user's training part (a prefix of their sequence)."""
    if cfg.split == "leave_one_out":
        return np.maximum(seqs.lengths() - 2, 0)
    t_valid, _ = time_cutoffs(seqs, cfg)
    return _count_per_user(seqs, seqs.orders < t_valid)


def in_training_period(user: np.ndarray, order: np.ndarray, seqs: UserSequences, cfg: DataConfig) -> np.ndarray:
    """Boolean per logged row (user, order): whether it happened before the user's validation
    target, i.e. inside the period training may learn from. Anything trained on the log (the
    reward model) must keep to these rows, or the held-out targets leak into what it learned.

    leave_one_out: before the order of the user's second-to-last sequence item; time: before
    t_valid (also for rows that are not in the sequence, e.g. impressions without a click).
    """
    if cfg.split == "time":
        return order < time_cutoffs(seqs, cfg)[0]
    train_len = training_lengths(seqs, cfg)
    held = train_len < seqs.lengths()  # users with a validation (or test) part
    cut = np.full(len(seqs), np.inf)
    cut[held] = seqs.orders[seqs.offsets[:-1][held] + train_len[held]]
    return order < cut[user]


def make_splits(seqs: UserSequences, cfg: DataConfig) -> dict[str, Examples]:
    """train / valid / test `Examples` over one compact copy of the sequences' items; nothing
    returned refers to `seqs`, so a caller that drops it frees its int64 items and orders."""
    lengths = seqs.lengths()
    if cfg.split == "leave_one_out":
        ok = lengths >= 3
        # (examples per user, end of the first, target limit), per user
        valid_at = (ok, lengths - 2, lengths - 1)
        test_at = (ok, lengths - 1, lengths)
        train_len = np.where(ok, lengths - 2, 0)
    else:
        if not seqs.has_time:
            raise ValueError("data.split=time needs timestamps; this data set only has an order (use leave_one_out)")
        t_valid, t_test = time_cutoffs(seqs, cfg)
        train_len = training_lengths(seqs, cfg)
        before_test = _count_per_user(seqs, seqs.orders < t_test)
        has_valid = (before_test > train_len) & (train_len >= 1)
        has_test = (lengths > before_test) & (before_test >= 1)
        valid_at = (has_valid, train_len, train_len + 1)
        test_at = (has_test, before_test, before_test + 1)
    # Narrowed only now: the time split's quantiles copy the orders, and the two need not coexist.
    offsets, items = _narrow(seqs.offsets), _narrow(seqs.items)
    S = cfg.max_history
    return {
        # every prefix t = 1 .. train_len - 1 of each user's training part
        "train": Examples(offsets, items, np.maximum(train_len - 1, 0), 1, train_len, S, cfg.session_len),
        "valid": Examples(offsets, items, *valid_at, S, 1),
        "test": Examples(offsets, items, *test_at, S, 1),
    }


def training_item_counts(seqs: UserSequences, cfg: DataConfig, num_items: int) -> np.ndarray:
    """How often each item occurs in the training parts (the popularity baseline's ranking)."""
    train_len = training_lengths(seqs, cfg)
    position = np.arange(len(seqs.items)) - np.repeat(seqs.offsets[:-1], seqs.lengths())
    in_train = position < np.repeat(train_len, seqs.lengths())
    return np.bincount(seqs.items[in_train], minlength=num_items)


def validation_subset(num_users: int, max_users: int, seed: int) -> np.ndarray:
    """A fixed random subset of validation rows for cheap in-training evaluation (all when max_users <= 0)."""
    if max_users <= 0 or num_users <= max_users:
        return np.arange(num_users)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_users, size=max_users, replace=False))
