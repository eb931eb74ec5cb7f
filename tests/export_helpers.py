"""A tiny model export for the serving tests (tests/unit/test_recommender.py,
tests/integration/test_recommend_jsonl.py, tests/integration/test_serve.py): random weights
under a fixed seed, 12 items with two-level codes, a user token, written by export_model as
`onerec pretrain` writes one. Small enough to load and search in well under a second."""

from __future__ import annotations

from pathlib import Path

import torch

from onerec.checkpoint import save_weights
from onerec.config import load_config
from onerec.export import build_model, export_model
from onerec.tokenizer.semantic_ids import SemanticIds

NUM_ITEMS = 12
MAX_HISTORY = 4
USER_BUCKETS = 8
RAW_IDS = [f"B{i:03d}" for i in range(NUM_ITEMS)]
TITLES = [f"Title {i}" for i in range(NUM_ITEMS)]


def tiny_export(root: Path, user_buckets: int = USER_BUCKETS, raw_ids: list[str] = RAW_IDS) -> Path:
    """Write the export to root/export and return its path."""
    cfg = load_config(None, [
        "model.d_model=16", "model.num_heads=2", "model.encoder_layers=1", "model.decoder_layers=1",
        "model.d_ff=32", "model.dropout=0.0", f"model.user_buckets={user_buckets}",
        f"data.max_history={MAX_HISTORY}", "eval.beam_width=6", "eval.ks=[5]",
    ])
    codes = torch.tensor([[i // 4, i % 4] for i in range(NUM_ITEMS)])  # every (level-1, level-2) pair once
    semantic_ids = SemanticIds(codes, [4, 4], 2)
    torch.manual_seed(0)
    model = build_model(cfg, semantic_ids)
    with torch.no_grad():  # large random weights: distinct, history-dependent rankings
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    weights = root / "best" / "model.safetensors"
    save_weights(model, weights)
    return export_model(root / "export", weights, cfg, semantic_ids, list(raw_ids), TITLES)
