"""bench/inference.py: a --quick run on a tiny export records every requested cell with
positive, finite numbers, and the T5 baseline answers with real, distinct items under the same
constraint as the trie (no timing is asserted)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
BENCH = TESTS.parent / "bench"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(TESTS))
import inference  # noqa: E402  (bench/ is not a package)
from catalogue_helpers import random_catalogue  # noqa: E402

from onerec.checkpoint import save_weights  # noqa: E402
from onerec.config import load_config  # noqa: E402
from onerec.export import build_model, export_model, load_export  # noqa: E402
from onerec.tokenizer.semantic_ids import SemanticIds  # noqa: E402

NUM_ITEMS, SIZES, MAX_HISTORY = 150, [8, 8, 4], 6


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny trained-looking export: MoE decoder, item-ID embedding, 150 items, 3 code levels."""
    root = tmp_path_factory.mktemp("bench_inference")
    cfg = load_config(None, [
        "model.d_model=16", "model.num_heads=2", "model.encoder_layers=1", "model.decoder_layers=1",
        "model.d_ff=32", "model.dropout=0.0", "model.item_id_embedding=true", "model.moe.num_experts=2",
        "model.moe.top_k=1", f"data.max_history={MAX_HISTORY}", "eval.beam_width=10", "eval.batch_size=16",
    ])
    semantic_ids = SemanticIds(random_catalogue(NUM_ITEMS, SIZES, seed=0), SIZES, len(SIZES))
    torch.manual_seed(0)
    model = build_model(cfg, semantic_ids)
    weights = root / "best" / "model.safetensors"
    save_weights(model, weights)
    raw_ids = [f"I{i}" for i in range(NUM_ITEMS)]
    return export_model(root / "export", weights, cfg, semantic_ids, raw_ids, raw_ids)


def _catalogue(export: Path) -> inference.Catalogue:
    exported = load_export(export)
    histories = inference.random_histories(NUM_ITEMS, 32, MAX_HISTORY, seed=1)
    return inference.Catalogue(
        name="beauty", model=exported.model, codes_NL=exported.semantic_ids.codes,
        codebook_sizes=list(exported.semantic_ids.codebook_sizes), trie=exported.trie, max_history=MAX_HISTORY,
        histories_RS=histories, histories="random", weights="test", config=exported.cfg,
    )


def test_quick_run_records_every_cell(export, tmp_path):
    systems = ["ours", "ours_nocache", "t5"]
    report = inference.main([
        "--export", str(export), "--quick", "--data-dir", "none", "--systems", ",".join(systems),
        "--batches", "1,3", "--beams", "10,12", "--test-users", "40", "--out", str(tmp_path), "--tag", "t", "--quiet",
    ])
    saved = json.loads((tmp_path / "inference_t.json").read_text())
    assert saved["catalogues"].keys() == report["catalogues"].keys() == {"beauty", "synthetic1m"}
    ran = systems if saved["kv_cache_available"] else ["ours_nocache", "t5"]
    for name, catalogue in saved["catalogues"].items():
        cells = {(c["system"], c["batch"], c["beam"]): c for c in catalogue["cells"]}
        assert set(cells) == {(s, b, w) for s in ran for b in (1, 3) for w in (10, 12)}, name
        for cell in cells.values():
            for key in ("requests_per_s", "p50_ms", "p99_ms", "mean_ms", "cpu_ms_per_request"):
                assert math.isfinite(cell[key]) and cell[key] > 0, (name, key, cell)
            assert cell["p99_ms"] >= cell["p50_ms"] and cell["batches"] >= 1
            assert cell["requests"] == cell["batches"] * cell["batch"]
        assert catalogue["checks"]["t5_answers_are_distinct_real_items"] is True
        assert {r["system"] for r in catalogue["ratios"]} == set(ran) - {"t5"}
        if not saved["kv_cache_available"]:
            assert [s["system"] for s in catalogue["skipped"]] == ["ours"]
    assert saved["catalogues"]["synthetic1m"]["items"] == 2_000
    assert saved["catalogues"]["beauty"]["items"] == NUM_ITEMS
    split = saved["test_split"]
    assert split["users"] == 40 and split["beam"] == 10 and split["batch_size"] == 16
    assert "random histories" in split["histories"]
    for system in set(ran) - {"t5"}:
        assert split[system]["seconds"] > 0 and split[system]["users"] == 40
    text = (tmp_path / "inference_t.md").read_text()
    assert saved["command"] in text and "## beauty" in text and "## synthetic1m" in text
    assert "Beauty's full test split decoded" in text and "| 3 | 12 | transformers T5 | " in text


def test_t5_answers_are_trie_items_and_its_constraint_is_the_trie(export):
    cat = _catalogue(export)
    t5 = inference.T5(cat, seed=0)
    # The Python prefix dict allows exactly the trie's children at every node.
    c_max = max(SIZES)

    def walk(node: int, key: tuple) -> None:
        codes, children = cat.trie.children(node)
        if not codes:
            assert key not in t5.table
            return
        level = len(key) - 1
        assert t5.table[key] == [inference.FIRST_CODE + level * c_max + c for c in codes]
        for code, child in zip(codes, children):
            walk(child, key + (inference.FIRST_CODE + level * c_max + code,))

    walk(0, (inference.DECODER_START,))
    assert len(t5.table) == cat.trie.num_nodes - NUM_ITEMS  # one entry per inner node

    histories = inference.trim_history(torch.from_numpy(cat.histories_RS[:5]))
    codes_BKL = t5.generate(histories, beam_width=20)
    assert codes_BKL.shape == (5, inference.TOP_K, len(SIZES))
    catalogue = {tuple(row) for row in cat.codes_NL.tolist()}
    for request in codes_BKL.tolist():
        assert all(tuple(codes) in catalogue for codes in request)
        assert len({tuple(codes) for codes in request}) == inference.TOP_K
    items = t5.run(histories, beam_width=20)
    assert items.shape == (5, inference.TOP_K) and ((items >= 0) & (items < NUM_ITEMS)).all()
    # ours answers the same shape from the same tensors
    ours = inference.Ours(cat, None).run(histories, beam_width=20)
    assert ours.shape == (5, inference.TOP_K) and (ours >= 0).all()


def test_tuples_to_items_refuses_unknown_and_repeated_items():
    item_of = {(0, 1): 0, (1, 0): 1, (1, 1): 2}
    good = torch.tensor([[[1, 1], [0, 1]], [[1, 0], [1, 1]]])
    assert inference.tuples_to_items(good, item_of).tolist() == [[2, 0], [1, 2]]
    with pytest.raises(ValueError, match=r"request 1, answer 0: code tuple \(0, 0\) is not an item"):
        inference.tuples_to_items(torch.tensor([[[1, 1], [0, 1]], [[0, 0], [1, 1]]]), item_of)
    with pytest.raises(ValueError, match="request 0: repeated items"):
        inference.tuples_to_items(torch.tensor([[[1, 1], [1, 1]]]), item_of)


def test_histories_are_right_aligned_and_batches_cut_to_their_longest():
    histories = inference.random_histories(500, 200, 20, seed=3)
    lengths = inference.history_lengths_of(histories)
    assert histories.shape == (200, 20) and lengths.min() >= 1 and lengths.max() <= 20
    for row, n in zip(histories, lengths):  # padding only on the left, real items after it
        assert (row[: 20 - n] == -1).all() and (row[20 - n:] >= 0).all() and (row < 500).all()
    assert np.array_equal(histories, inference.random_histories(500, 200, 20, seed=3))  # seeded
    real = np.array([4, 4, 7])
    drawn = inference.history_lengths(100, 5, np.random.default_rng(0), real)
    assert set(drawn.tolist()) <= {4, 5}  # drawn from the real lengths, capped at max_history

    batch = torch.tensor([[-1, -1, -1, 5, 6], [-1, -1, 2, 3, 4]])
    assert inference.trim_history(batch).tolist() == [[-1, 5, 6], [2, 3, 4]]
    assert inference.trim_history(torch.full((2, 4), -1)).shape == (2, 1)


def test_finds_the_run_data_from_the_export(tmp_path):
    run = tmp_path / "run"
    (run / "pretrain" / "export").mkdir(parents=True)
    assert inference.find_data_dir(run / "pretrain" / "export", None) is None
    (run / "data").mkdir()
    (run / "data" / "meta.json").write_text(json.dumps({"items": 3}))
    assert inference.find_data_dir(run / "pretrain" / "export", None) == run / "data"
    assert inference.find_data_dir(run / "pretrain" / "export", "none") is None
    elsewhere = tmp_path / "copied_export"
    elsewhere.mkdir()
    source = run / "pretrain" / "best" / "model.safetensors"
    (elsewhere / "manifest.json").write_text(json.dumps({"source": str(source)}))
    assert inference.find_data_dir(elsewhere, None) == run / "data"
    histories, why = inference.load_test_histories(run / "data", None, num_items=5, quiet=True)
    assert histories is None and "not the export's data" in why


def test_a_checkout_without_the_cache_runs_the_uncached_path_and_says_so(export, tmp_path, monkeypatch):
    monkeypatch.setattr(inference, "has_use_cache", lambda: False)
    saved = inference.main([
        "--export", str(export), "--quick", "--data-dir", "none", "--catalogues", "beauty",
        "--systems", "ours,ours_nocache", "--batches", "2", "--beams", "10", "--test-users", "0",
        "--out", str(tmp_path), "--tag", "t", "--quiet",
    ])
    beauty = saved["catalogues"]["beauty"]
    assert [(c["system"], c["batch"], c["beam"]) for c in beauty["cells"]] == [("ours_nocache", 2, 10)]
    assert beauty["skipped"][0]["system"] == "ours" and "use_cache" in beauty["skipped"][0]["reason"]
    assert "test_split" not in saved  # --test-users 0
    text = (tmp_path / "inference_t.md").read_text()
    assert "No KV cache in this checkout" in text and "Not run: ours (KV cache)" in text
