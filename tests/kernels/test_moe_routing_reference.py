"""The MoE routing reference against first principles (a per-expert Python loop as the oracle)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onerec.kernels.moe_routing import permute, topk_softmax_routing, unpermute


def loop_permute(x_TD, indices_TK, num_experts):
    """Oracle: for each expert in order, its tokens in token order (megatron's layout)."""
    rows, copies = [], []
    for e in range(num_experts):
        for t in range(indices_TK.shape[0]):
            for k in range(indices_TK.shape[1]):
                if indices_TK[t, k] == e:
                    rows.append(x_TD[t])
                    copies.append(t * indices_TK.shape[1] + k)
    return torch.stack(rows), torch.tensor(copies)


@pytest.mark.parametrize("T, E, K", [(1, 3, 1), (7, 5, 2), (16, 6, 6), (33, 24, 2)])
def test_routing_permute_unpermute(T, E, K):
    g = torch.Generator().manual_seed(T * 100 + E)
    logits = torch.randn(T, E, generator=g)
    weights, idx = topk_softmax_routing(logits, K, normalize=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(T))
    probs = torch.softmax(logits, -1)
    assert torch.equal(idx, probs.topk(K, dim=-1).indices)
    raw, raw_idx = topk_softmax_routing(logits, K, normalize=False)
    assert torch.equal(raw_idx, idx)
    torch.testing.assert_close(raw, probs.gather(-1, idx))

    x = torch.randn(T, 4, generator=g, requires_grad=True)
    x_perm, ids, per_expert = permute(x, idx, E)
    assert per_expert.tolist() == torch.bincount(idx.view(-1), minlength=E).tolist()
    oracle_rows, oracle_ids = loop_permute(x.detach(), idx, E)
    assert torch.equal(ids, oracle_ids)
    assert torch.equal(x_perm.detach(), oracle_rows)
    y = unpermute(x_perm * 2.0, ids, weights, T)
    torch.testing.assert_close(y, 2.0 * x * weights.sum(-1, keepdim=True))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


@settings(max_examples=25, deadline=None)
@given(T=st.integers(0, 12), E=st.integers(1, 6), data=st.data())
def test_round_trip_with_uniform_weights(T, E, data):
    K = data.draw(st.integers(1, E))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(E, generator=g)[:K] for _ in range(T)]
    idx = torch.stack(rows) if T else torch.zeros(0, K, dtype=torch.long)
    x = torch.randn(T, 3, generator=g)
    x_perm, ids, per_expert = permute(x, idx, E)
    assert per_expert.sum().item() == T * K and per_expert.shape == (E,)
    experts = idx.view(-1)[ids]
    assert torch.equal(experts, experts.sort(stable=True).values)  # grouped by expert
    for e in range(E):  # stable: token order inside each expert's segment
        tokens = (ids // K)[experts == e]
        assert torch.equal(tokens, tokens.sort().values)
    torch.testing.assert_close(unpermute(x_perm, ids, torch.full((T, K), 1.0 / K), T), x)


def test_unpermute_combines_with_the_right_weight_per_copy():
    x = torch.tensor([[1.0], [10.0]])
    idx = torch.tensor([[1, 0], [0, 1]])  # token 0: k=0 -> expert 1; token 1: k=0 -> expert 0
    weights = torch.tensor([[0.75, 0.25], [0.9, 0.1]])
    x_perm, ids, per_expert = permute(x, idx, 2)
    expert_scale = torch.tensor([[2.0], [2.0], [3.0], [3.0]])  # rows 0-1 are expert 0, rows 2-3 expert 1
    y = unpermute(x_perm * expert_scale, ids, weights, 2)
    # token 0: 0.75 * expert1 (x3) + 0.25 * expert0 (x2); token 1: 0.9 * expert0 + 0.1 * expert1
    torch.testing.assert_close(y, torch.tensor([[0.75 * 3 + 0.25 * 2], [10 * (0.9 * 2 + 0.1 * 3)]]))


def test_num_experts_defaults_to_the_largest_index():
    idx = torch.tensor([[0], [2]])
    assert permute(torch.randn(2, 3), idx)[2].tolist() == [1, 0, 1]
    assert permute(torch.randn(2, 3), idx, 5)[2].tolist() == [1, 0, 1, 0, 0]


def test_empty_batch():
    weights, idx = topk_softmax_routing(torch.zeros(0, 4), 2)
    x_perm, ids, per_expert = permute(torch.zeros(0, 3), idx, 4)
    assert x_perm.shape == (0, 3) and per_expert.tolist() == [0, 0, 0, 0]
    assert unpermute(x_perm, ids, weights, 0).shape == (0, 3)


def test_gate_weights_receive_gradients():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, requires_grad=True)
    weights, idx = topk_softmax_routing(logits, 2)
    x = torch.randn(6, 3, requires_grad=True)
    x_perm, ids, per_expert = permute(x, idx, 4)
    # Each expert must transform its rows differently: with identical copies and renormalised
    # weights the combine would return x itself and the gate gradient would be exactly zero.
    expert_of_row = torch.repeat_interleave(torch.arange(4), per_expert)
    y_perm = x_perm * (expert_of_row.float() + 1.0).unsqueeze(-1)
    unpermute(y_perm, ids, weights, 6).pow(2).sum().backward()
    assert logits.grad.abs().sum(dim=-1).gt(0).all(), "every token's router row needs a gradient"
    assert x.grad.abs().sum() > 0


def test_low_precision_inputs_keep_their_dtype_with_fp32_math():
    logits = torch.randn(5, 4).to(torch.bfloat16)
    weights, idx = topk_softmax_routing(logits, 2)
    assert weights.dtype == torch.bfloat16
    x = torch.randn(5, 8).to(torch.bfloat16)
    x_perm, ids, _ = permute(x, idx, 4)
    y = unpermute(x_perm, ids, weights, 5)
    assert y.dtype == torch.bfloat16
    expected = x.float() * weights.float().sum(-1, keepdim=True)
    torch.testing.assert_close(y.float(), expected, atol=2e-2, rtol=2e-2)


def test_bad_inputs_are_clear():
    # the Triton backend's dispatch and parity live in test_moe_routing_triton.py
    with pytest.raises(ValueError, match="backend"):
        topk_softmax_routing(torch.randn(2, 3), 1, backend="cuda")
    with pytest.raises(ValueError, match="top-k"):
        topk_softmax_routing(torch.randn(2, 3), 4)
    with pytest.raises(ValueError, match="same T"):
        permute(torch.randn(3, 2), torch.zeros(2, 1, dtype=torch.long))
    assert topk_softmax_routing(torch.randn(2, 3), 1, backend="reference")[1].shape == (2, 1)
