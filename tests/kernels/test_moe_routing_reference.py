"""The MoE routing reference against first principles and against megatron-core's semantics."""

import pytest
import torch

from onerec.kernels.moe_routing import permute, topk_softmax_routing, unpermute


@pytest.mark.parametrize("T, E, K", [(1, 3, 1), (7, 5, 2), (16, 6, 6), (33, 24, 2)])
def test_routing_permute_unpermute(T, E, K):
    g = torch.Generator().manual_seed(T * 100 + E)
    logits = torch.randn(T, E, generator=g)
    weights, idx = topk_softmax_routing(logits, K, normalize=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(T))
    probs = torch.softmax(logits, -1)
    assert torch.equal(idx, probs.topk(K, dim=-1).indices)

    x = torch.randn(T, 4, generator=g, requires_grad=True)
    x_perm, ids, per_expert = permute(x, idx, E)
    assert per_expert.tolist() == torch.bincount(idx.view(-1), minlength=E).tolist()
    experts_in_order = idx.view(-1)[ids]
    assert torch.equal(experts_in_order, experts_in_order.sort().values)  # grouped by expert
    y = unpermute(x_perm * 2.0, ids, weights, T)
    torch.testing.assert_close(y, 2.0 * x * weights.sum(-1, keepdim=True))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


def test_empty_batch():
    weights, idx = topk_softmax_routing(torch.zeros(0, 4), 2)
    x_perm, ids, per_expert = permute(torch.zeros(0, 3), idx, 4)
    assert x_perm.shape == (0, 3) and per_expert.tolist() == [0, 0, 0, 0]
    assert unpermute(x_perm, ids, weights, 0).shape == (0, 3)


def test_gate_weights_receive_gradients():
    logits = torch.randn(6, 4, requires_grad=True)
    weights, idx = topk_softmax_routing(logits, 2)
    x = torch.randn(6, 3)
    x_perm, ids, _ = permute(x, idx, 4)
    unpermute(x_perm, ids, weights, 6).pow(2).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_bad_backend_and_unbuilt_triton_are_clear():
    with pytest.raises(NotImplementedError, match="not built yet"):
        topk_softmax_routing(torch.randn(2, 3), 1, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        topk_softmax_routing(torch.randn(2, 3), 1, backend="cuda")
