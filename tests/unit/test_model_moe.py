"""MoE layer: router losses, dispatcher seam, experts, equivalence with a dense FFN."""

import pytest
import torch

from onerec.model.layers import FeedForward
from onerec.model import moe as moe_module
from onerec.model.moe import Experts, LocalDispatcher, MoEFeedForward, Router


def test_grouped_gemm_experts_equal_the_per_expert_loop_forward_and_backward(monkeypatch):
    """The torch._grouped_mm path and the loop fallback, on the same rows (one expert empty)."""
    torch.manual_seed(4)
    experts = Experts(num_experts=4, d_model=8, d_ff=16, dropout=0.0)
    counts_E = torch.tensor([5, 0, 3, 6])
    x = torch.randn(14, 8)
    assert moe_module.grouped_mm_supported(x.device, x.dtype, experts.w1_EFD.transpose(1, 2).shape)
    results = []
    for grouped in (True, False):
        monkeypatch.setattr(moe_module, "grouped_mm_supported", lambda *_: grouped)
        experts.zero_grad()
        x_in = x.clone().requires_grad_()
        y = experts(x_in, counts_E)
        y.sum().backward()  # a broadcast gradient, which the grouped CPU backward must accept
        results.append((y.detach(), x_in.grad, experts.w1_EFD.grad.clone(), experts.w2_EDF.grad.clone()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert results[0][2][1].abs().sum() == 0  # the empty expert: present, zero gradient


def test_grouped_gemm_runs_under_bf16_autocast_and_matches_the_fp32_loop(monkeypatch):
    torch.manual_seed(5)
    experts = Experts(num_experts=3, d_model=16, d_ff=32, dropout=0.0)
    counts_E = torch.tensor([4, 7, 0])
    x = torch.randn(11, 16)
    calls = []
    real = moe_module._grouped_mm
    monkeypatch.setattr(moe_module, "_grouped_mm", lambda *a: calls.append(a[0].dtype) or real(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x, counts_E)
    assert calls == [torch.bfloat16, torch.bfloat16] and y.dtype == torch.bfloat16
    monkeypatch.setattr(moe_module, "grouped_mm_supported", lambda *_: False)
    torch.testing.assert_close(y.float(), experts(x, counts_E), atol=0.05, rtol=0.05)


def test_weights_saved_in_the_old_in_out_layout_still_load():
    torch.manual_seed(6)
    trained = MoEFeedForward(8, 16, num_experts=3, top_k=2, dropout=0.0)
    legacy = {k: v for k, v in trained.state_dict().items() if "experts" not in k}
    legacy["experts.w1_EDF"] = trained.experts.w1_EFD.detach().transpose(1, 2).clone()
    legacy["experts.w2_EFD"] = trained.experts.w2_EDF.detach().transpose(1, 2).clone()
    fresh = MoEFeedForward(8, 16, num_experts=3, top_k=2, dropout=0.0)
    fresh.load_state_dict(legacy, strict=True)
    x = torch.randn(5, 8)
    torch.testing.assert_close(fresh(x)[0], trained(x)[0], rtol=0, atol=0)


def test_grouped_gemm_is_used_only_where_torch_supports_it():
    cpu = torch.device("cpu")
    assert moe_module.grouped_mm_supported(cpu, torch.float32, (2, 8, 16))
    assert moe_module.grouped_mm_supported(cpu, torch.bfloat16, (2, 8, 16))
    assert not moe_module.grouped_mm_supported(cpu, torch.float32, (2, 6, 12))  # rows not 16-byte units
    assert not moe_module.grouped_mm_supported(cpu, torch.bfloat16, (2, 12, 16))  # 24 bytes a row
    assert not moe_module.grouped_mm_supported(cpu, torch.float64, (2, 8, 16))
    assert not moe_module.grouped_mm_supported(cpu, None, (2, 8, 16))  # operands of two dtypes
    x, w = torch.zeros(3, 8), torch.zeros(2, 8, 16)
    assert moe_module._matmul_dtype(x, w) == torch.float32
    assert moe_module._matmul_dtype(x.double(), w) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert moe_module._matmul_dtype(x, w) == torch.bfloat16


@pytest.mark.parametrize("num_experts", [1, 3])
def test_all_experts_identical_and_top_k_e_equals_dense_ffn(num_experts):
    torch.manual_seed(0)
    dense = FeedForward(8, 16, 0.0)
    moe = MoEFeedForward(8, 16, num_experts=num_experts, top_k=num_experts, dropout=0.0)
    with torch.no_grad():
        moe.experts.w1_EFD.copy_(dense.w1.weight.expand(num_experts, -1, -1))
        moe.experts.w2_EDF.copy_(dense.w2.weight.expand(num_experts, -1, -1))
    x = torch.randn(5, 7, 8)
    y, aux = moe(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, dense(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux["load_E"], torch.full((num_experts,), 1 / num_experts))


def test_top1_output_is_the_chosen_experts_ffn():
    torch.manual_seed(2)
    moe = MoEFeedForward(6, 12, num_experts=4, top_k=1, dropout=0.0)
    x = torch.randn(9, 6)
    y, _ = moe(x)
    chosen = moe.router.gate(x).argmax(-1)
    for t in range(9):
        e = chosen[t]
        expected = torch.nn.functional.gelu(x[t] @ moe.experts.w1_EFD[e].T) @ moe.experts.w2_EDF[e].T
        torch.testing.assert_close(y[t], expected, atol=1e-5, rtol=1e-5)  # renormalised top-1 weight is 1


def test_gradients_reach_router_and_every_used_expert():
    torch.manual_seed(1)
    moe = MoEFeedForward(8, 16, num_experts=4, top_k=2, dropout=0.0)
    y, aux = moe(torch.randn(32, 8))
    (y.pow(2).sum() + aux["aux_loss"] + aux["z_loss"]).backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0
    used = aux["load_E"] > 0
    assert (moe.experts.w1_EFD.grad.flatten(1).abs().sum(-1) > 0).eq(used).all()
    assert (moe.experts.w2_EDF.grad.flatten(1).abs().sum(-1) > 0).eq(used).all()
    assert aux["load_E"].sum().item() == pytest.approx(1.0)
    assert not aux["load_E"].requires_grad


def test_aux_and_z_loss_match_hand_computed_values():
    router = Router(2, num_experts=2, top_k=1)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(2))
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # logits = x
    out = router(x)
    assert out.indices_TK.view(-1).tolist() == [0, 1, 0]
    torch.testing.assert_close(out.weights_TK, torch.ones(3, 1))
    # P_0 = mean(softmax(x))[0]; f = (2/3, 1/3); aux = 2 * (f0 P0 + f1 P1), written out by hand
    p = [torch.tensor([2.0, 0.0]).softmax(0), torch.tensor([0.0, 1.0]).softmax(0), torch.tensor([1.0, 0.0]).softmax(0)]
    p0 = (p[0][0] + p[1][0] + p[2][0]) / 3
    p1 = (p[0][1] + p[1][1] + p[2][1]) / 3
    torch.testing.assert_close(out.aux_loss, 2 * (2 / 3 * p0 + 1 / 3 * p1))
    lse = [torch.log(torch.exp(torch.tensor(2.0)) + 1), torch.log(1 + torch.exp(torch.tensor(1.0))),
           torch.log(torch.exp(torch.tensor(1.0)) + 1)]
    torch.testing.assert_close(out.z_loss, sum(v**2 for v in lse) / 3)
    torch.testing.assert_close(out.load_E, torch.tensor([2 / 3, 1 / 3]))


def test_balanced_uniform_router_has_aux_loss_one():
    router = Router(4, num_experts=4, top_k=2)
    with torch.no_grad():
        router.gate.weight.zero_()
    out = router(torch.randn(8, 4))
    # uniform probs (1/E); topk of ties picks the same 2 experts: f = (1/2, 1/2, 0, 0) -> E * sum f P = 1
    torch.testing.assert_close(out.aux_loss, torch.tensor(1.0))
    torch.testing.assert_close(out.z_loss, torch.log(torch.tensor(4.0)) ** 2)


def test_local_dispatcher_round_trip():
    dispatcher = LocalDispatcher(3)
    x = torch.randn(4, 5)
    idx = torch.tensor([[2, 0], [1, 2], [0, 1], [2, 1]])
    x_perm, per_expert, handle = dispatcher.dispatch(x, idx)
    assert per_expert.tolist() == [2, 3, 3]
    # expert 0 gets tokens 0, 2; expert 1 tokens 1, 2, 3; expert 2 tokens 0, 1, 3 (token order)
    torch.testing.assert_close(x_perm, x[[0, 2, 1, 2, 3, 0, 1, 3]])
    torch.testing.assert_close(dispatcher.combine(x_perm, torch.full((4, 2), 0.5), handle), x)


def test_experts_run_each_expert_on_its_own_slice():
    torch.manual_seed(3)
    experts = Experts(3, 4, 8, dropout=0.0)
    x_perm = torch.randn(5, 4)
    counts = torch.tensor([2, 0, 3])  # an idle expert in the middle
    y = experts(x_perm, counts)
    gelu = torch.nn.functional.gelu
    torch.testing.assert_close(y[:2], gelu(x_perm[:2] @ experts.w1_EFD[0].T) @ experts.w2_EDF[0].T)
    torch.testing.assert_close(y[2:], gelu(x_perm[2:] @ experts.w1_EFD[2].T) @ experts.w2_EDF[2].T)


class RecordingDispatcher(LocalDispatcher):
    """Stands in for an all-to-all dispatcher: proves the MoE layer only talks through the seam."""

    def __init__(self, num_experts):
        super().__init__(num_experts)
        self.calls = []

    def dispatch(self, x_TD, topk_idx_TK):
        self.calls.append(("dispatch", x_TD.shape[0]))
        return super().dispatch(x_TD, topk_idx_TK)

    def combine(self, y_perm_TkD, topk_weight_TK, handle):
        self.calls.append(("combine", y_perm_TkD.shape[0]))
        return super().combine(y_perm_TkD, topk_weight_TK, handle)


def test_dispatcher_is_swappable_and_not_a_submodule():
    torch.manual_seed(4)
    moe = MoEFeedForward(8, 16, num_experts=4, top_k=2, dropout=0.0)
    reference, _ = moe(torch.ones(3, 5, 8))
    names = set(moe.state_dict())
    moe.dispatcher = RecordingDispatcher(4)
    y, _ = moe(torch.ones(3, 5, 8))
    assert moe.dispatcher.calls == [("dispatch", 15), ("combine", 30)]
    torch.testing.assert_close(y, reference)
    assert set(moe.state_dict()) == names


def test_bad_top_k_is_rejected():
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(8, 16, num_experts=2, top_k=3, dropout=0.0)
