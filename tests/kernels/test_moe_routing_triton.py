"""MoE routing: the Triton kernels against the PyTorch reference, forward and backward.

On a CPU machine the kernels run under TRITON_INTERPRET=1 (set in tests/conftest.py), so
sizes stay small; every test reruns on CUDA when one is present (bf16 there too).

Tolerances (float outputs; integer outputs must match exactly):
    fp32  atol 1e-5, rtol 1e-5   the same fp32 formulas, only summation orders differ
    bf16  atol 2e-2, rtol 2e-2   one bf16 rounding of each output (8 significant bits)
"""

import functools

import pytest
import torch

from onerec.kernels import moe_routing
from onerec.kernels.moe_routing import permute, topk_softmax_routing, topk_softmax_routing_with_counts, unpermute
from onerec.model.moe import MoEFeedForward

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
# (T, E, K): one token, E not a power of two, K = E, a block boundary (> 16 and > 64 tokens)
SHAPES = [(1, 3, 1), (7, 5, 2), (9, 6, 6), (70, 24, 2), (130, 7, 3)]


def dtypes_for(device):
    return [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])


def distinct_logits(T, E, g, dtype):
    """Random logits with no exact tie inside a row in any dtype (k/4 is exact in bf16 for k < 256):
    on a tie the top-k order is the implementation's choice, so parity would be luck."""
    perms = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]) if T else torch.zeros(0, E)
    return ((perms.float() - E / 2) / 4 + 0.01 * torch.rand(T, E, generator=g)).to(dtype)


def run_layer(backend, logits, x, K, E, normalize=True):
    """gating -> permute -> a different scale per expert -> unpermute -> a weighted loss; returns
    every forward output and the gradients of logits, x and the expert rows."""
    logits = logits.detach().clone().requires_grad_(True)
    x = x.detach().clone().requires_grad_(True)
    weights, idx, counts = topk_softmax_routing_with_counts(logits, K, normalize, backend=backend)
    x_perm, ids, per_expert = permute(x, idx, E, backend=backend)
    # Each expert scales its rows differently: with equal rows and renormalised weights the
    # combine would give back x and the gate gradient would vanish.
    expert_of_row = torch.repeat_interleave(torch.arange(E, device=x.device), per_expert)
    y_perm = (x_perm * (1.0 + 0.5 * expert_of_row).to(x.dtype).unsqueeze(-1)).detach().requires_grad_(True)
    y = unpermute(y_perm, ids, weights, x.shape[0], backend=backend)
    probe = torch.linspace(-1.0, 1.0, x.shape[1], device=x.device, dtype=x.dtype)
    # x reaches the loss only through permute's output, so x.grad tests permute's backward
    ((y.float() * probe.float()).sum() + (x_perm.float() * probe.float()).pow(2).sum()).backward()
    return dict(
        weights=weights.detach(), indices=idx, counts=counts, x_perm=x_perm.detach(), ids=ids,
        per_expert=per_expert, y=y.detach(), grad_logits=logits.grad, grad_x=x.grad, grad_y_perm=y_perm.grad,
    )


def assert_parity(ours, ref, dtype):
    for name in ref:
        a, r = ours[name], ref[name]
        assert a.dtype == r.dtype and a.shape == r.shape, (name, a.dtype, r.dtype, a.shape, r.shape)
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, r, **TOL[dtype], msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(a, r), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T, E, K", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_forward_and_backward_match_the_reference(device, T, E, K, normalize):
    for dtype in dtypes_for(device):
        g = torch.Generator().manual_seed(T * 31 + E * 7 + K)
        logits = distinct_logits(T, E, g, dtype).to(device)
        x = torch.randn(T, 67, generator=g).to(dtype).to(device)  # D = 67: a partial 64-column tile
        ours = run_layer("triton", logits, x, K, E, normalize)
        ref = run_layer("reference", logits, x, K, E, normalize)
        assert_parity(ours, ref, dtype)
        assert torch.equal(ours["counts"], ours["per_expert"])  # the fused histogram = permute's counts


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    logits = torch.randn(0, 5, device=device, requires_grad=True)
    x = torch.randn(0, 3, device=device, requires_grad=True)
    weights, idx, counts = topk_softmax_routing_with_counts(logits, 2, backend="triton")
    assert weights.shape == (0, 2) and idx.shape == (0, 2) and counts.tolist() == [0] * 5
    x_perm, ids, per_expert = permute(x, idx, 5, backend="triton")
    assert x_perm.shape == (0, 3) and ids.shape == (0,) and per_expert.tolist() == [0] * 5
    y = unpermute(x_perm, ids, weights, 0, backend="triton")
    assert y.shape == (0, 3)
    y.sum().backward()
    assert x.grad.shape == (0, 3) and logits.grad.shape == (0, 5)


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_runs_are_bitwise_identical(device):
    g = torch.Generator().manual_seed(5)
    logits, x = distinct_logits(70, 24, g, torch.float32).to(device), torch.randn(70, 40, generator=g).to(device)
    first = run_layer("triton", logits, x, 2, 24)
    for _ in range(2):
        again = run_layer("triton", logits, x, 2, 24)
        for name in first:
            assert torch.equal(first[name], again[name]), name


@pytest.mark.parametrize("device", DEVICES)
def test_skewed_routing_and_idle_experts(device):
    # every token picks experts 0 and 5 of 9: seven idle experts, one long segment each
    T, E = 40, 9
    logits = torch.full((T, E), -3.0).index_fill(1, torch.tensor([0, 5]), 2.0) + 0.01 * torch.arange(E)
    x = torch.randn(T, 8, generator=torch.Generator().manual_seed(2))
    ours = run_layer("triton", logits.to(device), x.to(device), 2, E)
    ref = run_layer("reference", logits.to(device), x.to(device), 2, E)
    assert_parity(ours, ref, torch.float32)
    assert ours["per_expert"].tolist() == [T, 0, 0, 0, 0, T, 0, 0, 0]


@pytest.mark.parametrize("device", DEVICES)
def test_moe_layer_forward_backward_with_triton_routing(device, monkeypatch):
    """The model's MoE FFN with its three routing calls swapped for the Triton backend."""
    import onerec.model.moe as moe_module

    torch.manual_seed(0)
    layer = MoEFeedForward(d_model=16, d_ff=24, num_experts=5, top_k=2, dropout=0.0).to(device)
    x = torch.randn(3, 7, 16, device=device)

    def grads(backend):
        for name in ("topk_softmax_routing_with_counts", "permute", "unpermute"):
            fn = getattr(moe_routing, name)
            monkeypatch.setattr(moe_module, name, functools.partial(fn, backend=backend))
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        y, aux = layer(xi)
        (y.pow(2).sum() + aux["aux_loss"] + aux["z_loss"]).backward()
        return [y.detach(), xi.grad] + [p.grad.clone() for p in layer.parameters()]

    for a, r in zip(grads("triton"), grads("reference")):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


def test_backend_dispatch():
    g = torch.Generator().manual_seed(3)
    logits, x = distinct_logits(6, 4, g, torch.float32), torch.randn(6, 3, generator=g)
    auto = topk_softmax_routing(logits, 2)
    ref = topk_softmax_routing(logits, 2, backend="reference")
    assert all(torch.equal(a, r) for a, r in zip(auto, ref))  # auto on a CPU tensor: the reference
    tri = topk_softmax_routing(logits, 2, backend="triton")
    torch.testing.assert_close(tri[0], ref[0])
    assert torch.equal(tri[1], ref[1])
    for backend in ("auto", "triton"):
        out = permute(x, ref[1], 4, backend=backend)
        assert torch.equal(out[1], permute(x, ref[1], 4, backend="reference")[1])
    with pytest.raises(ValueError, match="backend"):
        permute(x, ref[1], 4, backend="cuda")
    with pytest.raises(ValueError, match="top-k"):
        topk_softmax_routing(logits, 5, backend="triton")
    with pytest.raises(ValueError, match="same T"):
        permute(x[:2], ref[1], backend="triton")
    with pytest.raises(ValueError, match="expected"):
        unpermute(x, torch.arange(6), ref[0], 6, backend="triton")


def test_num_experts_defaults_to_the_largest_index():
    idx = torch.tensor([[0], [2]])
    assert permute(torch.randn(2, 3), idx, backend="triton")[2].tolist() == [1, 0, 1]
