"""Constrained beam search against the exhaustive reference, on small random models."""

import pytest
import torch

from onerec.config import ModelConfig, MoEConfig
from onerec.inference.beam_search import constrained_beam_search
from onerec.inference.exhaustive import exhaustive_top_k
from onerec.model.onerec import OneRecModel
from onerec.tokenizer.trie import build_trie


def random_catalogue(num_items: int, sizes: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    seen, rows = set(), []
    while len(rows) < num_items:
        row = tuple(int(torch.randint(0, s, (1,), generator=g)) for s in sizes)
        if row not in seen:
            seen.add(row)
            rows.append(row)
    return torch.tensor(rows)


def random_model(sizes, seed, moe=True):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, num_heads=2, encoder_layers=1, decoder_layers=2, d_ff=48, dropout=0.0,
                      moe=MoEConfig(enabled=moe, num_experts=3, top_k=2))
    model = OneRecModel(cfg, sizes, max_history=5, session_len=1).eval()
    for p in model.parameters():  # sharpen the distributions so ranks are not all near-ties
        p.data.mul_(3.0)
    return model


def random_histories(codes, batch, seed):
    g = torch.Generator().manual_seed(seed + 1)
    items = torch.randint(0, len(codes), (batch, 5), generator=g)
    items[0, :3] = -1  # a short history
    items[1] = -1  # no history at all
    history = codes[items.clamp(min=0)]
    return history.masked_fill((items < 0).unsqueeze(-1), -1)


@pytest.mark.parametrize(
    "sizes, num_items, seed",
    [([4, 4], 9, 0), ([5, 3, 2], 17, 1), ([3, 6, 2, 2], 25, 2), ([8, 1, 3], 10, 3)],
)
@pytest.mark.parametrize("moe", [True, False])
def test_beam_search_equals_exhaustive_when_the_beam_covers_the_catalogue(sizes, num_items, seed, moe):
    codes = random_catalogue(num_items, sizes, seed)
    trie = build_trie(codes, sizes)
    model = random_model(sizes, seed, moe)
    history = random_histories(codes, 4, seed)
    out = constrained_beam_search(model, history, trie, beam_width=num_items)
    ref_items, ref_scores = exhaustive_top_k(model, history, codes, k=num_items)
    torch.testing.assert_close(out.scores_BW, ref_scores, atol=1e-5, rtol=1e-5)
    # identical order wherever scores are not tied
    assert (out.items_BW == ref_items).float().mean() > 0.95
    for b in range(4):
        assert sorted(out.items_BW[b].tolist()) == list(range(num_items))


def test_every_beam_is_a_real_item_with_its_codes_and_extra_beams_are_dead():
    sizes = [3, 3, 2]
    codes = random_catalogue(7, sizes, 5)
    trie = build_trie(codes, sizes)
    model = random_model(sizes, 5)
    out = constrained_beam_search(model, random_histories(codes, 3, 5), trie, beam_width=10)
    live = out.items_BW >= 0
    assert live.sum(dim=1).tolist() == [7, 7, 7]
    assert torch.isinf(out.scores_BW[~live]).all()
    torch.testing.assert_close(out.codes_BWL[live], codes[out.items_BW[live]])
    assert (out.scores_BW[:, :-1] >= out.scores_BW[:, 1:]).all()  # sorted, -inf last


def test_narrow_beam_returns_distinct_valid_items_with_top1_of_exhaustive():
    sizes = [6, 6, 3]
    codes = random_catalogue(60, sizes, 7)
    trie = build_trie(codes, sizes)
    model = random_model(sizes, 7)
    history = random_histories(codes, 5, 7)
    out = constrained_beam_search(model, history, trie, beam_width=4)
    for row in out.items_BW.tolist():
        assert len(set(row)) == 4 and min(row) >= 0
    ref_items, ref_scores = exhaustive_top_k(model, history, codes, k=1)
    # a beam's score is the exact log-prob of its item, so it can never beat the true best
    assert (out.scores_BW[:, 0] <= ref_scores[:, 0] + 1e-5).all()
