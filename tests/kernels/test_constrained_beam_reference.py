"""The constrained beam step: hand-made cases, a per-candidate Python oracle, and dispatch."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onerec.kernels.constrained_beam import constrained_beam_step
from onerec.kernels.constrained_beam import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NEG_INF = float("-inf")

# A hand-made trie over codes in [0, 4):
#   node 0 (root): children code 0 -> node 1, code 2 -> node 2
#   node 1:        children code 1 -> node 3, code 3 -> node 4
#   node 2:        one child code 0 -> node 5
#   nodes 3, 4, 5: leaves
CHILD_TOKENS = torch.tensor([[0, 2], [1, 3], [0, -1], [-1, -1], [-1, -1], [-1, -1]])
CHILD_NODES = torch.tensor([[1, 2], [3, 4], [5, -1], [-1, -1], [-1, -1], [-1, -1]])


def log_probs(rows):
    return torch.tensor(rows, dtype=torch.float64).log().float()


@pytest.mark.parametrize("device", DEVICES)
def test_hand_made_step_two_requests_with_tie_and_dead_beam(device):
    # request 0: rows 0 (node 1, score -1) and 1 (node 2, score -2)
    # request 1: row 2 at the root (score 0) and row 3 dead (state -1) with tempting logits
    logits = log_probs([[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25], [0.97, 0.01, 0.01, 0.01]])
    logits = logits + torch.tensor([[3.0], [-1.0], [0.5], [0.0]])  # a per-row shift must not matter (log-softmax)
    scores = torch.tensor([-1.0, -2.0, 0.0, 5.0])
    states = torch.tensor([1, 2, 0, -1])
    args = [t.to(device) for t in (logits, scores, states, CHILD_TOKENS, CHILD_NODES)]
    tokens, parents, new_scores, new_states = constrained_beam_step(*args, beam_width=2)
    # request 0 candidates: row 0 code 1 (-1+ln .2), row 0 code 3 (-1+ln .4), row 1 code 0 (-2+ln .5)
    assert tokens.tolist() == [3, 1, 0, 2]
    assert parents.tolist() == [0, 0, 2, 2]
    assert new_states.tolist() == [4, 3, 1, 2]
    # request 1: two equal candidates (-ln 4); the lower flat index (child slot 0) comes first
    expected = torch.tensor([-1 + math.log(0.4), -1 + math.log(0.2), -math.log(4), -math.log(4)])
    torch.testing.assert_close(new_scores.cpu(), expected)
    assert new_scores.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_fewer_live_candidates_than_beams_gives_dead_beams(device):
    # one request, W = 3: row 0 at node 2 (a single child); row 1 has a finite score but state -1,
    # row 2 has a valid state but score -inf; both are dead and must not expand.
    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    scores = torch.tensor([-0.5, 0.0, NEG_INF])
    states = torch.tensor([2, -1, 1])
    args = [t.to(device) for t in (logits, scores, states, CHILD_TOKENS, CHILD_NODES)]
    tokens, parents, new_scores, new_states = constrained_beam_step(*args, beam_width=3)
    assert tokens.tolist() == [0, -1, -1]
    assert new_states.tolist() == [5, -1, -1]
    assert parents[0].item() == 0
    expected0 = -0.5 + torch.log_softmax(logits[0], dim=0)[0]
    torch.testing.assert_close(new_scores[0].cpu(), expected0)
    assert torch.isneginf(new_scores[1:]).all()


def test_leaf_beams_have_no_children():
    logits = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    tokens, _, scores, states = constrained_beam_step(
        logits, torch.zeros(2), torch.tensor([3, 4]), CHILD_TOKENS, CHILD_NODES, beam_width=2
    )
    assert tokens.tolist() == [-1, -1] and states.tolist() == [-1, -1] and torch.isneginf(scores).all()


def oracle_step(logits, scores, states, child_tokens, child_nodes, W):
    """Per-candidate Python loop: enumerate each request's candidates in flat order, sort, keep W."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    N, Bm = logits.shape[0], child_tokens.shape[1]
    out = []
    for b in range(N // W):
        cands = []
        for w in range(W):
            row = b * W + w
            s, node = float(scores[row]), int(states[row])
            for slot in range(Bm):
                if node < 0 or s == NEG_INF or int(child_tokens[node, slot]) < 0:
                    continue
                tok = int(child_tokens[node, slot])
                value = float(log_p[row, tok] + scores[row].float())  # the same fp32 add as the step
                if value == NEG_INF:  # a child the model gives zero probability is as good as absent
                    continue
                cands.append((-value, w * Bm + slot, tok, row, value, int(child_nodes[node, slot])))
        cands.sort()
        for i in range(W):
            out.append(cands[i][2:] if i < len(cands) else (-1, None, NEG_INF, -1))
    return out


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3),
    W=st.integers(1, 5),
    C=st.integers(1, 6),
    num_nodes=st.integers(1, 7),
    seed=st.integers(0, 10_000),
)
def test_step_matches_the_python_oracle(B, W, C, num_nodes, seed):
    g = torch.Generator().manual_seed(seed)
    Bm = int(torch.randint(1, C + 1, (1,), generator=g))
    child_tokens = torch.full((num_nodes, Bm), -1)
    child_nodes = torch.full((num_nodes, Bm), -1)
    for n in range(num_nodes):  # distinct ascending codes, a random number of children (maybe none)
        k = int(torch.randint(0, Bm + 1, (1,), generator=g))
        codes = torch.randperm(C, generator=g)[:k].sort().values
        child_tokens[n, :k] = codes
        child_nodes[n, :k] = torch.randint(0, num_nodes, (k,), generator=g)
    N = B * W
    logits = torch.randn(N, C, generator=g) * 3
    if C > 1:  # like codes beyond a level's codebook size: -inf logits (never a whole row)
        logits[:, C - 1 :] = logits[:, C - 1 :].masked_fill(torch.rand(N, 1, generator=g) < 0.2, NEG_INF)
    scores = torch.randn(N, generator=g).masked_fill(torch.rand(N, generator=g) < 0.2, NEG_INF)
    states = torch.randint(-1, num_nodes, (N,), generator=g)
    if int(torch.randint(0, 2, (1,), generator=g)):  # sometimes force exact ties between beams
        logits = logits[:1].expand(N, C).clone()
        scores = scores.masked_fill(torch.isfinite(scores), 0.0)

    tokens, parents, new_scores, new_states = constrained_beam_step(
        logits, scores, states, child_tokens, child_nodes, W
    )
    expected = oracle_step(logits, scores, states, child_tokens, child_nodes, W)
    for i, (tok, parent, value, node) in enumerate(expected):
        assert int(tokens[i]) == tok and int(new_states[i]) == node
        if parent is None:
            assert float(new_scores[i]) == NEG_INF
        else:
            assert int(parents[i]) == parent and float(new_scores[i]) == value
    # every request's beams come out sorted by score
    per_request = new_scores.view(B, W)
    assert (per_request[:, :-1] >= per_request[:, 1:]).all()


def test_step_needs_no_host_sync():
    """On the meta device any .item(), nonzero or boolean-mask indexing would raise."""
    meta = torch.device("meta")
    out = reference.constrained_beam_step(
        torch.empty(6, 5, device=meta),
        torch.empty(6, device=meta),
        torch.empty(6, dtype=torch.long, device=meta),
        torch.empty(4, 3, dtype=torch.long, device=meta),
        torch.empty(4, 3, dtype=torch.long, device=meta),
        beam_width=3,
    )
    assert [tuple(t.shape) for t in out] == [(6,)] * 4
    assert [t.dtype for t in out] == [torch.long, torch.long, torch.float32, torch.long]


def test_backend_dispatch():
    g = torch.Generator().manual_seed(3)
    args = (torch.randn(4, 4, generator=g), torch.zeros(4), torch.tensor([0, 1, 0, 2]), CHILD_TOKENS, CHILD_NODES, 2)
    auto = constrained_beam_step(*args)
    ref = constrained_beam_step(*args, backend="reference")
    for a, r in zip(auto, ref):
        assert torch.equal(a, r)
    # the Triton kernel agrees (under TRITON_INTERPRET=1 on a CPU machine); its own parity
    # tests are in test_constrained_beam_triton.py
    triton_out = constrained_beam_step(*args, backend="triton")
    for t, r in zip(triton_out, ref):
        if t.dtype.is_floating_point:
            torch.testing.assert_close(t, r)
        else:
            assert torch.equal(t, r)
    with pytest.raises(ValueError, match="backend"):
        constrained_beam_step(*args, backend="cuda")


def test_bad_inputs_raise_value_errors():
    logits, scores, states = torch.randn(5, 4), torch.zeros(5), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="multiple of rows_per_request=2"):
        constrained_beam_step(logits, scores, states, CHILD_TOKENS, CHILD_NODES, 2)
    with pytest.raises(ValueError, match="multiple of rows_per_request=3"):
        constrained_beam_step(logits, scores, states, CHILD_TOKENS, CHILD_NODES, 5, rows_per_request=3)
    with pytest.raises(ValueError, match="rows_per_request=0"):
        constrained_beam_step(logits, scores, states, CHILD_TOKENS, CHILD_NODES, 5, rows_per_request=0)
    with pytest.raises(ValueError, match="beam_width"):
        constrained_beam_step(logits, scores, states, CHILD_TOKENS, CHILD_NODES, 0)
    with pytest.raises(ValueError, match="int64"):
        constrained_beam_step(logits, scores, states.int(), CHILD_TOKENS, CHILD_NODES, 5)
    with pytest.raises(ValueError, match="child_tokens and child_nodes"):
        constrained_beam_step(logits, scores, states, CHILD_TOKENS, CHILD_NODES[:, :1], 5)


@pytest.mark.parametrize("W", [1, 2, 5])  # 5 > the root's two children: padded dead beams
def test_one_row_per_request_equals_w_rows_with_dead_copies(W):
    """rows_per_request=1 (the first decoding step) picks what the W-row form picks when only
    row 0 of each request is alive: same tokens, scores and states, parent row b instead of b * W."""
    g = torch.Generator().manual_seed(W)
    B = 3
    logits_B = torch.randn(B, 4, generator=g)
    one_row = constrained_beam_step(logits_B, torch.zeros(B), torch.zeros(B, dtype=torch.long),
                                    CHILD_TOKENS, CHILD_NODES, W, rows_per_request=1)
    scores_N = torch.full((B * W,), NEG_INF)
    scores_N[::W] = 0.0
    w_rows = constrained_beam_step(logits_B.repeat_interleave(W, dim=0), scores_N,
                                   torch.zeros(B * W, dtype=torch.long), CHILD_TOKENS, CHILD_NODES, W)
    tokens, parents, scores, states = one_row
    assert torch.equal(tokens, w_rows[0]) and torch.equal(states, w_rows[3])
    torch.testing.assert_close(scores, w_rows[2], rtol=0, atol=0)
    live = scores > NEG_INF
    assert live.sum() == B * min(W, 2)
    assert torch.equal(parents[live] * W, w_rows[1][live])
    assert torch.equal(parents, torch.arange(B).repeat_interleave(W))  # dead ones: the request's row too


@pytest.mark.parametrize("seed", range(6))
def test_cpu_fast_top_k_equals_the_exact_key_order_with_and_without_ties(seed):
    """top_by_score_then_index's float top-k shortcut against the all-keys path: distinct scores,
    heavy ties (values from a small set, -0.0 beside +0.0), and rows that are mostly -inf."""
    g = torch.Generator().manual_seed(seed)
    rows = [
        torch.randn(4, 300, generator=g),
        torch.randint(-3, 3, (4, 300), generator=g).float() * 0.5,
        torch.randn(4, 300, generator=g).masked_fill(torch.rand(4, 300, generator=g) < 0.97, NEG_INF),
        torch.tensor([[0.0, -0.0, 1.0, -0.0, 0.0, -1.0]]),
    ]
    for scores in rows:
        for k in (1, 3, min(50, scores.shape[1] - 1)):
            assert torch.equal(reference.top_by_score_then_index(scores, k), reference._top_by_keys(scores, k))
