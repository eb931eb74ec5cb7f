"""Evaluation drivers: the popularity baseline on hand-made counts, and evaluate_examples
against beam search + metrics computed directly, in any batch size."""

import math

import numpy as np
import pytest
import torch

from onerec.config import ModelConfig, MoEConfig
from onerec.inference.beam_search import constrained_beam_search
from onerec.inference.evaluate import evaluate_examples, evaluate_popularity, popularity_ranking
from onerec.inference.exhaustive import exhaustive_top_k
from onerec.inference.metrics import ranking_metrics
from onerec.model.onerec import OneRecModel, lookup_codes
from onerec.tokenizer.trie import build_trie

SIZES = [4, 3, 2]
MAX_HISTORY = 6


def test_popularity_ranking_orders_by_count_then_item_index():
    counts = np.array([3, 5, 5, 0, 1])
    assert popularity_ranking(counts, 4).tolist() == [1, 2, 0, 4]
    assert popularity_ranking(torch.tensor(counts), 5).tolist() == [1, 2, 0, 4, 3]
    # a catalogue smaller than k: padded with -1, which never counts as a hit
    ranked = popularity_ranking(counts, 7)
    assert ranked.dtype == torch.int64 and ranked.tolist() == [1, 2, 0, 4, 3, -1, -1]
    with pytest.raises(ValueError, match="1-D"):
        popularity_ranking(counts.reshape(1, 5), 3)


def test_evaluate_popularity_hand_made():
    counts = torch.tensor([3, 5, 5, 0, 1])  # ranking [1, 2, 0, 4, 3]
    metrics = evaluate_popularity(counts, np.array([1, 2, 0, 3]), ks=[1, 3])
    assert metrics["recall@1"] == 0.25
    assert metrics["ndcg@1"] == 0.25
    assert metrics["recall@3"] == 0.75
    assert metrics["ndcg@3"] == pytest.approx((1.0 + 1 / math.log2(3) + 0.5) / 4, abs=1e-12)


def small_model(seed: int, user_buckets: int = 0) -> OneRecModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, num_heads=2, encoder_layers=1, decoder_layers=1, d_ff=48, dropout=0.1,
                      user_buckets=user_buckets, moe=MoEConfig(enabled=True, num_experts=3, top_k=2))
    model = OneRecModel(cfg, SIZES, max_history=MAX_HISTORY, session_len=1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model


def catalogue_and_examples(seed: int, num_users: int = 10, num_items: int = 18):
    g = torch.Generator().manual_seed(seed)
    all_codes = torch.cartesian_prod(*[torch.arange(s) for s in SIZES])
    codes = all_codes[torch.randperm(len(all_codes), generator=g)[:num_items]]
    history = torch.randint(0, num_items, (num_users, MAX_HISTORY), generator=g)
    lengths = torch.randint(0, MAX_HISTORY + 1, (num_users,), generator=g)
    history[torch.arange(MAX_HISTORY) < (MAX_HISTORY - lengths).unsqueeze(1)] = -1  # right-aligned
    target = torch.randint(0, num_items, (num_users,), generator=g)
    users = torch.randint(0, 100, (num_users,), generator=g)
    return codes, history.numpy(), target.numpy(), users.numpy()


def run_eval(model, codes, history, target, users, batch_size, beam_width=6, ks=(1, 3, 5), **kw):
    return evaluate_examples(
        model, history, target, users, codes, build_trie(codes, SIZES), beam_width=beam_width, ks=list(ks),
        batch_size=batch_size, device="cpu", **kw,
    )


@pytest.mark.parametrize("user_buckets", [0, 4])
def test_batch_size_does_not_change_the_metrics(user_buckets):
    codes, history, target, users = catalogue_and_examples(0)
    model = small_model(0, user_buckets)
    users = users if user_buckets else None
    in_threes = run_eval(model, codes, history, target, users, batch_size=3)
    in_one = run_eval(model, codes, history, target, users, batch_size=64)
    assert in_threes == in_one
    assert set(in_one) == {f"{m}@{k}" for m in ("recall", "ndcg") for k in (1, 3, 5)}


def test_metrics_match_a_direct_beam_search_and_the_model_mode_is_restored():
    codes, history, target, _ = catalogue_and_examples(1)
    model = small_model(1)
    model.train()  # evaluation must switch dropout off, then restore training mode
    metrics = run_eval(model, codes, history, target, None, batch_size=4)
    assert model.training
    model.eval()
    history_codes = lookup_codes(torch.as_tensor(history), codes)
    direct = constrained_beam_search(model, history_codes, build_trie(codes, SIZES), beam_width=6)
    assert metrics == ranking_metrics(direct.items_BW[:, :5], torch.as_tensor(target), [1, 3, 5])
    # with a beam covering the catalogue, the beam ranking is the exhaustive ranking
    full = run_eval(model, codes, history, target, None, batch_size=4, beam_width=18)
    ref_items, _ = exhaustive_top_k(model, history_codes, codes, k=5)
    assert full == ranking_metrics(ref_items, torch.as_tensor(target), [1, 3, 5])


def test_targets_ranked_first_give_perfect_scores_and_max_users_truncates():
    codes, history, _, _ = catalogue_and_examples(2)
    model = small_model(2).eval()
    history_codes = lookup_codes(torch.as_tensor(history), codes)
    best = constrained_beam_search(model, history_codes, build_trie(codes, SIZES), beam_width=6).items_BW[:, 0]
    perfect = run_eval(model, codes, history, best.numpy(), None, batch_size=4)
    assert all(value == pytest.approx(1.0) for value in perfect.values())
    # the first 4 users only: a wrong target for user 5+ must not matter
    target = best.clone()
    target[4:] = (best[4:] + 1) % len(codes)
    assert run_eval(model, codes, history, target, None, batch_size=3, max_users=4) == perfect
    assert run_eval(model, codes, history, target, None, batch_size=3)["recall@1"] == pytest.approx(0.4)


def test_bad_arguments_raise_value_errors():
    codes, history, target, _ = catalogue_and_examples(3)
    model = small_model(3)
    with pytest.raises(ValueError, match="beam_width"):
        run_eval(model, codes, history, target, None, batch_size=4, beam_width=3, ks=(5,))
    with pytest.raises(ValueError, match="batch_size"):
        run_eval(model, codes, history, target, None, batch_size=0)
    with pytest.raises(ValueError, match="expected history"):
        run_eval(model, codes, history, target[:3], None, batch_size=4)
    with pytest.raises(ValueError, match="max_users"):
        run_eval(model, codes, history, target, None, batch_size=4, max_users=-1)
