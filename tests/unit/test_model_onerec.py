"""OneRecModel: shapes, decode_step == teacher forcing, padding, causality, overfitting, determinism."""

import pytest
import torch

from onerec.config import ModelConfig, MoEConfig
from onerec.model.onerec import EncoderMemory, ModelOutput, OneRecModel, lookup_codes
from onerec.train.losses import next_token_loss

SIZES = [7, 5, 3]  # the last, small level plays the dedup level
L = len(SIZES)
C_MAX = max(SIZES)




def make_model(moe=True, session_len=2, dropout=0.0, user_buckets=0, seed=0, max_history=6):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        d_model=32, num_heads=4, encoder_layers=2, decoder_layers=2, d_ff=64, dropout=dropout,
        user_buckets=user_buckets, moe=MoEConfig(enabled=moe, num_experts=3, top_k=2),
    )
    return OneRecModel(cfg, SIZES, max_history=max_history, session_len=session_len)


def random_codes(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, s, (batch, length), generator=g) for s in SIZES], dim=-1)


@pytest.mark.parametrize("moe", [True, False])
def test_forward_shapes_and_masked_levels(moe):
    model = make_model(moe)
    out = model(random_codes(3, 6), random_codes(3, 2, seed=1))
    assert isinstance(out, ModelOutput)
    assert out.logits_BMLC.shape == (3, 2, L, C_MAX)
    assert out.logits_BMLC.dtype == torch.float32
    assert model.code_mask_LC.shape == (L, C_MAX) and model.code_mask_LC.dtype == torch.bool
    assert model.code_mask_LC.sum(-1).tolist() == SIZES
    for level, size in enumerate(SIZES):
        assert torch.isneginf(out.logits_BMLC[:, :, level, size:]).all()
        assert torch.isfinite(out.logits_BMLC[:, :, level, :size]).all()
    assert out.aux_loss.dim() == 0 and out.z_loss.dim() == 0
    if moe:
        assert out.expert_load.shape == (2, 3)  # decoder layers x experts
        torch.testing.assert_close(out.expert_load.sum(-1), torch.ones(2))
        assert 0 < out.aux_loss.item() < 2 * 3  # each layer's E * sum f_e P_e lies in (0, E]
        assert out.z_loss.item() > 0
        assert not out.expert_load.requires_grad
    else:
        assert out.expert_load.numel() == 0
        assert out.aux_loss.item() == 0.0 and out.z_loss.item() == 0.0


@pytest.mark.parametrize("moe", [True, False])
@pytest.mark.parametrize("user_buckets", [0, 5])
def test_decode_step_equals_forward_at_every_position(moe, user_buckets):
    model = make_model(moe, session_len=2, user_buckets=user_buckets).eval()
    history = random_codes(3, 6)
    history[0, :4] = -1  # left padding
    history[2] = -1  # a user with no history
    target = random_codes(3, 2, seed=1)
    user = torch.tensor([3, 11, -4]) if user_buckets else None
    with torch.no_grad():
        logits_BTC = model(history, target, user).logits_BMLC.reshape(3, 2 * L, C_MAX)
        memory = model.encode(history, user)
        flat_BT = target.reshape(3, -1)
        for t in range(2 * L):
            step_BC = model.decode_step(memory, flat_BT[:, :t])
            assert step_BC.shape == (3, C_MAX)
            size = SIZES[t % L]
            torch.testing.assert_close(step_BC[:, :size], logits_BTC[:, t, :size], atol=1e-5, rtol=1e-5)
            assert torch.isneginf(step_BC[:, size:]).all()


def test_decode_step_with_beams_matches_per_request_rows():
    model = make_model().eval()
    history = random_codes(2, 6)
    memory = model.encode(history)
    beams = memory.repeat_beams(3)
    assert beams.states_BSD.shape[0] == 6 and beams.pad_BS.shape[0] == 6
    torch.testing.assert_close(beams.states_BSD[3:6], memory.states_BSD[1:2].expand(3, -1, -1))
    generated = torch.tensor([[1, 2], [3, 0]]).repeat_interleave(3, dim=0)
    with torch.no_grad():
        a = model.decode_step(beams, generated)
        b = model.decode_step(memory, generated[::3])
    torch.testing.assert_close(a[::3], b, atol=1e-5, rtol=1e-5)


def test_padding_items_do_not_change_the_output():
    model = make_model().eval()
    history = random_codes(2, 6)
    history[:, :3] = -1
    target = random_codes(2, 2, seed=2)
    with torch.no_grad():
        base = model(history, target).logits_BMLC
        # right-aligned positions: the same real items without the padding slots
        torch.testing.assert_close(model(history[:, 3:], target).logits_BMLC, base, atol=1e-5, rtol=1e-5)
        # another row's history does not leak into this row
        other = history.clone()
        other[1] = random_codes(1, 6, seed=9)[0]
        torch.testing.assert_close(model(other, target).logits_BMLC[0], base[0], atol=1e-6, rtol=1e-6)
        memory = model.encode(history)
    assert memory.pad_BS[:, 1:4].all() and not memory.pad_BS[:, 4:].any()
    assert not memory.pad_BS[:, 0].any()  # the start token is always attendable


def test_history_content_matters():
    model = make_model().eval()
    target = random_codes(2, 2, seed=2)
    with torch.no_grad():
        a = model(random_codes(2, 6, seed=1), target).logits_BMLC
        b = model(random_codes(2, 6, seed=2), target).logits_BMLC
    assert not torch.allclose(a, b)


def test_logits_at_a_position_ignore_later_target_codes():
    model = make_model().eval()
    history = random_codes(2, 6)
    target = random_codes(2, 2, seed=3)
    flat = target.reshape(2, -1)
    size_T = torch.tensor(SIZES).repeat(2)
    with torch.no_grad():
        base = model(history, target).logits_BMLC.reshape(2, 2 * L, C_MAX)
        for t in range(2 * L - 1):
            changed = flat.clone()
            changed[:, t + 1:] = (changed[:, t + 1:] + 1) % size_T[t + 1:]
            # changing code t itself (the input at position t + 1) must not move logit t either
            changed[:, t] = (changed[:, t] + 1) % size_T[t]
            out = model(history, changed.view(2, 2, L)).logits_BMLC.reshape(2, 2 * L, C_MAX)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=1e-6)
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])


def test_empty_history_is_finite_forward_decode_and_backward():
    model = make_model(dropout=0.1)
    history = torch.full((2, 6, L), -1)
    target = random_codes(2, 2)
    out = model(history, target, None)
    loss, _ = next_token_loss(out.logits_BMLC, target, model.code_mask_LC)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        step = model.decode_step(model.encode(torch.full((2, 0, L), -1)), torch.zeros(2, 0, dtype=torch.long))
    assert torch.isfinite(step[:, : SIZES[0]]).all()


def test_user_token_changes_the_encoding_only_when_enabled():
    history = random_codes(1, 6)
    with torch.no_grad():
        model = make_model(user_buckets=7).eval()
        a = model.encode(history, torch.tensor([1])).states_BSD
        b = model.encode(history, torch.tensor([2])).states_BSD
        c = model.encode(history, torch.tensor([9])).states_BSD  # 9 % 7 == 2: same bucket
        assert not torch.allclose(a, b)
        torch.testing.assert_close(b, c)
        plain = make_model(user_buckets=0).eval()
        with_user = plain.encode(history, torch.tensor([1])).states_BSD
        torch.testing.assert_close(with_user, plain.encode(history).states_BSD)


def test_item_id_embedding_separates_items_with_equal_codes_and_is_required():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, num_heads=4, d_ff=64, dropout=0.0, item_id_embedding=True)
    model = OneRecModel(cfg, SIZES, max_history=4, session_len=1, num_items=10).eval()
    history = random_codes(1, 4)
    history[0, 0] = -1  # left padding
    items = torch.tensor([[-1, 3, 4, 5]])
    with torch.no_grad():
        a = model.encode(history, history_items_BS=items).states_BSD
        b = model.encode(history, history_items_BS=torch.tensor([[-1, 3, 4, 6]])).states_BSD
        pad_changed = model.encode(history, history_items_BS=torch.tensor([[7, 3, 4, 5]])).states_BSD
    assert not torch.allclose(a, b)  # same codes, another item id: another encoding
    torch.testing.assert_close(a[:, 2:], pad_changed[:, 2:])  # real positions never see the padded id
    with pytest.raises(ValueError, match="history_items_BS"):
        model.encode(history)
    with pytest.raises(ValueError, match="num_items"):
        OneRecModel(cfg, SIZES, max_history=4, session_len=1)


def test_padding_target_items_still_get_logits():
    model = make_model().eval()
    target = random_codes(2, 2)
    target[1, 1] = -1
    with torch.no_grad():
        logits = model(random_codes(2, 6), target).logits_BMLC
    assert torch.isfinite(logits[1, 1, 0, : SIZES[0]]).all()


def test_lookup_codes_any_leading_shape():
    codes_NL = torch.tensor([[1, 2, 0], [3, 4, 1]])
    out = lookup_codes(torch.tensor([[-1, 1, 0]]), codes_NL)
    assert out.tolist() == [[[-1, -1, -1], [3, 4, 1], [1, 2, 0]]]
    assert lookup_codes(torch.tensor([[[1]], [[-1]]]), codes_NL).shape == (2, 1, 1, 3)


def test_bad_inputs_raise_actionable_errors():
    model = make_model(session_len=1)
    with pytest.raises(ValueError, match="max_history"):
        model.encode(random_codes(1, 7))
    with pytest.raises(ValueError, match="one code per level"):
        model.encode(torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="session_len"):
        model(random_codes(1, 3), random_codes(1, 2))
    memory = model.encode(random_codes(2, 3))
    with pytest.raises(ValueError, match="1-item sessions"):
        model.decode_step(memory, torch.zeros(2, L, dtype=torch.long))
    with pytest.raises(ValueError, match="memory's rows"):
        model.decode_step(memory, torch.zeros(3, 0, dtype=torch.long))


def test_tiny_model_overfits_a_tiny_problem():
    model = make_model(session_len=2, seed=0)
    history = random_codes(8, 6, seed=4)
    history[:2, :3] = -1
    target = random_codes(8, 2, seed=5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        out = model(history, target)
        loss, _ = next_token_loss(out.logits_BMLC, target, model.code_mask_LC)
        opt.zero_grad()
        (loss + 0.01 * out.aux_loss).backward()
        opt.step()
    assert loss.item() < 0.05
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(history, target).logits_BMLC.argmax(-1), target)


def test_same_seed_same_model_and_same_training_step():
    def one_step(seed):
        model = make_model(dropout=0.2, seed=seed)
        torch.manual_seed(123)  # dropout masks
        out = model(random_codes(4, 6), random_codes(4, 2, seed=1))
        out.logits_BMLC.masked_fill(~model.code_mask_LC, 0).sum().backward()
        return model, out

    (a, out_a), (b, out_b) = one_step(3), one_step(3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name
    assert torch.equal(out_a.logits_BMLC, out_b.logits_BMLC)
    c, _ = one_step(4)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_dropout_is_active_in_training_only():
    model = make_model(dropout=0.5)
    history, target = random_codes(2, 6), random_codes(2, 2)
    a, b = model(history, target).logits_BMLC, model(history, target).logits_BMLC
    assert not torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(history, target).logits_BMLC, model(history, target).logits_BMLC)


def test_encoder_memory_is_a_plain_dataclass():
    memory = EncoderMemory(torch.randn(2, 3, 4), torch.tensor([[True, False, False], [False, False, False]]))
    rep = memory.repeat_beams(2)
    assert rep.pad_BS.tolist() == [[True, False, False]] * 2 + [[False, False, False]] * 2
