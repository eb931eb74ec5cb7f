"""The KV-cached decoder (OneRecModel.start_decoding / decode_next) against the uncached
decode_step, which recomputes the decoder over the whole prefix: step by step along beam
trajectories, and through the searches that use it (single items and sessions)."""

import pytest
import torch

from onerec.config import ModelConfig, MoEConfig
from onerec.inference.beam_search import constrained_beam_search, generate_sessions
from onerec.model.onerec import OneRecModel, lookup_codes
from onerec.tokenizer.trie import build_trie
from catalogue_helpers import random_catalogue

SIZES = [5, 4, 3]  # C_max = 5: levels 1 and 2 have -inf columns


def _model(moe: bool, seed: int, user_buckets: int = 0, num_items: int = 0, session_len: int = 3) -> OneRecModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        d_model=32, num_heads=4, encoder_layers=1, decoder_layers=2, d_ff=64, dropout=0.1,
        user_buckets=user_buckets, item_id_embedding=num_items > 0,
        moe=MoEConfig(enabled=moe, num_experts=4, top_k=2),
    )
    return OneRecModel(cfg, SIZES, max_history=6, session_len=session_len, num_items=num_items).eval()


def _histories(codes: torch.Tensor, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(history codes [B, 6, L], item indices [B, 6]) with left padding of varying length."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(0, len(codes), (batch, 6), generator=g)
    for b in range(batch):
        items[b, : b % 4] = -1  # request 0 has no padding, request 3 has three padded slots
    return lookup_codes(items, codes), items


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_cached_logits_equal_the_recomputed_prefix_along_random_beam_trajectories(moe, seed):
    """Three whole session items (the item boundaries feed two positions at once), beams
    reordered by random parents within their request, as the beam step does."""
    model = _model(moe, seed, user_buckets=5, num_items=40)
    codes = random_catalogue(40, SIZES, seed)
    history, items = _histories(codes, 4, seed)
    users = torch.tensor([0, 3, 7, 12])
    B, W, L = 4, 3, len(SIZES)
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        memory = model.encode(history, users, items)
        cache = model.start_decoding(memory)
        repeated = memory
        generated = torch.zeros(B, 0, dtype=torch.long)
        for T in range(model.session_len * L):
            cached = model.decode_next(cache, generated)
            recomputed = model.decode_step(repeated, generated)
            assert torch.equal(torch.isinf(cached), torch.isinf(recomputed))
            torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=1e-5)
            rows = generated.shape[0] // B  # 1 before the first fan-out, then W
            parents = torch.randint(0, rows, (B * W,), generator=g) + torch.arange(B).repeat_interleave(W) * rows
            tokens = torch.randint(0, SIZES[T % L], (B * W,), generator=g)
            generated = torch.cat([generated[parents], tokens[:, None]], dim=1)
            cache.reorder(parents)
            if rows == 1:
                repeated = memory.repeat_beams(W)
    assert cache.positions == model.session_len * (L + 1) - 1


@pytest.mark.parametrize("moe", [False, True])
def test_beam_search_finds_the_same_items_with_and_without_the_cache(moe):
    model = _model(moe, 3, num_items=60)
    codes = random_catalogue(60, SIZES, 3)
    trie = build_trie(codes, SIZES)
    history, items = _histories(codes, 5, 3)
    excluded = items[:, -2:]
    runs = [
        constrained_beam_search(model, history, trie, 8, history_items_BS=items, exclude_items_BX=excluded,
                                use_cache=use_cache)
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0].items_BW, runs[1].items_BW)
    assert torch.equal(runs[0].codes_BWL, runs[1].codes_BWL)
    torch.testing.assert_close(runs[0].scores_BW, runs[1].scores_BW, atol=1e-5, rtol=1e-5)
    assert not (runs[0].items_BW.unsqueeze(-1) == excluded.unsqueeze(1)).any()  # per request


def test_sessions_are_the_same_with_and_without_the_cache():
    model = _model(True, 4, num_items=30)
    codes = random_catalogue(30, SIZES, 4)
    trie = build_trie(codes, SIZES)
    history, items = _histories(codes, 3, 4)
    runs = [
        generate_sessions(model, history, trie, 6, 3, history_items_BS=items, use_cache=use_cache)
        for use_cache in (True, False)
    ]
    assert (runs[0].items_BWM >= 0).all()
    assert torch.equal(runs[0].items_BWM, runs[1].items_BWM)
    torch.testing.assert_close(runs[0].scores_BW, runs[1].scores_BW, atol=1e-5, rtol=1e-5)


def test_the_cache_refuses_a_prefix_it_has_already_passed():
    model = _model(False, 5)
    codes = random_catalogue(20, SIZES, 5)
    history, _ = _histories(codes, 2, 5)
    with torch.inference_mode():
        cache = model.start_decoding(model.encode(history))
        model.decode_next(cache, torch.zeros(2, 0, dtype=torch.long))
        model.decode_next(cache, torch.zeros(2, 1, dtype=torch.long))
        with pytest.raises(ValueError, match="already holds 2 positions"):
            model.decode_next(cache, torch.zeros(2, 0, dtype=torch.long))
        with pytest.raises(ValueError, match="3-item sessions"):
            model.decode_next(cache, torch.zeros(2, 9, dtype=torch.long))
