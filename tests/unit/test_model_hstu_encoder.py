"""model.encoder_block=hstu: the OneRec encoder built from HSTU blocks. Left padding changes
nothing at the real positions, it trains, the search works with and without the KV cache,
and the default encoder is untouched."""

import pytest
import torch

from onerec.config import ConfigError, ModelConfig, MoEConfig, load_config
from onerec.inference.beam_search import constrained_beam_search
from onerec.model.hstu import HSTUBlock, RelativeBias
from onerec.model.layers import EncoderLayer
from onerec.model.onerec import OneRecModel, lookup_codes
from onerec.tokenizer.trie import build_trie
from catalogue_helpers import random_catalogue

SIZES = [5, 4, 3]


def _model(block: str, seed: int = 0, num_items: int = 40) -> OneRecModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, num_heads=2, encoder_layers=2, decoder_layers=1, d_ff=64, dropout=0.1,
                      item_id_embedding=True, encoder_block=block, moe=MoEConfig(enabled=False))
    return OneRecModel(cfg, SIZES, max_history=6, session_len=1, num_items=num_items)


def test_the_hstu_encoder_is_made_of_hstu_blocks_and_the_default_is_unchanged():
    hstu, default = _model("hstu"), _model("transformer")
    assert all(isinstance(layer, HSTUBlock) for layer in hstu.encoder_layers)
    assert isinstance(hstu.encoder_bias, RelativeBias) and hstu.encoder_bias.bidirectional
    assert all(isinstance(layer, EncoderLayer) for layer in default.encoder_layers)
    assert not any(name.startswith("encoder_bias") for name in default.state_dict())
    with pytest.raises(ConfigError, match="model.encoder_block"):
        load_config(None, ["model.encoder_block=mamba"])


def test_left_padding_changes_nothing_at_the_real_positions():
    model = _model("hstu").eval()
    codes = random_catalogue(40, SIZES, 0)
    items = torch.tensor([[3, 17, 8]])
    padded = torch.cat([torch.full((1, 3), -1), items], dim=1)
    short = model.encode(lookup_codes(items, codes), history_items_BS=items).states_BSD
    full = model.encode(lookup_codes(padded, codes), history_items_BS=padded).states_BSD
    torch.testing.assert_close(full[:, [0, 4, 5, 6]], short, rtol=0, atol=1e-5)  # start token + the 3 items
    # and the relative bias does reach the states: another item order changes them
    swapped = model.encode(lookup_codes(items[:, [1, 0, 2]], codes), history_items_BS=items[:, [1, 0, 2]]).states_BSD
    assert not torch.allclose(swapped[:, -1], short[:, -1])


def test_it_learns_a_planted_next_item():
    """Target = a function of the history's last item: the loss must fall well below its start."""
    from onerec.train.losses import next_token_loss

    model = _model("hstu", seed=1)
    codes = random_catalogue(40, SIZES, 1)
    g = torch.Generator().manual_seed(0)
    history = torch.randint(0, 40, (64, 6), generator=g)
    target = ((history[:, -1] * 7 + 3) % 40).unsqueeze(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(120):
        output = model(lookup_codes(history, codes), lookup_codes(target, codes), history_items_BS=history)
        loss, _ = next_token_loss(output.logits_BMLC, lookup_codes(target, codes), model.code_mask_LC)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert model.encoder_layers[0].uvqk.weight.grad.abs().sum() > 0


def test_the_search_is_the_same_with_and_without_the_cache():
    model = _model("hstu", seed=2).eval()
    codes = random_catalogue(40, SIZES, 2)
    trie = build_trie(codes, SIZES)
    items = torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(2))
    items[1, :2] = -1
    runs = [constrained_beam_search(model, lookup_codes(items, codes), trie, 6, history_items_BS=items,
                                    use_cache=use_cache) for use_cache in (True, False)]
    assert torch.equal(runs[0].items_BW, runs[1].items_BW)
    torch.testing.assert_close(runs[0].scores_BW, runs[1].scores_BW, atol=1e-5, rtol=1e-5)
    assert (runs[0].items_BW >= 0).all()
