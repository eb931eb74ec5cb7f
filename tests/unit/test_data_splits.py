import tracemalloc

import numpy as np
import pytest
import torch

from onerec.config import DataConfig
from onerec.data.splits import (
    UserSequences,
    gather_examples,
    in_training_period,
    make_splits,
    time_cutoffs,
    training_item_counts,
)


def sequences(per_user: list[list[int]], orders=None, has_time=True) -> UserSequences:
    users = np.concatenate([[u] * len(s) for u, s in enumerate(per_user)]).astype(np.int64)
    items = np.concatenate(per_user).astype(np.int64)
    order = np.concatenate(orders) if orders is not None else np.concatenate([np.arange(len(s)) for s in per_user])
    return UserSequences.from_sorted(users, items, order.astype(np.int64), len(per_user), has_time)


def test_leave_one_out_exactly_as_published():
    seqs = sequences([[10, 11, 12, 13, 14, 15], [20, 21, 22]])
    splits = make_splits(seqs, DataConfig(max_history=3, session_len=1))
    test, valid, train = splits["test"], splits["valid"], splits["train"]
    assert test.history.tolist() == [[12, 13, 14], [-1, 20, 21]]
    assert test.target.tolist() == [[15], [22]]
    assert valid.history.tolist() == [[11, 12, 13], [-1, -1, 20]]
    assert valid.target.tolist() == [[14], [21]]
    # user 0's training part is 10..13: prefixes of length 1..3; user 1's is [20]: no example
    assert train.user.tolist() == [0, 0, 0]
    assert train.history.tolist() == [[-1, -1, 10], [-1, 10, 11], [10, 11, 12]]
    assert train.target.tolist() == [[11], [12], [13]]


def test_sessions_longer_than_one_item_are_padded_at_the_training_boundary():
    seqs = sequences([[1, 2, 3, 4, 5, 6, 7]])
    train = make_splits(seqs, DataConfig(max_history=4, session_len=3))["train"]
    # training part 1..5 (6 is validation, 7 test)
    assert train.target.tolist() == [[2, 3, 4], [3, 4, 5], [4, 5, -1], [5, -1, -1]]
    assert train.history.tolist()[-1] == [1, 2, 3, 4]


def test_time_split_uses_global_cutoffs():
    # timestamps 0..11: the 0.6 and 0.8 quantiles give cut-offs t_valid = 6.6 and t_test = 8.8
    seqs = sequences([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]],
                     orders=[np.array([0, 2, 4, 6, 8, 10]), np.array([1, 3, 5, 7, 9, 11])])
    cfg = DataConfig(split="time", valid_fraction=0.2, test_fraction=0.2, max_history=5)
    splits = make_splits(seqs, cfg)
    assert time_cutoffs(seqs, cfg) == pytest.approx((6.6, 8.8))
    valid, test = splits["valid"], splits["test"]
    # user 0: times <6.6 -> items 1..4 train; first in [6.6, 8.8) is time 8 (item 5); first >= 8.8 is time 10 (item 6)
    # user 1: times <6.6 -> items 7,8,9; first in [6.6, 8.8) is time 7 (item 10); first >= 8.8 is time 9 (item 11)
    assert valid.target.tolist() == [[5], [10]]
    assert test.target.tolist() == [[6], [11]]
    assert test.history.tolist() == [[1, 2, 3, 4, 5], [-1, 7, 8, 9, 10]]
    assert splits["train"].target.tolist() == [[2], [3], [4], [8], [9]]


def test_time_split_with_users_without_interactions():
    # users 1 and 3 have none (a KuaiRand user who never clicked), user 3 at the very end
    seqs = sequences([[1, 2, 3, 4], [], [5, 6, 7], []], orders=[np.array([0, 2, 4, 6]), np.array([], dtype=np.int64),
                                                                 np.array([1, 3, 5]), np.array([], dtype=np.int64)])
    splits = make_splits(seqs, DataConfig(split="time", valid_fraction=0.2, test_fraction=0.2, max_history=3))
    # t_valid = 3.6, t_test = 4.8: user 0 trains on 1, 2, validates on 3, tests on 4; user 2
    # trains on 5, 6, has nothing in [3.6, 4.8) and tests on 7
    assert splits["train"].target.tolist() == [[2], [6]]
    assert splits["valid"].target.tolist() == [[3]]
    assert splits["test"].target.tolist() == [[4], [7]]
    assert splits["test"].user.tolist() == [0, 2]


def test_time_split_without_timestamps_is_refused():
    with pytest.raises(ValueError, match="timestamps"):
        make_splits(sequences([[1, 2, 3]], has_time=False), DataConfig(split="time"))


def test_training_item_counts_cover_the_training_parts_only():
    seqs = sequences([[0, 1, 2, 3], [1, 1, 2]])
    counts = training_item_counts(seqs, DataConfig(), num_items=4)
    assert counts.tolist() == [1, 2, 0, 0]


def test_training_period_ends_before_each_users_validation_target():
    # user 0: orders 0..5, validation target at order 4; user 1: [20, 21] has no training part
    # (valid 20, test 21); user 2's one item is too short a sequence for the protocol (fewer
    # than 3 items): no training part either, as make_splits has it.
    seqs = sequences([[10, 11, 12, 13, 14, 15], [20, 21], [30]])
    user = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    order = np.array([0, 3, 4, 5, 9, 0, 1, 0])
    mask = in_training_period(user, order, seqs, DataConfig())
    assert mask.tolist() == [True, True, False, False, False, False, False, False]


def test_training_period_of_a_time_split_is_before_t_valid_for_every_row():
    seqs = sequences([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]],
                     orders=[np.array([0, 2, 4, 6, 8, 10]), np.array([1, 3, 5, 7, 9, 11])])
    cfg = DataConfig(split="time", valid_fraction=0.2, test_fraction=0.2)  # t_valid = 6.6
    # rows that are not sequence items (say, impressions) are cut at the same time
    mask = in_training_period(np.array([0, 0, 1, 1]), np.array([6, 7, 5, 100]), seqs, cfg)
    assert mask.tolist() == [True, False, True, False]


# ---------------------------------------------------------------- compact examples


def dense_reference(seqs: UserSequences, cfg: DataConfig) -> dict:
    """Every split as dense [N, S] / [N, M] arrays, built the way make_splits built them before
    its examples became lazy: the rows an `Examples` gathers must be exactly these."""
    lengths, users = seqs.lengths(), np.arange(len(seqs))
    if cfg.split == "leave_one_out":
        ok = lengths >= 3
        valid = gather_examples(seqs, users[ok], lengths[ok] - 2, lengths[ok] - 1, cfg.max_history, 1)
        test = gather_examples(seqs, users[ok], lengths[ok] - 1, lengths[ok], cfg.max_history, 1)
        train_len = np.where(ok, lengths - 2, 0)
    else:
        t_valid, t_test = time_cutoffs(seqs, cfg)
        owner = np.repeat(users, lengths)
        train_len = np.bincount(owner, weights=seqs.orders < t_valid, minlength=len(seqs)).astype(np.int64)
        before_test = np.bincount(owner, weights=seqs.orders < t_test, minlength=len(seqs)).astype(np.int64)
        has_valid = (before_test > train_len) & (train_len >= 1)
        has_test = (lengths > before_test) & (before_test >= 1)
        valid = gather_examples(seqs, users[has_valid], train_len[has_valid], train_len[has_valid] + 1, cfg.max_history, 1)
        test = gather_examples(seqs, users[has_test], before_test[has_test], before_test[has_test] + 1, cfg.max_history, 1)
    per_user = np.maximum(train_len - 1, 0)
    prefix_users = np.repeat(users, per_user)
    starts = np.concatenate([[0], np.cumsum(per_user)[:-1]])
    ends = np.arange(per_user.sum()) - np.repeat(starts, per_user) + 1
    train = gather_examples(seqs, prefix_users, ends, train_len[prefix_users], cfg.max_history, cfg.session_len)
    return {"train": train, "valid": valid, "test": test}


def random_sequences(rng, num_users: int, max_len: int, num_items: int) -> UserSequences:
    """Users of every length 0..max_len (zero-length users included), random items, and times
    that interleave users (sorted within each user) so a time split cuts users differently."""
    lengths = rng.integers(0, max_len + 1, size=num_users)
    users = np.repeat(np.arange(num_users), lengths)
    items = rng.integers(0, num_items, size=len(users))
    order = np.concatenate([np.sort(rng.integers(0, 10_000, size=n)) for n in lengths])
    return UserSequences.from_sorted(users, items, order.astype(np.int64), num_users)


@pytest.mark.parametrize("split", ["leave_one_out", "time"])
@pytest.mark.parametrize("max_history, session_len", [(1, 1), (3, 1), (5, 3), (20, 2)])
def test_lazy_examples_equal_the_dense_construction(split, max_history, session_len):
    rng = np.random.default_rng(max_history * 10 + session_len)
    seqs = random_sequences(rng, num_users=60, max_len=12, num_items=30)
    cfg = DataConfig(split=split, max_history=max_history, session_len=session_len)
    lazy, dense = make_splits(seqs, cfg), dense_reference(seqs, cfg)
    for name in ("train", "valid", "test"):
        assert len(lazy[name]) == len(dense[name]) > 0
        for column in ("user", "history", "target"):
            whole = np.asarray(getattr(lazy[name], column))
            assert whole.dtype == np.int64
            assert np.array_equal(whole, getattr(dense[name], column)), (name, column)
        rows = rng.permutation(len(dense[name]))[:17]
        batch = lazy[name].gather(rows)
        for column in ("user", "history", "target"):
            assert np.array_equal(getattr(batch, column), getattr(dense[name], column)[rows]), (name, column)


def test_example_columns_index_like_arrays():
    seqs = random_sequences(np.random.default_rng(0), num_users=20, max_len=9, num_items=15)
    cfg = DataConfig(max_history=4, session_len=2)
    train, dense = make_splits(seqs, cfg)["train"], dense_reference(seqs, cfg)["train"]
    n = len(train)
    history, target, user = train.history, train.target, train.user
    assert history.shape == (n, 4) and target.shape == (n, 2) and user.shape == (n,) and len(history) == n
    rows = np.array([3, 0, n - 1, 3])
    for key in (rows, rows.tolist(), torch.as_tensor(rows), slice(2, 9, 3), slice(None), -1, 5,
                np.arange(n) % 3 == 0, rows.reshape(2, 2), []):
        assert np.array_equal(history[key], dense.history[key]), key
        assert np.array_equal(user[key], dense.user[key]), key
    assert np.array_equal(target[rows, 0], dense.target[rows, 0])
    assert np.array_equal(target[:, 1], dense.target[:, 1])
    assert target[2, 1] == dense.target[2, 1]
    assert user[n - 1] == dense.user[-1]
    assert torch.equal(torch.as_tensor(history), torch.as_tensor(dense.history))  # one gather, not row by row
    assert history.tolist() == dense.history.tolist()
    for bad in (n, -n - 1, [0, n]):
        with pytest.raises(IndexError):
            history[bad]


def test_examples_share_one_int32_copy_of_the_items():
    seqs = random_sequences(np.random.default_rng(1), num_users=30, max_len=8, num_items=40)
    splits = make_splits(seqs, DataConfig(max_history=3))
    items = splits["train"].items
    assert items.dtype == np.int32 and np.array_equal(items, seqs.items)
    assert all(split.items is items for split in splits.values())
    # Nothing refers back to the int64 sequences: a stage that drops them frees them.
    assert not any(np.shares_memory(array, seqs.items) or np.shares_memory(array, seqs.orders)
                   for split in splits.values() for array in vars(split).values() if isinstance(array, np.ndarray))


@pytest.mark.parametrize("split", ["leave_one_out", "time"])
def test_training_data_memory_grows_by_a_few_bytes_per_interaction(split):
    """make_splits on 20k users (~600k interactions), measured with tracemalloc (numpy reports
    its buffers to it): what the splits keep, and the peak while building them, per interaction.
    The dense construction kept (S + M + 1) x 8 = 176 bytes per training prefix at S = 20."""
    rng = np.random.default_rng(7)
    seqs = random_sequences(rng, num_users=20_000, max_len=60, num_items=50_000)
    interactions = len(seqs.items)
    cfg = DataConfig(split=split, max_history=20, session_len=1)
    make_splits(random_sequences(rng, 5, 6, 10), cfg)  # numpy's lazy imports, once, outside the measurement
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        splits = make_splits(seqs, cfg)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(splits["train"]) > interactions / 2
    kept, transient = (current - before) / interactions, (peak - before) / interactions
    assert kept <= 12, f"the splits keep {kept:.1f} bytes per interaction"
    assert transient <= 16, f"building them peaks at {transient:.1f} bytes per interaction"
