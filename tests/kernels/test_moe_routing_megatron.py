"""megatron-core as the oracle for MoE routing semantics (both our backends).

megatron.core.transformer.moe.moe_utils works on dense [T, E] maps where we keep [T, K] lists:

    topk_routing_with_score_function(logits, K, use_pre_softmax=P, score_function="softmax")
        -> routing_probs_TE (0 off the top k), routing_map_TE (bool)
           P=True : softmax over all E, then top k           = ours with normalize=False
           P=False: top k of the logits, softmax over those k = ours with normalize=True
                    (softmax over the k kept logits = p_k / sum of the k probs)
    permute(x, routing_map) -> x_perm, _, sorted_indices_Tk
        sorted_indices are TOKEN ids, expert-major, ascending token within an expert: the same
        row order as ours, and sorted_indices == our sorted_token_ids // K (a token never picks
        one expert twice, so the copy id adds nothing megatron needs).
    permute(x, routing_map, probs=routing_probs) also returns the gate weight of each row:
        == weights_TK.view(-1)[sorted_token_ids]
    unpermute(y_perm, sorted_indices, x.shape, probs=routing_probs, routing_map=routing_map)
        -> sum over each token's rows of weight * row (a scatter-add)   = our unpermute
"""

import pytest
import torch

pytest.importorskip("megatron.core")
moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")

from onerec.kernels.moe_routing import permute, topk_softmax_routing, unpermute  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
TOL = dict(atol=1e-5, rtol=1e-5)


def megatron_layer(logits, x, K, normalize, expert_scale):
    routing_probs, routing_map = moe_utils.topk_routing_with_score_function(
        logits, K, use_pre_softmax=not normalize, score_function="softmax"
    )
    x_perm, perm_probs, sorted_indices = moe_utils.permute(x, routing_map, probs=routing_probs)
    y_perm = x_perm * expert_scale.unsqueeze(-1)
    y = moe_utils.unpermute(y_perm, sorted_indices, x.shape, probs=routing_probs, routing_map=routing_map)
    return routing_probs, routing_map, x_perm, perm_probs, sorted_indices, y


def our_layer(logits, x, K, normalize, expert_scale, backend):
    E = logits.shape[1]
    weights, idx = topk_softmax_routing(logits, K, normalize, backend=backend)
    x_perm, ids, per_expert = permute(x, idx, E, backend=backend)
    y = unpermute(x_perm * expert_scale.unsqueeze(-1), ids, weights, x.shape[0], backend=backend)
    return weights, idx, x_perm, ids, per_expert, y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("T, E, K", [(1, 3, 1), (19, 6, 2), (37, 24, 2), (8, 5, 5)])
def test_routing_permute_unpermute_match_megatron(device, backend, normalize, T, E, K):
    g = torch.Generator().manual_seed(T * 10 + E)
    logits = torch.randn(T, E, generator=g).to(device)
    x = torch.randn(T, 12, generator=g).to(device)
    # Scale each row by a factor of its expert (rows are in the same order on both sides), so
    # the combine is not the identity and the gate receives a nonzero gradient.
    weights, idx = topk_softmax_routing(logits, K, normalize, backend=backend)
    per_expert = torch.bincount(idx.reshape(-1), minlength=E)
    expert_scale = torch.repeat_interleave(1.0 + 0.25 * torch.arange(E, device=device), per_expert)

    mg_logits, our_logits = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    mg_x, our_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    routing_probs, routing_map, mg_x_perm, mg_perm_probs, sorted_indices, mg_y = megatron_layer(
        mg_logits, mg_x, K, normalize, expert_scale
    )
    weights, idx, x_perm, ids, our_per_expert, y = our_layer(our_logits, our_x, K, normalize, expert_scale, backend)

    # gating: the same experts and weights, dense vs [T, K]
    assert torch.equal(routing_map, torch.zeros(T, E, dtype=torch.bool, device=device).scatter(1, idx, True))
    torch.testing.assert_close(routing_probs, torch.zeros(T, E, device=device).scatter(1, idx, weights), **TOL)
    # permute: the same rows in the same order; megatron names tokens, we name copies
    assert torch.equal(sorted_indices, ids // K)
    assert torch.equal(our_per_expert, routing_map.sum(dim=0))
    torch.testing.assert_close(x_perm, mg_x_perm, atol=0, rtol=0)
    torch.testing.assert_close(weights.reshape(-1)[ids], mg_perm_probs, **TOL)
    # unpermute: the same weighted combine
    torch.testing.assert_close(y, mg_y, **TOL)

    # backward through all three ops
    probe = torch.linspace(-1, 1, x.shape[1], device=device)
    (mg_y * probe).pow(2).sum().backward()
    (y * probe).pow(2).sum().backward()
    torch.testing.assert_close(our_x.grad, mg_x.grad, **TOL)
    torch.testing.assert_close(our_logits.grad, mg_logits.grad, **TOL)
