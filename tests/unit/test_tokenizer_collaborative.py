"""Collaborative item vectors (PPMI + SVD over the training sequences, or the SASRec baseline's
item embeddings) and their blend into the vectors the tokenizer quantises."""

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from onerec.baselines.sasrec import load_item_vectors
from onerec.config import ConfigError, load_config
from onerec.data.prepared import load_prepared
from onerec.data.splits import UserSequences
from onerec.stages.data import main as data_main
from onerec.stages.tokenize import main as tokenize_main
from onerec.tokenizer.collaborative import blend, cooccurrence_pairs, ppmi_svd_vectors
from onerec.tokenizer.item_vectors import blend_collaborative
from onerec.tokenizer.semantic_ids import SemanticIds


def _sequences(per_user: list[list[int]]) -> UserSequences:
    users = np.repeat(np.arange(len(per_user)), [len(s) for s in per_user])
    items = np.concatenate([np.asarray(s, dtype=np.int64) for s in per_user])
    return UserSequences.from_sorted(users, items, np.arange(len(items)), len(per_user))


def _block_walks(num_users: int, block: int, length: int, seed: int) -> list[list[int]]:
    """User u draws `length` distinct items from block u % 2 (items [0, block) or [block, 2 block))."""
    rng = np.random.default_rng(seed)
    return [list(rng.choice(block, size=length, replace=False) + (u % 2) * block) for u in range(num_users)]


def test_pairs_stay_inside_each_users_training_part_and_window():
    seqs = _sequences([[0, 1, 2, 3, 4], [5, 6, 7]])
    train_len = np.array([3, 2])  # user 0 trains on 0 1 2; user 1 on 5 6
    first, second = cooccurrence_pairs(seqs, train_len, window=1)
    assert sorted(zip(first.tolist(), second.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1), (5, 6), (6, 5)]
    first, second = cooccurrence_pairs(seqs, train_len, window=2)
    assert (0, 2) in set(zip(first.tolist(), second.tolist()))
    assert not {3, 4, 7} & set(first.tolist())  # held-out items never count


def test_items_used_together_end_up_closer_than_items_of_another_block():
    block = 10
    seqs = _sequences(_block_walks(200, block, 6, seed=0))
    vectors = ppmi_svd_vectors(seqs, seqs.lengths(), 2 * block, dim=4, window=3, seed=0)
    cosine = vectors @ vectors.T
    same = torch.block_diag(torch.ones(block, block), torch.ones(block, block)).bool()
    off_diagonal = ~torch.eye(2 * block, dtype=torch.bool)
    assert cosine[same & off_diagonal].mean() > cosine[~same].mean() + 0.5
    assert torch.allclose(vectors.norm(dim=1), torch.ones(2 * block), atol=1e-5)


def test_items_seen_only_after_the_training_part_get_zero_vectors_and_runs_repeat():
    seqs = _sequences([[0, 1, 2, 5], [1, 2, 0, 6], [2, 0, 1, 5]])
    vectors = ppmi_svd_vectors(seqs, seqs.lengths() - 1, 8, dim=2, window=2, seed=4)
    assert vectors.shape == (8, 2)
    assert vectors[[3, 4, 5, 6, 7]].abs().sum() == 0  # 5 and 6 are held-out targets, 3 4 7 never occur
    assert (vectors[[0, 1, 2]].norm(dim=1) > 0.99).all()
    assert torch.equal(vectors, ppmi_svd_vectors(seqs, seqs.lengths() - 1, 8, dim=2, window=2, seed=4))


def test_no_cooccurrence_at_all_is_a_clear_error():
    seqs = _sequences([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="no two items co-occur"):
        ppmi_svd_vectors(seqs, np.array([1, 1]), 4, dim=2, window=1, seed=0)


def test_blend_weights_the_squared_distances():
    g = torch.Generator().manual_seed(0)
    content, collaborative = torch.randn(5, 7, generator=g), torch.randn(5, 3, generator=g)
    blended = blend(content, collaborative, 0.25)
    assert blended.shape == (5, 10)
    unit_content = torch.nn.functional.normalize(content, dim=1)
    unit_collaborative = torch.nn.functional.normalize(collaborative, dim=1)
    expected = 0.75 * torch.cdist(unit_content, unit_content) ** 2 + 0.25 * torch.cdist(
        unit_collaborative, unit_collaborative
    ) ** 2
    assert torch.allclose(torch.cdist(blended, blended) ** 2, expected, atol=1e-5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        blend(content, collaborative, 1.5)


def test_config_rejects_a_weight_outside_zero_one():
    with pytest.raises(ConfigError, match="collaborative_weight"):
        load_config(None, ["tokenizer.collaborative_weight=2"])


def _write_block_log(raw, block: int) -> None:
    """Users stay inside one block of items, while item titles alternate between two words
    across the blocks: text groups items by parity, co-occurrence groups them by block."""
    raw.mkdir()
    rows = ["user,item,ts"]
    for user, items in enumerate(_block_walks(60, block, 6, seed=1)):
        rows += [f"u{user},i{item},{10 * user + t}" for t, item in enumerate(items)]
    (raw / "log.csv").write_text("\n".join(rows) + "\n")
    titles = ["item_id,title"] + [f"i{i},{['lipstick', 'shampoo'][i % 2]}" for i in range(2 * block)]
    (raw / "items.csv").write_text("\n".join(titles) + "\n")


def _block_config(tmp_path) -> list[str]:
    return [
        f"run.out_dir={tmp_path / 'run'}",
        "run.device=cpu",
        "data.format=csv",
        f"data.root={tmp_path / 'raw'}",
        "data.interactions_file=log.csv",
        "data.items_file=items.csv",
        "data.user_column=user",
        "data.item_column=item",
        "data.time_column=ts",
        "tokenizer.encoder=hashing",
        "tokenizer.levels=1",
        "tokenizer.codebook_size=2",
        "tokenizer.collaborative_dim=4",
    ]


def test_stage_with_full_collaborative_weight_splits_the_catalogue_by_use_not_by_text(tmp_path):
    block = 8
    _write_block_log(tmp_path / "raw", block)
    base = _block_config(tmp_path)
    data_main(load_config(None, base))
    raw_ids = [f"i{i}" for i in range(2 * block)]

    def first_level_by_raw_id(weight: str) -> dict[str, int]:
        # Codes come in item_index order; map them back to the raw ids of the log.
        sid = SemanticIds.load(tokenize_main(load_config(None, base + [f"tokenizer.collaborative_weight={weight}"])))
        items = datasets.load_from_disk(str(tmp_path / "run" / "data" / "items"))
        return dict(zip(items["raw_id"], sid.codes[:, 0].tolist()))

    def split_of(codes: dict[str, int], group) -> set[int]:
        return {codes[raw_ids[i]] for i in group}

    by_use = first_level_by_raw_id("1.0")
    assert len(split_of(by_use, range(block))) == 1 and len(split_of(by_use, range(block, 2 * block))) == 1
    assert split_of(by_use, range(block)) != split_of(by_use, range(block, 2 * block))
    by_text = first_level_by_raw_id("0.0")
    assert len(split_of(by_text, range(0, 2 * block, 2))) == 1  # every "lipstick" together


def _write_sasrec_weights(path, item_vectors_ND: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    padding_1D = torch.zeros(1, item_vectors_ND.shape[1])
    save_file({"item_emb.weight": torch.cat([padding_1D, item_vectors_ND]), "pos_emb.weight": torch.zeros(3, 4)}, str(path))


def test_stage_with_sasrec_source_quantises_the_baselines_item_embeddings(tmp_path):
    block = 8
    _write_block_log(tmp_path / "raw", block)
    base = _block_config(tmp_path) + ["tokenizer.collaborative_weight=1.0", "tokenizer.collaborative_source=sasrec"]
    data_main(load_config(None, base))
    items = datasets.load_from_disk(str(tmp_path / "run" / "data" / "items"))
    # Item embeddings that group raw ids 0, 1, 4, 5, ... apart from 2, 3, 6, 7, ...: neither the
    # text's grouping (parity) nor the co-occurrence one (first vs second half of the ids), so the
    # first-level codes can only follow them if the stage read them.
    raw_index = np.array([int(raw[1:]) for raw in items["raw_id"]])
    half_N = torch.as_tensor((raw_index // 2) % 2 == 0)
    noise_ND = 0.05 * torch.randn(len(raw_index), 4, generator=torch.Generator().manual_seed(0))
    vectors_ND = torch.where(half_N[:, None], torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])) + noise_ND
    _write_sasrec_weights(tmp_path / "run" / "baselines" / "sasrec" / "model.safetensors", vectors_ND)

    codes_N = SemanticIds.load(tokenize_main(load_config(None, base))).codes[:, 0]
    assert len(set(codes_N[half_N].tolist())) == 1 and len(set(codes_N[~half_N].tolist())) == 1
    assert set(codes_N[half_N].tolist()) != set(codes_N[~half_N].tolist())


def test_both_sources_count_equally_in_the_squared_distances(tmp_path):
    _write_block_log(tmp_path / "raw", 8)
    base = _block_config(tmp_path) + ["tokenizer.collaborative_weight=1.0"]
    data_main(load_config(None, base))
    sequences = load_prepared(tmp_path / "run" / "data").sequences
    sasrec_NC = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))

    def squared_distances(source: str) -> torch.Tensor:
        cfg = load_config(None, base + [f"tokenizer.collaborative_source={source}"])
        vectors = blend_collaborative(torch.zeros(16, 3), cfg, sequences, sasrec_NC)  # weight 1: content part is zero
        return torch.cdist(vectors, vectors).pow(2)

    both = squared_distances("cooccurrence+sasrec")
    torch.testing.assert_close(both, (squared_distances("cooccurrence") + squared_distances("sasrec")) / 2, atol=1e-5, rtol=0)
    assert both.max() > 0.5  # the items are really spread out, not all one point


def test_sasrec_source_without_the_baseline_names_the_command(tmp_path):
    _write_block_log(tmp_path / "raw", 8)
    base = _block_config(tmp_path) + ["tokenizer.collaborative_weight=0.5", "tokenizer.collaborative_source=sasrec"]
    data_main(load_config(None, base))
    with pytest.raises(FileNotFoundError, match="onerec baseline"):
        tokenize_main(load_config(None, base))
    assert not (tmp_path / "run" / "semantic_ids" / "codes.safetensors").exists()


def test_sasrec_vectors_of_another_catalogue_are_rejected(tmp_path):
    weights = tmp_path / "model.safetensors"
    _write_sasrec_weights(weights, torch.randn(7, 4))
    assert load_item_vectors(weights, 7).shape == (7, 4)
    with pytest.raises(ValueError, match=r"model.safetensors: item_emb.weight has shape \(8, 4\), expected \(11, D\)"):
        load_item_vectors(weights, 10)
    save_file({"other": torch.zeros(2)}, str(weights))
    with pytest.raises(ValueError, match="not a SASRec checkpoint"):
        load_item_vectors(weights, 7)


def test_config_knows_when_tokenize_needs_the_sasrec_baseline():
    assert not load_config(None, ["tokenizer.collaborative_source=sasrec"]).tokenizer.needs_sasrec  # weight 0
    assert not load_config(None, ["tokenizer.collaborative_weight=0.5"]).tokenizer.needs_sasrec
    both = ["tokenizer.collaborative_weight=0.5", "tokenizer.collaborative_source=sasrec"]
    assert load_config(None, both).tokenizer.needs_sasrec
    assert load_config(None, ["tokenizer.collaborative_weight=0.5", "tokenizer.collaborative_source=cooccurrence+sasrec"]).tokenizer.needs_sasrec
    with pytest.raises(ConfigError, match="tokenizer.collaborative_source='svd'"):
        load_config(None, ["tokenizer.collaborative_source=svd"])
