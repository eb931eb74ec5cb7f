"""Logged sessions for the reward model, AUC, and the item-mean baseline."""

import numpy as np
import pytest

from onerec.align.reward_eval import baseline_predictions, concordance, item_mean_signal, roc_auc
from onerec.align.sessions import (
    CONSUMED_COLUMN,
    build_sessions,
    holdout_users,
    item_signal_values,
    with_popularity_negatives,
)
from onerec.config import SignalConfig
from onerec.data.splits import UserSequences

LIKE = SignalConfig(name="like", column="rating", kind="binary", threshold=3.5)
RATING = SignalConfig(name="rating", column="rating", kind="regression")


def _log():
    # user 0: five interactions at t = 1..5; user 1: three at t = 10, 11, 50
    user = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    item = np.array([1, 2, 3, 4, 5, 6, 7, 8])
    order = np.array([1, 2, 3, 4, 5, 10, 11, 50])
    rating = np.array([5, 1, 4, 2, 3, 5, 5, 1], dtype=np.float32)
    return user, item, order, rating


def _sequences(user, item, order):
    return UserSequences.from_sorted(user, item, order, num_users=2)


def test_fixed_size_sessions_labels_and_history():
    user, item, order, rating = _log()
    values = item_signal_values({"rating": rating}, [LIKE, RATING])
    s = build_sessions(user, item, order, values, None, _sequences(user, item, order), [LIKE, RATING], 2, 0.0, 3)
    np.testing.assert_array_equal(s.items, [[1, 2], [3, 4], [5, -1], [6, 7], [8, -1]])
    np.testing.assert_array_equal(s.user, [0, 0, 0, 1, 1])
    np.testing.assert_allclose(s.labels[:, 0], [0.5, 0.5, 0.0, 1.0, 0.0])  # share of items rated > 3.5
    np.testing.assert_allclose(s.labels[:, 1], [3.0, 3.0, 3.0, 5.0, 1.0])  # mean rating
    np.testing.assert_array_equal(s.any_event[:, 0], [True, True, False, True, False])
    assert not s.any_event[:, 1].any()  # regression signals have no event flag
    # history: the user's items strictly before the session's first interaction, right-aligned
    np.testing.assert_array_equal(s.history, [[-1, -1, -1], [-1, 1, 2], [2, 3, 4], [-1, -1, -1], [-1, 6, 7]])


def test_gap_splits_sessions_and_logged_filter_drops_rows():
    user, item, order, rating = _log()
    values = item_signal_values({"rating": rating}, [LIKE])
    seqs = _sequences(user, item, order)
    s = build_sessions(user, item, order, values, None, seqs, [LIKE], 4, 5.0, 3)
    np.testing.assert_array_equal(s.items, [[1, 2, 3, 4], [5, -1, -1, -1], [6, 7, -1, -1], [8, -1, -1, -1]])
    logged = np.array([0, 0, 1, 1, 1, 1, 1, 1], dtype=np.float32)
    s = build_sessions(user, item, order, values, logged, seqs, [LIKE], 4, 0.0, 3)
    np.testing.assert_array_equal(s.items[0], [3, 4, 5, -1])
    np.testing.assert_array_equal(s.history[0], [-1, 1, 2])  # unlogged rows still count as history


def test_missing_signal_column_is_a_clear_error():
    with pytest.raises(ValueError, match="reads column 'is_like'"):
        item_signal_values({"rating": np.ones(3)}, [SignalConfig(name="like", column="is_like")])


def test_roc_auc_matches_hand_counts_and_handles_ties():
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert roc_auc(np.array([0.5, 0.5, 0.5]), np.array([0, 1, 1])) == pytest.approx(0.5)
    assert roc_auc(np.array([0.9, 0.1]), np.array([1, 0])) == pytest.approx(1.0)
    assert np.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_item_mean_baseline_shrinks_towards_the_global_mean():
    items = np.array([[0, 1], [0, -1]])
    values = np.array([[[1.0], [0.0]], [[1.0], [np.nan]]], dtype=np.float32)
    mean = item_mean_signal(items, values, num_items=3, prior=1.0)
    global_mean = 2.0 / 3.0
    np.testing.assert_allclose(mean[:, 0], [(2 + global_mean) / 3, global_mean / 2, global_mean], rtol=1e-6)
    np.testing.assert_allclose(baseline_predictions(np.array([[0, 1], [2, -1]]), mean)[:, 0],
                               [(mean[0, 0] + mean[1, 0]) / 2, global_mean], rtol=1e-6)


def test_holdout_users_is_a_fixed_share():
    held = holdout_users(100, 0.1, seed=3)
    assert held.sum() == 10
    np.testing.assert_array_equal(held, holdout_users(100, 0.1, seed=3))


def test_concordance_is_auc_for_binary_labels_and_counts_graded_pairs():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    assert concordance(scores, np.array([0, 0, 1, 1])) == pytest.approx(roc_auc(scores, np.array([0, 0, 1, 1])))
    # labels 0, 0.5, 1: pairs (0.5 > 0), (1 > 0), (1 > 0.5); scores order 2 of the 3 correctly
    assert concordance(np.array([0.2, 0.9, 0.5]), np.array([0.0, 0.5, 1.0])) == pytest.approx(2 / 3)
    assert np.isnan(concordance(np.array([0.2, 0.9]), np.array([0.5, 0.5])))


def test_popularity_negatives_follow_each_real_session_and_avoid_its_items():
    user, item, order, _ = _log()
    consumed = SignalConfig(name="consumed", column=CONSUMED_COLUMN)
    values = item_signal_values({CONSUMED_COLUMN: np.ones(len(user), np.float32)}, [consumed])
    real = build_sessions(user, item, order, values, None, _sequences(user, item, order), [consumed], 2, 0.0, 3)
    counts = np.array([0, 50, 50, 1, 1, 1, 1, 1, 1, 100], dtype=np.float64)  # item 0 is never drawn
    s = with_popularity_negatives(real, 3, counts, seed=0)
    R = len(real)
    assert len(s) == 4 * R
    np.testing.assert_array_equal(s.items[:R], real.items)
    np.testing.assert_array_equal(s.user[R:], np.repeat(real.user, 3))
    np.testing.assert_array_equal(s.history[R:], np.repeat(real.history, 3, axis=0))
    assert (s.labels[:R] == 1).all() and (s.labels[R:] == 0).all()
    assert s.any_event[:R].all() and not s.any_event[R:].any()
    negatives = s.items[R:].reshape(R, 3, -1)
    for r in range(R):
        real_items = set(real.items[r][real.items[r] >= 0])
        for negative in negatives[r]:
            # as long as the real session, none of its items, never an item nobody consumed
            assert ((negative >= 0) == (real.items[r] >= 0)).all()
            assert not real_items & set(negative[negative >= 0]) and 0 not in negative
    assert np.isnan(s.item_values[R:][s.items[R:] < 0]).all() and (s.item_values[R:][s.items[R:] >= 0] == 0).all()
    # drawn in proportion to popularity: item 9 (100) far more often than items 3-8 (1 each)
    drawn = np.bincount(s.items[R:][s.items[R:] >= 0], minlength=10)
    assert drawn[9] > drawn[3:9].sum()
    assert with_popularity_negatives(real, 0, counts, seed=0) is real


def test_popularity_negatives_need_items_outside_the_session():
    user, item, order, _ = _log()
    consumed = SignalConfig(name="consumed", column=CONSUMED_COLUMN)
    values = np.ones((len(user), 1), np.float32)
    real = build_sessions(user, item, order, values, None, _sequences(user, item, order), [consumed], 2, 0.0, 3)
    only_item_1 = np.zeros(10)
    only_item_1[1] = 5
    with pytest.raises(ValueError, match="catalogue is too small"):
        with_popularity_negatives(real, 1, only_item_1, seed=0)


def test_negatives_with_a_regression_signal_are_refused():
    from onerec.config import ConfigError, RewardConfig

    with pytest.raises(ConfigError, match="reward.negatives=1 with regression signals \\['rating'\\]"):
        RewardConfig(signals=[LIKE, RATING], negatives=1)
    with pytest.raises(ConfigError, match="reward.negatives"):
        RewardConfig(signals=[LIKE], negatives=-1)
