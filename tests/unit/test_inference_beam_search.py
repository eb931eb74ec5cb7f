"""Constrained beam search against the exhaustive reference, on small random models.

Two model families: a tiny fake that implements the model <-> inference contract with
plain deterministic math (so these tests pin the search, not the network), and the real
OneRecModel (dense and MoE).
"""

import pytest
import torch
from torch import nn

from onerec.config import ModelConfig, MoEConfig
from onerec.inference.beam_search import constrained_beam_search
from onerec.inference.exhaustive import exhaustive_top_k
from onerec.model.onerec import EncoderMemory, ModelOutput, OneRecModel
from onerec.tokenizer.trie import build_trie
from catalogue_helpers import random_catalogue


class FakeModel(nn.Module):
    """Contract-only model: logits = tanh(history summary + weighted prefix embeddings) @ head[level]."""

    def __init__(self, sizes: list[int], seed: int, dim: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.L, self.C = len(sizes), max(sizes)
        self.code_emb = nn.Parameter(torch.randn(self.L * self.C, dim, generator=g))
        self.user_emb = nn.Parameter(torch.randn(7, dim, generator=g))
        self.head_LCD = nn.Parameter(torch.randn(self.L, self.C, dim, generator=g) * 2)
        self.register_buffer("code_mask_LC", torch.arange(self.C)[None, :] < torch.tensor(sizes)[:, None])

    def _embed(self, codes_xL: torch.Tensor) -> torch.Tensor:
        rows = codes_xL.clamp(min=0) + torch.arange(codes_xL.shape[-1]) % self.L * self.C
        return self.code_emb[rows] * (codes_xL >= 0).unsqueeze(-1)

    def encode(self, history_codes_BSL, user_B=None, history_items_BS=None) -> EncoderMemory:
        summary_BD = torch.tanh(self._embed(history_codes_BSL).sum(dim=(1, 2)))
        if user_B is not None:
            summary_BD = summary_BD + self.user_emb[user_B % 7]
        B = history_codes_BSL.shape[0]
        return EncoderMemory(summary_BD.unsqueeze(1), torch.zeros(B, 1, dtype=torch.bool))

    def decode_step(self, memory: EncoderMemory, generated_BT: torch.Tensor) -> torch.Tensor:
        T = generated_BT.shape[1]
        weights_T = torch.arange(1, T + 1, dtype=torch.float32).view(1, T, 1)
        prefix_BD = (self._embed(generated_BT) * weights_T).sum(dim=1)
        hidden_BD = torch.tanh(memory.states_BSD[:, 0] + prefix_BD)
        logits_BC = hidden_BD @ self.head_LCD[T % self.L].T
        return logits_BC.masked_fill(~self.code_mask_LC[T % self.L], float("-inf"))

    def forward(self, history_codes_BSL, target_codes_BML, user_B=None, history_items_BS=None) -> ModelOutput:
        memory = self.encode(history_codes_BSL, user_B)
        B, M, L = target_codes_BML.shape
        flat_BT = target_codes_BML.reshape(B, M * L)
        logits = torch.stack([self.decode_step(memory, flat_BT[:, :t]) for t in range(M * L)], dim=1)
        zero = torch.zeros(())
        return ModelOutput(logits.view(B, M, L, self.C), zero, zero, torch.zeros(0, 0))


def real_model(sizes, seed, moe=True, user_buckets=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, num_heads=2, encoder_layers=1, decoder_layers=2, d_ff=48, dropout=0.0,
                      user_buckets=user_buckets, moe=MoEConfig(enabled=moe, num_experts=3, top_k=2))
    model = OneRecModel(cfg, sizes, max_history=5, session_len=1).eval()
    with torch.no_grad():
        for p in model.parameters():  # sharpen the distributions so ranks are not all near-ties
            p.mul_(3.0)
    return model


def make_model(kind, sizes, seed, user_buckets=0):
    if kind == "fake":
        return FakeModel(sizes, seed).eval()
    return real_model(sizes, seed, moe=(kind == "moe"), user_buckets=user_buckets)


def random_histories(codes, batch, seed):
    g = torch.Generator().manual_seed(seed + 1)
    items = torch.randint(0, len(codes), (batch, 5), generator=g)
    items[0, :3] = -1  # a short history (right-aligned: padding on the left)
    items[1] = -1  # no history at all
    history = codes[items.clamp(min=0)]
    return history.masked_fill((items < 0).unsqueeze(-1), -1)


# A catalogue whose trie has single-child nodes: (1,) -> (1, 2) -> (1, 2, 0), and (2, 3) -> (2, 3, 1).
SINGLE_CHILD_CODES = torch.tensor([[0, 0, 0], [0, 0, 1], [1, 2, 0], [2, 3, 1], [2, 1, 0], [0, 3, 1]])

CATALOGUES = [
    ([4, 4], lambda seed: random_catalogue(9, [4, 4], seed)),
    ([5, 3, 2], lambda seed: random_catalogue(17, [5, 3, 2], seed)),
    ([3, 6, 2, 2], lambda seed: random_catalogue(25, [3, 6, 2, 2], seed)),
    ([8, 1, 3], lambda seed: random_catalogue(10, [8, 1, 3], seed)),  # a level with a single code
    ([3, 4, 2], lambda seed: SINGLE_CHILD_CODES),
]


@pytest.mark.parametrize("kind", ["fake", "dense", "moe"])
@pytest.mark.parametrize("case", range(len(CATALOGUES)))
@pytest.mark.parametrize("seed", [0, 1])
def test_beam_search_equals_exhaustive_when_the_beam_covers_the_catalogue(kind, case, seed):
    sizes, make_codes = CATALOGUES[case]
    codes = make_codes(seed)
    N = len(codes)
    trie = build_trie(codes, sizes)
    model = make_model(kind, sizes, 10 * case + seed)
    history = random_histories(codes, 4, seed)
    out = constrained_beam_search(model, history, trie, beam_width=N)
    ref_items, ref_scores = exhaustive_top_k(model, history, codes, k=N)
    assert torch.equal(out.items_BW, ref_items)  # same items, same order
    # Beam search reads decode_step, exhaustive reads forward(): the same math, but the real
    # model's kernels group the work differently, so allow fp32 rounding relative to |score|.
    torch.testing.assert_close(out.scores_BW, ref_scores, atol=1e-5, rtol=1e-5)
    assert out.scores_BW.dtype == torch.float32 and out.items_BW.dtype == torch.int64
    assert torch.equal(out.codes_BWL, codes[out.items_BW])


@pytest.mark.parametrize("kind", ["fake", "moe"])
def test_beam_wider_than_the_catalogue_leaves_dead_beams(kind):
    sizes = [3, 4, 2]
    codes = SINGLE_CHILD_CODES
    trie = build_trie(codes, sizes)
    model = make_model(kind, sizes, 5)
    out = constrained_beam_search(model, random_histories(codes, 3, 5), trie, beam_width=10)
    assert out.items_BW.shape == (3, 10) and out.codes_BWL.shape == (3, 10, 3)
    live = out.items_BW >= 0
    assert live.tolist() == [[True] * 6 + [False] * 4] * 3
    assert torch.isneginf(out.scores_BW[~live]).all() and torch.isfinite(out.scores_BW[live]).all()
    assert (out.codes_BWL[~live] == -1).all()
    assert torch.equal(out.codes_BWL[live], codes[out.items_BW[live]])
    for row in out.items_BW[live].view(3, 6).tolist():
        assert sorted(row) == list(range(6))


@pytest.mark.parametrize("kind", ["fake", "moe"])
def test_narrow_beam_returns_distinct_valid_items_scored_exactly(kind):
    sizes = [6, 6, 3]
    codes = random_catalogue(60, sizes, 7)
    trie = build_trie(codes, sizes)
    model = make_model(kind, sizes, 7)
    history = random_histories(codes, 5, 7)
    out = constrained_beam_search(model, history, trie, beam_width=4)
    ref_items, ref_scores = exhaustive_top_k(model, history, codes, k=len(codes))
    assert (out.scores_BW[:, :-1] >= out.scores_BW[:, 1:]).all()
    for b, row in enumerate(out.items_BW.tolist()):
        assert len(set(row)) == 4 and min(row) >= 0
        # each beam's score is the exact log-prob of its item ...
        exact = {item: score for item, score in zip(ref_items[b].tolist(), ref_scores[b].tolist())}
        torch.testing.assert_close(out.scores_BW[b], torch.tensor([exact[i] for i in row]), atol=1e-5, rtol=1e-5)
    # ... so it can never beat the true best
    assert (out.scores_BW[:, 0] <= ref_scores[:, 0] + 1e-5).all()
    assert torch.equal(out.codes_BWL, codes[out.items_BW])


@pytest.mark.parametrize("kind", ["fake", "moe"])
def test_user_token_reaches_the_search(kind):
    sizes = [4, 3, 2]
    codes = random_catalogue(15, sizes, 3)
    trie = build_trie(codes, sizes)
    model = make_model(kind, sizes, 3, user_buckets=5)
    history = random_histories(codes, 3, 3)
    users = torch.tensor([0, 3, 4])
    out = constrained_beam_search(model, history, trie, beam_width=15, user_B=users)
    ref_items, ref_scores = exhaustive_top_k(model, history, codes, k=15, user_B=users)
    assert torch.equal(out.items_BW, ref_items)
    torch.testing.assert_close(out.scores_BW, ref_scores, atol=1e-5, rtol=1e-5)
    no_user = constrained_beam_search(model, history, trie, beam_width=15)
    assert not torch.allclose(no_user.scores_BW, out.scores_BW)


def test_each_request_is_independent_of_the_rest_of_the_batch():
    sizes = [5, 3, 2]
    codes = random_catalogue(20, sizes, 11)
    trie = build_trie(codes, sizes)
    model = make_model("moe", sizes, 11)
    history = random_histories(codes, 6, 11)
    together = constrained_beam_search(model, history, trie, beam_width=5)
    for b in range(6):
        alone = constrained_beam_search(model, history[b : b + 1], trie, beam_width=5)
        assert torch.equal(alone.items_BW[0], together.items_BW[b])
        torch.testing.assert_close(alone.scores_BW[0], together.scores_BW[b], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["fake", "moe"])
def test_excluded_items_never_come_out_and_every_other_item_still_does(kind):
    sizes = [5, 3, 2]
    codes = random_catalogue(20, sizes, 4)
    N = len(codes)
    trie = build_trie(codes, sizes)
    model = make_model(kind, sizes, 4)
    history = random_histories(codes, 3, 4)
    excluded = torch.tensor([[3, 3, 7, -1], [-1, -1, -1, -1], [0, 19, 5, 12]])  # a repeat, none, four
    out = constrained_beam_search(model, history, trie, beam_width=N, exclude_items_BX=excluded)
    for b in range(3):
        banned = {i for i in excluded[b].tolist() if i >= 0}
        live = [i for i in out.items_BW[b].tolist() if i >= 0]
        assert sorted(live) == sorted(set(range(N)) - banned)  # the beam covers the rest of the catalogue
        assert torch.isneginf(out.scores_BW[b, len(live):]).all()
    plain = constrained_beam_search(model, history, trie, beam_width=N)
    assert torch.equal(out.items_BW[1], plain.items_BW[1])  # nothing to exclude: nothing changes
    torch.testing.assert_close(out.scores_BW[1], plain.scores_BW[1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_prefix_whose_every_leaf_is_excluded_dies_without_nan(backend, monkeypatch):
    """Level 2 has 2 codes and prefix (0,) uses both: excluding both leaves leaves its row with
    no finite logit (a NaN log-softmax in the Triton kernel), which must kill the beam."""
    import functools

    import onerec.inference.beam_search as beam_search_module
    from onerec.kernels.constrained_beam import constrained_beam_step

    step = functools.partial(constrained_beam_step, backend=backend)
    monkeypatch.setattr(beam_search_module, "constrained_beam_step", step)
    sizes = [2, 2]
    codes = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    trie = build_trie(codes, sizes)
    model = make_model("fake", sizes, 2)
    history = random_histories(codes, 2, 2)
    out = constrained_beam_search(model, history, trie, beam_width=4, exclude_items_BX=torch.tensor([[0, 1], [0, 1]]))
    assert not torch.isnan(out.scores_BW).any()
    for row in out.items_BW.tolist():
        assert sorted(i for i in row if i >= 0) == [2, 3] and row[2:] == [-1, -1]


def test_masking_every_code_of_a_row_kills_its_beam_instead_of_leaving_no_finite_logit():
    from onerec.inference.beam_search import _mask_excluded_leaves

    sizes = [2, 2]
    trie = build_trie(torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]]), sizes)
    local_states, child_tokens, child_nodes = trie.step_tables(1, torch.tensor([1, 2]))  # prefixes (0,), (1,)
    logits, scores = _mask_excluded_leaves(
        torch.randn(2, 2), torch.tensor([-0.5, -0.7]), local_states, child_tokens, child_nodes, trie,
        torch.tensor([[0, 1], [0, 1]]),
    )
    assert torch.isfinite(logits[0]).all() and scores[0] == float("-inf")  # both leaves of (0,) excluded
    assert scores[1] == -0.7 and torch.isfinite(logits[1]).all()


@pytest.mark.parametrize("kind", ["fake", "moe"])
def test_exclusion_renormalises_only_among_the_siblings_of_excluded_items(kind):
    """An item whose last-level siblings are all allowed keeps its exact score; a sibling of
    an excluded item is scored given that the excluded one is not allowed (log-prob mass moved)."""
    sizes = [4, 3, 3]
    codes = random_catalogue(30, sizes, 8)
    trie = build_trie(codes, sizes)
    model = make_model(kind, sizes, 8)
    history = random_histories(codes, 2, 8)
    ref_items, ref_scores = exhaustive_top_k(model, history, codes, k=len(codes))
    excluded = ref_items[:, :2]  # each request's two best items
    out = constrained_beam_search(model, history, trie, beam_width=6, exclude_items_BX=excluded)
    for b in range(2):
        exact = dict(zip(ref_items[b].tolist(), ref_scores[b].tolist()))
        excluded_parents = {tuple(codes[i, :-1].tolist()) for i in excluded[b].tolist()}
        assert not set(out.items_BW[b].tolist()) & set(excluded[b].tolist())
        for item, score in zip(out.items_BW[b].tolist(), out.scores_BW[b].tolist()):
            if tuple(codes[item, :-1].tolist()) in excluded_parents:
                assert score > exact[item]  # its parent's probability is now shared by fewer leaves
            else:
                assert score == pytest.approx(exact[item], rel=1e-5, abs=1e-5)


def test_exhaustive_scores_are_teacher_forced_log_probs():
    """Exhaustive (via forward) against a per-item loop over decode_step: two code paths, one number."""
    sizes = [3, 2, 2]
    codes = random_catalogue(8, sizes, 2)
    model = make_model("moe", sizes, 2)
    history = random_histories(codes, 2, 2)
    items, scores = exhaustive_top_k(model, history, codes, k=8, chunk_rows=6)  # chunking across items
    with torch.inference_mode():
        memory = model.encode(history)
        for b in range(2):
            for item, score in zip(items[b].tolist(), scores[b].tolist()):
                total = 0.0
                for level in range(3):
                    prefix = codes[item, :level].view(1, -1)
                    mem_b = EncoderMemory(memory.states_BSD[b : b + 1], memory.pad_BS[b : b + 1])
                    log_p = torch.log_softmax(model.decode_step(mem_b, prefix)[0], dim=0)
                    total += float(log_p[codes[item, level]])
                # float32 sums of 3 log-probs; forward and decode_step batch the expert GEMMs differently
                assert total == pytest.approx(score, rel=1e-5, abs=5e-5)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_runs_in_inference_mode_and_rejects_bad_arguments():
    sizes = [3, 3]
    codes = random_catalogue(6, sizes, 0)
    trie = build_trie(codes, sizes)
    model = make_model("fake", sizes, 0)
    history = random_histories(codes, 2, 0)
    out = constrained_beam_search(model, history, trie, beam_width=3)
    assert out.scores_BW.is_inference()
    with pytest.raises(ValueError, match="beam_width"):
        constrained_beam_search(model, history, trie, beam_width=0)
    with pytest.raises(ValueError, match="code levels"):
        constrained_beam_search(model, history[:, :, :1], trie, beam_width=3)
    with pytest.raises(ValueError, match="exclude_items_BX"):
        constrained_beam_search(model, history, trie, beam_width=3, exclude_items_BX=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="k="):
        exhaustive_top_k(model, history, codes, k=0)
