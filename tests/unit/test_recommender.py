"""The Python serving API (onerec/inference/recommend.py): a Recommender loads an export once
and answers many histories per call, batched, with the same items as one history at a time;
bad requests are errors naming the request and the field, before anything runs."""

from __future__ import annotations

import zlib

import pytest
import torch
from export_helpers import MAX_HISTORY, NUM_ITEMS, RAW_IDS, TITLES, USER_BUCKETS, tiny_export

from onerec.export import load_export
from onerec.inference.recommend import Recommendation, Recommender, recommend, user_bucket

ID = RAW_IDS


HISTORIES = [
    [ID[1], ID[2]],
    [],
    [ID[5]],
    [ID[3], ID[4], ID[5], ID[6], ID[7], ID[8]],  # longer than max_history: the last 4 are read
    [ID[9], ID[9], ID[0]],
    [ID[11]],
    [ID[0], ID[1], ID[2], ID[3]],
]
USERS = [1, None, "alice", 3, 7, "bob", 2]


def _same(a: list[Recommendation], b: list[Recommendation]) -> None:
    assert [r.item_id for r in a] == [r.item_id for r in b]
    torch.testing.assert_close([r.score for r in a], [r.score for r in b], rtol=0, atol=1e-5)


def test_the_export_loads_once_with_its_settings(recommender, export_dir):
    assert recommender.num_items == NUM_ITEMS and recommender.max_history == MAX_HISTORY
    assert recommender.uses_user_ids and recommender.device == torch.device("cpu")
    assert recommender.source == str(export_dir) and recommender.exclude_history is False


def test_one_ranked_list_per_history(recommender):
    results = recommender.recommend(HISTORIES, k=5, user_ids=USERS)
    assert len(results) == len(HISTORIES)
    for ranked in results:
        assert [r.rank for r in ranked] == [1, 2, 3, 4, 5]
        scores = [r.score for r in ranked]
        assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)
        assert len({r.item_id for r in ranked}) == 5
        assert all(TITLES[ID.index(r.item_id)] == r.title for r in ranked)
        assert ranked[0].to_dict() == {"item_id": ranked[0].item_id, "score": ranked[0].score, "title": ranked[0].title}


def test_batched_answers_equal_one_history_at_a_time(export_dir):
    # batch_size 3 over 7 histories: three searches of 3, 3 and 1 requests.
    batched = Recommender.from_pretrained(export_dir, device="cpu", batch_size=3)
    together = batched.recommend(HISTORIES, k=5, user_ids=USERS)
    for history, user, answer in zip(HISTORIES, USERS, together):
        _same(answer, batched.recommend([history], k=5, user_ids=[user])[0])
    # ...and each answer is the one the one-call function gives for that history alone.
    exported = load_export(export_dir)
    for history, user, answer in zip(HISTORIES, USERS, together):
        _same(answer, recommend(exported, history, top_k=5, beam_width=6, user=user))


def test_history_is_cut_to_max_history(recommender):
    long, tail = recommender.recommend([[ID[0], ID[1], *ID[3:7]], ID[3:7]], k=4)
    _same(long, tail)  # the model reads the last max_history items only


def test_an_empty_history_is_answered_from_the_start_token(recommender):
    (empty,) = recommender.recommend([[]], k=3)
    assert len(empty) == 3
    # With a user token, the user changes the answer even without a history.
    a, b = recommender.recommend([[], []], k=NUM_ITEMS, beam_width=NUM_ITEMS, user_ids=[0, 1])
    assert [r.score for r in a] != [r.score for r in b]


def test_exclude_history_leaves_out_every_item_of_the_history(recommender):
    (plain,) = recommender.recommend([[ID[4]]], k=NUM_ITEMS, beam_width=NUM_ITEMS, exclude_history=False)
    favourites = [r.item_id for r in plain[:3]]
    # The favourites come first, before max_history other items: only exclusion can drop them.
    history = [*favourites, ID[4], ID[5], ID[6], ID[7]]
    (kept,) = recommender.recommend([history], k=5, beam_width=8, exclude_history=True)
    assert len(kept) == 5 and not {r.item_id for r in kept} & set(history)
    (default,) = recommender.recommend([history], k=5, beam_width=8)  # the export says False
    assert {r.item_id for r in default} & set(history)
    # A catalogue smaller than k once the history is excluded: fewer items, never an excluded one.
    (rest,) = recommender.recommend([history], k=NUM_ITEMS, beam_width=NUM_ITEMS, exclude_history=True)
    assert len(rest) == NUM_ITEMS - len(set(history))


def test_user_ids_are_bucketed_ints_or_hashed_strings(recommender, export_dir):
    assert user_bucket(3, USER_BUCKETS) == user_bucket(3 + USER_BUCKETS, USER_BUCKETS) == 3
    assert user_bucket("alice", USER_BUCKETS) == zlib.crc32(b"alice") % USER_BUCKETS
    assert user_bucket(-1, USER_BUCKETS) == USER_BUCKETS - 1 and user_bucket(None, USER_BUCKETS) is None
    assert user_bucket("alice", 0) is None
    history = [ID[2], ID[3]]
    same = recommender.recommend([history] * 3, k=6, user_ids=[3, 3 + USER_BUCKETS, "x"])
    _same(same[0], same[1])
    hashed = zlib.crc32(b"x") % USER_BUCKETS
    _same(same[2], recommender.recommend([history], k=6, user_ids=[hashed])[0])
    scores = {tuple(r.score for r in ranked) for ranked in recommender.recommend([history] * USER_BUCKETS, k=6,
                                                                                   user_ids=list(range(USER_BUCKETS)))}
    assert len(scores) > 1  # the model reads the user token


def test_a_model_without_user_token_ignores_user_ids(tmp_path):
    plain = Recommender.from_pretrained(tiny_export(tmp_path, user_buckets=0), device="cpu")
    assert not plain.uses_user_ids
    a, b, c = plain.recommend([[ID[1]]] * 3, k=4, user_ids=[1, "someone", None])
    _same(a, b)
    _same(a, c)


def test_default_beam_width_grows_to_k(recommender):
    (ranked,) = recommender.recommend([[ID[1]]], k=NUM_ITEMS)  # eval.beam_width is 6
    assert len(ranked) == NUM_ITEMS and [r.rank for r in ranked] == list(range(1, NUM_ITEMS + 1))


@pytest.mark.parametrize(
    "histories, kwargs, error, message",
    [
        ([[ID[1]], [ID[2], "nope", ID[3], "gone"]], {}, ValueError,
         r"request 1: history: unknown item id\(s\) 'nope' \(position 1\), 'gone' \(position 3\)"),
        ([[ID[1]]], {"k": 0}, ValueError, r"^k=0: expected an integer >= 1"),
        ([[ID[1]]], {"k": -3}, ValueError, r"^k=-3: expected an integer >= 1"),
        ([[ID[1]]], {"k": "5"}, TypeError, r"^k: '5' is a str: expected an integer >= 1"),
        ([[ID[1]]], {"k": True}, TypeError, r"^k: True is a bool"),
        ([[ID[1]]], {"k": 5, "beam_width": 4}, ValueError, r"^beam_width=4 is below k=5"),
        ([[ID[1]], ID[2]], {}, TypeError, r"request 1: history: 'B002' is a str: expected a list of item ids"),
        ([[ID[1], 2.5]], {}, TypeError, r"request 0: history\[1\]: 2.5 is a float: item ids are strings"),
        ([[ID[1]], None], {}, TypeError, r"request 1: history: None is a NoneType"),
        ([[ID[1]]], {"user_ids": [1.5]}, TypeError, r"request 0: user_id: 1.5 is a float: expected an int or a str"),
        ([[ID[1]]], {"user_ids": [True]}, TypeError, r"request 0: user_id: True is a bool"),
        ([[ID[1]], [ID[2]]], {"user_ids": [1]}, ValueError, r"user_ids has 1 entries for 2 histories"),
        ([[ID[1]]], {"exclude_history": "yes"}, TypeError, r"exclude_history: 'yes' is not a bool"),
        (ID[1], {}, TypeError, r"histories: 'B001' is a str: expected a list of histories"),
    ],
)
def test_bad_requests_name_the_request_and_the_field(recommender, histories, kwargs, error, message):
    with pytest.raises(error, match=message):
        recommender.recommend(histories, **kwargs)


def test_a_history_over_the_limit_is_refused_with_the_limit(export_dir):
    limited = Recommender.from_pretrained(export_dir, device="cpu", max_history_items=5)
    assert len(limited.recommend([ID[:5]], k=3)[0]) == 3
    with pytest.raises(ValueError, match=r"request 1: history: 6 items, above the limit of 5 per request .*last 4"):
        limited.recommend([ID[:5], ID[:6]], k=3)


def test_ints_are_read_as_their_decimal_string(tmp_path):
    numbered = [str(i) for i in range(NUM_ITEMS)]  # a catalogue whose raw ids are numbers
    numeric = Recommender.from_pretrained(tiny_export(tmp_path, raw_ids=numbered), device="cpu")
    _same(numeric.recommend([[3, 4]], k=4)[0], numeric.recommend([["3", "4"]], k=4)[0])
