"""Per-user sequences -> train / validation / test examples.

Shape legend: N examples, S history length (max_history), M session items (session_len).

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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


@dataclass
class Examples:
    user: np.ndarray  # [N] int64
    history: np.ndarray  # [N, S] int64, right-aligned, -1 padding on the left
    target: np.ndarray  # [N, M] int64, -1 padding at the end

    def __len__(self) -> int:
        return len(self.user)


def gather_examples(
    seqs: UserSequences, users: np.ndarray, ends: np.ndarray, limits: np.ndarray, max_history: int, session_len: int
) -> Examples:
    """history = seq_u[:end][-S:], target = seq_u[end : min(end + M, limit)] for each (u, end, limit)."""
    base = seqs.offsets[users]
    hist_pos = ends[:, None] - max_history + np.arange(max_history)[None, :]  # position within the user's sequence
    history = np.where(hist_pos >= 0, seqs.items[base[:, None] + np.maximum(hist_pos, 0)], -1)
    tgt_pos = ends[:, None] + np.arange(session_len)[None, :]
    in_range = tgt_pos < limits[:, None]
    target = np.where(in_range, seqs.items[base[:, None] + np.where(in_range, tgt_pos, 0)], -1)
    return Examples(users.astype(np.int64), history.astype(np.int64), target.astype(np.int64))


def _training_prefixes(seqs: UserSequences, train_len: np.ndarray, cfg: DataConfig) -> Examples:
    """Every prefix t = 1 .. train_len - 1 of each user's training part."""
    per_user = np.maximum(train_len - 1, 0)
    users = np.repeat(np.arange(len(seqs)), per_user)
    starts = np.concatenate([[0], np.cumsum(per_user)[:-1]])
    ends = np.arange(per_user.sum()) - np.repeat(starts, per_user) + 1
    return gather_examples(seqs, users, ends, train_len[users], cfg.max_history, cfg.session_len)


def time_cutoffs(seqs: UserSequences, cfg: DataConfig) -> tuple[float, float]:
    """(t_valid, t_test): interaction-time quantiles; training uses times < t_valid."""
    t_valid = float(np.quantile(seqs.orders, 1.0 - cfg.valid_fraction - cfg.test_fraction))
    t_test = float(np.quantile(seqs.orders, 1.0 - cfg.test_fraction))
    return t_valid, t_test


def training_lengths(seqs: UserSequences, cfg: DataConfig) -> np.ndarray:
    """Length of each user's training part (a prefix of their sequence)."""
    if cfg.split == "leave_one_out":
        return np.maximum(seqs.lengths() - 2, 0)
    t_valid, _ = time_cutoffs(seqs, cfg)
    return np.add.reduceat((seqs.orders < t_valid).astype(np.int64), seqs.offsets[:-1]) * (seqs.lengths() > 0)


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
    lengths = seqs.lengths()
    users = np.arange(len(seqs))
    if cfg.split == "leave_one_out":
        ok = lengths >= 3
        u = users[ok]
        valid = gather_examples(seqs, u, lengths[ok] - 2, lengths[ok] - 1, cfg.max_history, 1)
        test = gather_examples(seqs, u, lengths[ok] - 1, lengths[ok], cfg.max_history, 1)
        train_len = np.where(ok, lengths - 2, 0)
    else:
        if not seqs.has_time:
            raise ValueError("data.split=time needs timestamps; this data set only has an order (use leave_one_out)")
        t_valid, t_test = time_cutoffs(seqs, cfg)
        train_len = training_lengths(seqs, cfg)
        before_test = np.add.reduceat((seqs.orders < t_test).astype(np.int64), seqs.offsets[:-1]) * (lengths > 0)
        has_valid = (before_test > train_len) & (train_len >= 1)
        has_test = (lengths > before_test) & (before_test >= 1)
        valid = gather_examples(seqs, users[has_valid], train_len[has_valid], train_len[has_valid] + 1, cfg.max_history, 1)
        test = gather_examples(seqs, users[has_test], before_test[has_test], before_test[has_test] + 1, cfg.max_history, 1)
    train = _training_prefixes(seqs, train_len, cfg)
    return {"train": train, "valid": valid, "test": test}


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
