"""The `tokenize` stage end to end on a tiny catalogue (hashing encoder: no model load)."""

import logging

import datasets
import numpy as np
import pytest
import torch

from onerec.config import ConfigError, load_config
from onerec.data.splits import training_item_counts
from onerec.data.prepared import load_prepared
from onerec.stages.data import main as data_main
from onerec.tokenizer import embed as embed_module
from onerec.tokenizer.semantic_ids import SemanticIds
from onerec.stages.tokenize import main
from onerec.tokenizer.trie import build_trie

WORDS = ["lipstick", "gloss", "shampoo", "conditioner", "serum", "mascara", "brush", "soap", "lotion", "nail"]


def _write_items(out_dir, num_items: int) -> None:
    texts = [f"{WORDS[i % len(WORDS)]} {WORDS[(3 * i + 1) % len(WORDS)]} item {i}" for i in range(num_items)]
    items = datasets.Dataset.from_dict(
        {
            "item_index": list(range(num_items)),
            "raw_id": [f"raw{i}" for i in range(num_items)],
            "title": texts,
            "text": texts,
        }
    )
    items.save_to_disk(str(out_dir / "data" / "items"))


def _config(out_dir, *overrides):
    base = [
        f"run.out_dir={out_dir}",
        "run.device=cpu",
        "run.seed=3",
        "tokenizer.encoder=hashing",
        "tokenizer.levels=2",
        "tokenizer.codebook_size=4",
        "tokenizer.kmeans_iters=5",
    ]
    return load_config(None, base + list(overrides))


def test_writes_balanced_unique_semantic_ids_and_logs_statistics(tmp_path, caplog):
    _write_items(tmp_path, 40)
    with caplog.at_level(logging.INFO, logger="onerec.tokenizer"):
        out = main(_config(tmp_path))
    assert out == tmp_path / "semantic_ids"
    sid = SemanticIds.load(out)
    assert sid.codes.shape == (40, 3) and sid.semantic_levels == 2
    assert sid.codebook_sizes[:2] == [4, 4] and sid.codebook_sizes[2] == int(sid.codes[:, 2].max()) + 1
    for level in range(2):
        assert torch.bincount(sid.codes[:, level], minlength=4).tolist() == [10, 10, 10, 10]
    assert len({tuple(r) for r in sid.codes.tolist()}) == 40
    assert sid.stats["collision_rate_before_dedup"] > 0  # 40 items, 16 tuples: collisions are certain
    assert build_trie(sid.codes, sid.codebook_sizes).num_items() == 40
    messages = caplog.text
    assert "level 0: utilization 1.000" in messages and "collision rate before dedup" in messages
    assert (out / "cache" / "embeddings.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_rerun_is_deterministic_and_reuses_the_embedding_cache(tmp_path, monkeypatch):
    _write_items(tmp_path, 24)
    first = SemanticIds.load(main(_config(tmp_path))).codes

    def must_not_run(texts):
        raise AssertionError("embeddings recomputed despite the cache")

    monkeypatch.setattr(embed_module, "_hashing_vectors", must_not_run)
    second = SemanticIds.load(main(_config(tmp_path))).codes
    assert torch.equal(first, second)


def test_without_dedup_collisions_are_an_error(tmp_path):
    _write_items(tmp_path, 10)
    with pytest.raises(ValueError, match="tokenizer.dedup=true"):
        main(_config(tmp_path, "tokenizer.levels=1", "tokenizer.dedup=false"))
    assert not (tmp_path / "semantic_ids" / "semantic_ids.json").exists()


def test_without_dedup_and_no_collisions_the_codes_are_the_semantic_levels(tmp_path):
    _write_items(tmp_path, 8)
    cfg = _config(tmp_path, "tokenizer.levels=2", "tokenizer.codebook_size=8", "tokenizer.dedup=false")
    sid = SemanticIds.load(main(cfg))
    assert sid.codes.shape == (8, 2) and sid.codebook_sizes == [8, 8]


def test_a_catalogue_smaller_than_the_codebook_is_a_clear_error(tmp_path):
    _write_items(tmp_path, 6)
    with pytest.raises(ValueError, match="tokenizer.codebook_size to at most 6"):
        main(_config(tmp_path, "tokenizer.codebook_size=8"))


def test_missing_data_stage_output_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="onerec data"):
        main(_config(tmp_path))


def test_dedup_in_popularity_order_follows_the_training_counts(tmp_path):
    # Item k is taken by min(k + 1, 10) users (counts differ, some tie); each user's last two
    # items are the held-out targets, which must not count.
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = ["user,item,ts"]
    for user in range(10):
        items = [k for k in range(12) if k >= user] + [12, 13]
        rows += [f"u{user},i{item},{t}" for t, item in enumerate(items)]
    (raw / "log.csv").write_text("\n".join(rows) + "\n")
    overrides = [
        "data.format=csv", f"data.root={raw}", "data.interactions_file=log.csv", "data.user_column=user",
        "data.item_column=item", "data.time_column=ts", "tokenizer.levels=1", "tokenizer.codebook_size=2",
    ]
    cfg = _config(tmp_path, *overrides, "tokenizer.dedup_order=popularity")
    data_main(cfg)
    sid = SemanticIds.load(main(cfg))
    counts = training_item_counts(load_prepared(tmp_path / "data").sequences, cfg.data, sid.num_items)
    assert counts[:12].min() < counts[:12].max()
    for group in np.unique(sid.codes[:, 0].numpy()):
        members = np.flatnonzero(sid.codes[:, 0].numpy() == group)
        ranked = sorted(members, key=lambda i: (-counts[i], i))
        assert sid.codes[ranked, 1].tolist() == list(range(len(members)))


def test_unknown_dedup_order_is_a_config_error():
    with pytest.raises(ConfigError, match="dedup_order"):
        load_config(None, ["tokenizer.dedup_order=random"])


@pytest.mark.parametrize("num_items, world, batch_size, expected", [
    (48, 2, 5, [0, 25, 48]),  # whole batches of 5: 10 batches, 5 per rank
    (48, 2, 256, [0, 24, 48]),  # fewer batches than ranks: an even split of the items
    (1000, 3, 100, [0, 300, 600, 1000]),
    (7, 7, 1, list(range(8))),
])
def test_sharded_ranks_hold_contiguous_item_slices_in_whole_embedding_batches(num_items, world, batch_size, expected):
    from onerec.stages.tokenize import item_bounds

    bounds = item_bounds(num_items, world, batch_size)
    assert bounds == expected
    sizes = np.diff(bounds)
    assert (sizes > 0).all()
    if num_items >= world * batch_size:  # every slice but the last starts a new batch
        assert all(b % batch_size == 0 for b in bounds[:-1])
