"""The encoder-decoder and its MoE layer."""

import pytest
import torch

from onerec.config import ModelConfig, MoEConfig
from onerec.model.layers import FeedForward
from onerec.model.moe import LocalDispatcher, MoEFeedForward, Router
from onerec.model.onerec import OneRecModel, lookup_codes
from onerec.train.losses import next_token_loss

SIZES = [6, 5, 3]


def make_model(moe=True, session_len=2, dropout=0.0, user_buckets=0, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, num_heads=4, encoder_layers=2, decoder_layers=2, d_ff=64, dropout=dropout,
                      user_buckets=user_buckets, moe=MoEConfig(enabled=moe, num_experts=3, top_k=2))
    return OneRecModel(cfg, SIZES, max_history=6, session_len=session_len)


def random_codes(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, s, (batch, length), generator=g) for s in SIZES], dim=-1)


@pytest.mark.parametrize("moe", [True, False])
def test_decode_step_matches_teacher_forced_logits(moe):
    model = make_model(moe).eval()
    history = random_codes(3, 6)
    history[0, :4] = -1
    target = random_codes(3, 2, seed=1)
    logits = model(history, target).logits_BMLC.reshape(3, 6, -1)
    memory = model.encode(history)
    flat = target.reshape(3, -1)
    for t in range(6):
        step = model.decode_step(memory, flat[:, :t])
        level = t % 3
        torch.testing.assert_close(step[:, : SIZES[level]], logits[:, t, : SIZES[level]], atol=1e-5, rtol=1e-5)
        assert torch.isinf(step[:, SIZES[level]:]).all()


def test_padding_slots_do_not_change_the_output():
    model = make_model().eval()
    history = random_codes(2, 6)
    history[:, :3] = -1
    target = random_codes(2, 2, seed=2)
    base = model(history, target).logits_BMLC
    # a padded row is all -1 by contract; only the real items matter, wherever padding sits
    shorter = history[:, 3:]
    torch.testing.assert_close(model(shorter, target).logits_BMLC, base, atol=1e-5, rtol=1e-5)


def test_decoder_is_causal():
    model = make_model().eval()
    history = random_codes(2, 6)
    target = random_codes(2, 2, seed=3)
    changed = target.clone()
    changed[:, 1] = (changed[:, 1] + 1) % torch.tensor(SIZES)
    a = model(history, target).logits_BMLC
    b = model(history, changed).logits_BMLC
    torch.testing.assert_close(a[:, 0], b[:, 0])  # item 0's codes cannot see item 1
    torch.testing.assert_close(a[:, 1, 0], b[:, 1, 0])  # item 1's first code sees only item 0 + BOS
    assert not torch.allclose(a[:, 1, 1:], b[:, 1, 1:])


def test_empty_history_gives_finite_logits():
    model = make_model().eval()
    history = torch.full((2, 6, 3), -1)
    logits = model(history, random_codes(2, 2)).logits_BMLC
    assert torch.isfinite(logits[..., :3]).all()


def test_user_token_changes_the_encoding():
    model = make_model(user_buckets=7).eval()
    history = random_codes(1, 6)
    a = model.encode(history, torch.tensor([1])).states_BSD
    b = model.encode(history, torch.tensor([2])).states_BSD
    assert not torch.allclose(a, b)


def test_lookup_codes_maps_padding_to_minus_one():
    codes = torch.tensor([[1, 2], [3, 4]])
    out = lookup_codes(torch.tensor([[-1, 1, 0]]), codes)
    assert out.tolist() == [[[-1, -1], [3, 4], [1, 2]]]


def test_moe_with_all_experts_identical_equals_the_dense_ffn():
    torch.manual_seed(0)
    dense = FeedForward(8, 16, 0.0)
    moe = MoEFeedForward(8, 16, num_experts=3, top_k=3, dropout=0.0)
    with torch.no_grad():
        moe.experts.w1_EDF.copy_(dense.w1.weight.T.expand(3, -1, -1))
        moe.experts.w2_EFD.copy_(dense.w2.weight.T.expand(3, -1, -1))
    x = torch.randn(5, 7, 8)
    y, _ = moe(x)
    torch.testing.assert_close(y, dense(x), atol=1e-5, rtol=1e-5)


def test_moe_gradients_reach_router_and_experts():
    torch.manual_seed(1)
    moe = MoEFeedForward(8, 16, num_experts=4, top_k=2, dropout=0.0)
    y, aux = moe(torch.randn(10, 8))
    (y.pow(2).sum() + aux["aux_loss"]).backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0
    assert moe.experts.w1_EDF.grad.abs().sum() > 0
    assert aux["load_E"].sum().item() == pytest.approx(1.0)


def test_aux_loss_matches_a_hand_computed_value():
    router = Router(2, num_experts=2, top_k=1)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    out = router(x)
    probs = torch.softmax(x, dim=-1)
    fraction = torch.tensor([2 / 3, 1 / 3])  # tokens 0 and 2 go to expert 0
    expected = 2 * (fraction * probs.mean(0)).sum()
    torch.testing.assert_close(out.aux_loss, expected)
    torch.testing.assert_close(out.z_loss, torch.logsumexp(x, -1).pow(2).mean())
    assert out.indices_TK.view(-1).tolist() == [0, 1, 0]


def test_local_dispatcher_round_trip():
    dispatcher = LocalDispatcher(3)
    x = torch.randn(4, 5)
    idx = torch.tensor([[2, 0], [1, 2], [0, 1], [2, 1]])
    x_perm, per_expert, handle = dispatcher.dispatch(x, idx)
    assert per_expert.tolist() == [2, 3, 3]
    y = dispatcher.combine(x_perm, torch.full((4, 2), 0.5), handle)
    torch.testing.assert_close(y, x)


def test_tiny_model_overfits_a_tiny_problem():
    torch.manual_seed(0)
    model = make_model(session_len=1, seed=0)
    history = random_codes(8, 6, seed=4)
    target = random_codes(8, 1, seed=5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        out = model(history, target)
        loss, _ = next_token_loss(out.logits_BMLC, target, model.code_mask_LC)
        opt.zero_grad()
        (loss + 0.01 * out.aux_loss).backward()
        opt.step()
    assert loss.item() < 0.05
    model.eval()
    assert torch.equal(model(history, target).logits_BMLC.argmax(-1), target)


def test_same_seed_same_model():
    a, b = make_model(seed=3), make_model(seed=3)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
