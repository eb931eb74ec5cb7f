"""The constrained beam step: the Triton kernel against the PyTorch reference, one step and a
whole decode.

On a CPU machine the kernel runs under TRITON_INTERPRET=1 (set in tests/conftest.py), so
sizes stay small; every test reruns on CUDA when one is present (bf16 logits there too).

Integer outputs (tokens, parents, states) must be equal. Scores may differ by the
log-softmax's summation order only: fp32 atol 1e-5, rtol 1e-5 (bf16 logits are read
exactly and the math is fp32, so the same tolerance holds).
"""

import functools

import pytest
import torch
from torch import nn

from onerec.inference.beam_search import constrained_beam_search
from onerec.inference.exhaustive import exhaustive_top_k
from onerec.kernels.constrained_beam import constrained_beam_step
from onerec.model.onerec import EncoderMemory, ModelOutput
from onerec.tokenizer.trie import build_trie
from catalogue_helpers import random_catalogue

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
NEG_INF = float("-inf")
TOL = dict(atol=1e-5, rtol=1e-5)

# node 0 (root): codes 0, 2 -> nodes 1, 2;  node 1: codes 1, 3 -> nodes 3, 4;
# node 2: ONE child, code 0 -> node 5;  nodes 3, 4, 5: leaves
CHILD_TOKENS = torch.tensor([[0, 2], [1, 3], [0, -1], [-1, -1], [-1, -1], [-1, -1]])
CHILD_NODES = torch.tensor([[1, 2], [3, 4], [5, -1], [-1, -1], [-1, -1], [-1, -1]])


def assert_same_step(ours, ref):
    tokens, parents, scores, states = ours
    r_tokens, r_parents, r_scores, r_states = ref
    assert torch.equal(tokens, r_tokens) and torch.equal(parents, r_parents) and torch.equal(states, r_states)
    assert scores.dtype == r_scores.dtype == torch.float32
    torch.testing.assert_close(scores, r_scores, **TOL)


def both_backends(*args, beam_width):
    ours = constrained_beam_step(*args, beam_width=beam_width, backend="triton")
    ref = constrained_beam_step(*args, beam_width=beam_width, backend="reference")
    return ours, ref


def random_step_inputs(B, W, sizes, num_items, seed, device, dtype=torch.float32):
    """A random trie over `num_items` tuples, beams at random nodes of any depth (some dead),
    logits with -inf beyond the smallest codebook (as the model masks codes a level lacks)."""
    g = torch.Generator().manual_seed(seed)
    trie = build_trie(random_catalogue(num_items, sizes, g), sizes)
    C = max(sizes)
    N = B * W
    logits = torch.randn(N, C, generator=g) * 3
    logits[:, min(sizes) :] = logits[:, min(sizes) :].masked_fill(torch.rand(N, 1, generator=g) < 0.3, NEG_INF)
    scores = (torch.randn(N, generator=g) - 2).masked_fill(torch.rand(N, generator=g) < 0.2, NEG_INF)
    states = torch.randint(-1, trie.num_nodes, (N,), generator=g)
    args = (logits.to(dtype), scores, states, *trie.dense_child_tables())
    return [t.to(device) for t in args]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "B, W, sizes, num_items",
    [
        (1, 1, [5, 3, 7], 20),  # a single beam
        (2, 3, [5, 3, 7], 20),
        (3, 7, [6, 4, 9, 2], 30),  # 4 levels, W not a power of two
        (2, 40, [5, 3, 7], 9),  # W larger than the number of candidates: dead beams at the end
        (1, 5, [37, 3], 60),  # a wide root (37 children, a partial 64 block)
    ],
)
def test_step_matches_the_reference(device, B, W, sizes, num_items):
    dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if device == "cuda" else [])
    for seed in range(3):
        for dtype in dtypes:
            args = random_step_inputs(B, W, sizes, num_items, seed, device, dtype)
            ours, ref = both_backends(*args, beam_width=W)
            assert_same_step(ours, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "B, W, sizes, num_items",
    [
        (3, 4, [6, 4, 9, 2], 30),
        (2, 9, [5, 3, 7], 20),  # W > the root's children: padded dead beams
        (1, 1, [5, 3, 7], 20),
    ],
)
def test_one_row_per_request_matches_the_reference(device, B, W, sizes, num_items):
    """The first step's form: R = 1 input row per request, W beams out."""
    for seed in range(3):
        args = random_step_inputs(B, 1, sizes, num_items, seed, device)
        ours = constrained_beam_step(*args, beam_width=W, backend="triton", rows_per_request=1)
        ref = constrained_beam_step(*args, beam_width=W, backend="reference", rows_per_request=1)
        assert ours[0].shape == (B * W,)
        assert_same_step(ours, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_one_child_node_and_more_beams_than_items(device):
    # request 0: a beam on node 2 (one child) and dead beams; request 1: the root, W = 4 > 2 children
    logits = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    scores = torch.tensor([-0.5, NEG_INF, 0.0, 1.0, 0.0, NEG_INF, NEG_INF, NEG_INF])
    states = torch.tensor([2, 0, -1, -1, 0, 0, 1, 1])
    args = [t.to(device) for t in (logits, scores, states, CHILD_TOKENS, CHILD_NODES)]
    ours, ref = both_backends(*args, beam_width=4)
    assert_same_step(ours, ref)
    tokens, parents, new_scores, new_states = ours
    assert tokens.tolist() == [0, -1, -1, -1] + sorted([0, 2], key=lambda c: -float(logits[4, c])) + [-1, -1]
    assert new_states[:4].tolist() == [5, -1, -1, -1]
    assert torch.isneginf(new_scores[[1, 2, 3, 6, 7]]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_exact_ties_go_to_the_lower_flat_index(device):
    # identical rows and scores: every candidate score appears W times; order = parent, then slot
    W = 3
    logits = torch.randn(1, 4, generator=torch.Generator().manual_seed(1)).expand(2 * W, 4).clone()
    roots = torch.zeros(2 * W, dtype=torch.long)
    args = [t.to(device) for t in (logits, torch.zeros(2 * W), roots, CHILD_TOKENS, CHILD_NODES)]
    ours, ref = both_backends(*args, beam_width=W)
    assert_same_step(ours, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    args = [
        torch.empty(0, 4, device=device),
        torch.empty(0, device=device),
        torch.empty(0, dtype=torch.long, device=device),
        CHILD_TOKENS.to(device),
        CHILD_NODES.to(device),
    ]
    ours, ref = both_backends(*args, beam_width=3)
    assert all(t.shape == (0,) for t in ours)
    assert_same_step(ours, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_runs_are_bitwise_identical(device):
    args = random_step_inputs(3, 7, [6, 4, 9, 2], 30, 11, device)
    first = constrained_beam_step(*args, beam_width=7, backend="triton")
    for _ in range(2):
        again = constrained_beam_step(*args, beam_width=7, backend="triton")
        assert all(torch.equal(a, b) for a, b in zip(first, again))


# ---------------------------------------------------------------------------------------------
# a whole decode: L steps of the search, triton vs reference vs exhaustive scoring
# ---------------------------------------------------------------------------------------------


class TinyModel(nn.Module):
    """The model <-> inference contract with deterministic math: logits depend on the request's
    history and on the whole generated prefix, and codes a level lacks get -inf."""

    def __init__(self, sizes, seed, dim=8):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.L, self.C = len(sizes), max(sizes)
        self.code_emb = nn.Parameter(torch.randn(self.L * self.C, dim, generator=g))
        self.head_LCD = nn.Parameter(torch.randn(self.L, self.C, dim, generator=g) * 2)
        self.register_buffer("code_mask_LC", torch.arange(self.C)[None, :] < torch.tensor(sizes)[:, None])

    def _embed(self, codes_xL):
        rows = codes_xL.clamp(min=0) + torch.arange(codes_xL.shape[-1], device=codes_xL.device) % self.L * self.C
        return self.code_emb[rows]

    def encode(self, history_codes_BSL, user_B=None, history_items_BS=None):
        summary_BD = torch.tanh(self._embed(history_codes_BSL).sum(dim=(1, 2)))
        return EncoderMemory(summary_BD.unsqueeze(1), torch.zeros(summary_BD.shape[0], 1, dtype=torch.bool))

    def decode_step(self, memory, generated_NT):
        T = generated_NT.shape[1]
        weights = torch.arange(1, T + 1, dtype=torch.float32, device=generated_NT.device).view(1, T, 1)
        hidden_ND = torch.tanh(memory.states_BSD[:, 0] + (self._embed(generated_NT) * weights).sum(dim=1))
        logits_NC = hidden_ND @ self.head_LCD[T % self.L].T
        return logits_NC.masked_fill(~self.code_mask_LC[T % self.L], NEG_INF)

    def forward(self, history_codes_BSL, target_codes_BML, user_B=None, history_items_BS=None):
        memory = self.encode(history_codes_BSL)
        B, M, L = target_codes_BML.shape
        flat = target_codes_BML.reshape(B, M * L)
        logits = torch.stack([self.decode_step(memory, flat[:, :t]) for t in range(M * L)], dim=1)
        zero = torch.zeros((), device=flat.device)
        return ModelOutput(logits.view(B, M, L, self.C), zero, zero, torch.zeros(0, 0))


def decode_with(backend, model, history, trie, W, monkeypatch):
    import onerec.inference.beam_search as beam_search_module

    step = functools.partial(constrained_beam_step, backend=backend)
    monkeypatch.setattr(beam_search_module, "constrained_beam_step", step)
    return constrained_beam_search(model, history, trie, W)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("W", [4, 16])  # 16 > 12 items: the search is exhaustive, with dead beams
def test_full_decode_matches_reference_and_exhaustive(device, W, monkeypatch):
    sizes = [4, 3, 5, 2]  # three code levels and a small dedup level
    g = torch.Generator().manual_seed(7)
    codes = random_catalogue(12, sizes, g)
    trie = build_trie(codes, sizes)
    model = TinyModel(sizes, seed=3).to(device).eval()
    history = torch.stack([random_catalogue(3, sizes, g) for _ in range(3)])  # B = 3 requests, S = 3

    ours = decode_with("triton", model, history, trie, W, monkeypatch)
    ref = decode_with("reference", model, history, trie, W, monkeypatch)
    assert torch.equal(ours.items_BW, ref.items_BW) and torch.equal(ours.codes_BWL, ref.codes_BWL)
    torch.testing.assert_close(ours.scores_BW, ref.scores_BW, **TOL)

    if W >= len(codes):  # every prefix survives: beam search = exhaustive scoring of the catalogue
        items, scores = exhaustive_top_k(model, history, codes, k=len(codes))
        assert torch.equal(ours.items_BW[:, : len(codes)], items)
        torch.testing.assert_close(ours.scores_BW[:, : len(codes)], scores, **TOL)
        assert (ours.items_BW[:, len(codes) :] == -1).all()
        assert torch.isneginf(ours.scores_BW[:, len(codes) :]).all()
