import numpy as np
import pytest

from onerec.config import DataConfig
from onerec.data.splits import UserSequences, in_training_period, make_splits, time_cutoffs, training_item_counts


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
