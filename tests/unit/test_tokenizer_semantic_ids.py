"""Dedup level, codebook statistics and the on-disk SemanticIds format."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onerec.errors import ConfigError
from onerec.run_dir import OUTPUT_MARKER
from onerec.tokenizer.semantic_ids import CODES_FILE, MANIFEST_FILE, META_FILE, SemanticIds, add_dedup_level, codebook_stats


def test_dedup_numbers_items_sharing_a_tuple_in_item_order():
    codes = torch.tensor([[0, 1], [0, 1], [2, 3], [0, 1], [2, 3], [1, 1]])
    deduped, size = add_dedup_level(codes)
    assert size == 3  # (0, 1) is shared by three items
    assert deduped.dtype == torch.int64
    assert torch.equal(deduped[:, :2], codes)
    assert deduped[:, 2].tolist() == [0, 1, 0, 2, 1, 0]


def test_dedup_by_priority_gives_code_zero_to_the_top_item_of_each_group_ties_in_item_order():
    codes = torch.tensor([[0, 1], [0, 1], [2, 3], [0, 1], [2, 3], [1, 1]])
    priority = [5, 9, 1, 5, 1, 0]  # group (0, 1): item 1 first, then items 0 and 3 tied
    deduped, size = add_dedup_level(codes, priority)
    assert size == 3
    assert torch.equal(deduped[:, :2], codes)
    assert deduped[:, 2].tolist() == [1, 0, 0, 2, 1, 0]


def test_dedup_priority_of_the_wrong_length_is_an_error():
    with pytest.raises(ValueError, match=r"priority_N must be \[N\]=3"):
        add_dedup_level(torch.tensor([[0], [0], [1]]), [1, 2])


def test_dedup_of_already_unique_tuples_is_a_zero_column_of_size_one():
    codes = torch.tensor([[0, 1], [1, 0], [1, 1]])
    deduped, size = add_dedup_level(codes)
    assert size == 1 and deduped[:, 2].tolist() == [0, 0, 0]


@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(0, 2), min_size=2, max_size=2), min_size=1, max_size=40),
)
def test_dedup_always_gives_unique_tuples_and_the_largest_group_size(rows):
    codes = torch.tensor(rows)
    deduped, size = add_dedup_level(codes)
    tuples = [tuple(r) for r in deduped.tolist()]
    assert len(set(tuples)) == len(rows)
    groups = {}
    for row in rows:
        groups[tuple(row)] = groups.get(tuple(row), 0) + 1
    assert size == max(groups.values())
    assert int(deduped[:, -1].max()) == size - 1


def test_codebook_stats_on_a_hand_made_case():
    # level 0 uses codes {0, 1} of 4, evenly; level 1 uses {0, 1} of 2 as 1:3.
    codes = torch.tensor([[0, 0], [0, 1], [1, 1], [1, 1]])
    stats = codebook_stats(codes, [4, 2])
    level0, level1 = stats["per_level"]
    assert level0["utilization"] == 0.5
    assert level0["entropy"] == pytest.approx(1.0)
    assert level0["perplexity"] == pytest.approx(2.0)
    assert level1["utilization"] == 1.0
    h1 = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert level1["entropy"] == pytest.approx(h1)
    assert level1["perplexity"] == pytest.approx(2**h1)
    assert stats["collision_rate_before_dedup"] == 0.5  # (1, 1) is held by 2 of 4 items
    assert stats["max_items_per_tuple"] == 2
    assert stats["unique_tuples"] == 3


def test_codebook_stats_counts_every_member_of_a_colliding_group():
    codes = torch.tensor([[0], [0], [0], [1], [2]])
    stats = codebook_stats(codes, [4])
    assert stats["collision_rate_before_dedup"] == pytest.approx(3 / 5)
    assert stats["max_items_per_tuple"] == 3
    assert stats["per_level"][0]["utilization"] == 0.75


def test_codebook_stats_of_a_single_code_has_zero_entropy_and_no_collision_when_unique():
    stats = codebook_stats(torch.tensor([[3, 0], [3, 1]]), [4, 2])
    assert stats["per_level"][0]["entropy"] == 0.0
    assert stats["per_level"][0]["perplexity"] == 1.0
    assert stats["collision_rate_before_dedup"] == 0.0


def test_codebook_stats_rejects_codes_out_of_range_and_wrong_sizes():
    with pytest.raises(ValueError, match="codebook_size"):
        codebook_stats(torch.tensor([[0, 5]]), [4, 4])
    with pytest.raises(ValueError, match="2 codebook sizes for codes with 3 levels"):
        codebook_stats(torch.tensor([[0, 1, 2]]), [4, 4])


def test_round_trip(tmp_path):
    stats = codebook_stats(torch.tensor([[1, 2], [3, 4]]), [8, 8])
    ids = SemanticIds(torch.tensor([[1, 2, 0], [3, 4, 0]]), [8, 8, 1], 2, stats)
    ids.save(tmp_path / "sid")
    assert {p.name for p in (tmp_path / "sid").iterdir()} == {CODES_FILE, META_FILE, MANIFEST_FILE, OUTPUT_MARKER}
    loaded = SemanticIds.load(tmp_path / "sid")
    assert torch.equal(loaded.codes, ids.codes) and loaded.codes.dtype == torch.int64
    assert (loaded.codebook_sizes, loaded.semantic_levels, loaded.stats) == ([8, 8, 1], 2, stats)
    assert json.loads((tmp_path / "sid" / META_FILE).read_text())["semantic_levels"] == 2


def test_save_replaces_an_old_version_keeps_the_cache_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "sid"
    SemanticIds(torch.tensor([[0], [1]]), [2], 1).save(target)
    (target / "cache").mkdir()
    (target / "cache" / "embeddings.safetensors").write_bytes(b"x")
    SemanticIds(torch.tensor([[1], [0], [2]]), [3], 1).save(target)
    assert SemanticIds.load(target).codes.tolist() == [[1], [0], [2]]
    assert (target / "cache" / "embeddings.safetensors").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sid"]


def test_save_never_replaces_a_directory_onerec_did_not_write(tmp_path):
    target = tmp_path / "sid"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not written by onerec"):
        SemanticIds(torch.tensor([[0], [1]]), [2], 1).save(target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sid"]  # no temporaries left


def test_load_of_a_missing_directory_says_which_command_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="onerec tokenize"):
        SemanticIds.load(tmp_path / "nothing")


def test_inconsistent_semantic_ids_are_rejected():
    with pytest.raises(ValueError, match="codebook sizes"):
        SemanticIds(torch.tensor([[0, 1]]), [2], 1)
    with pytest.raises(ValueError, match="semantic_levels"):
        SemanticIds(torch.tensor([[0, 1]]), [2, 2], 3)
    with pytest.raises(ValueError, match="integer"):
        SemanticIds(torch.tensor([[0.5]]), [2], 1)


def test_a_changed_or_damaged_codes_file_is_refused_on_load(tmp_path):
    """An edited code (still a valid value) or a broken header: a user error, never silently
    wrong items nor a traceback."""
    from safetensors.torch import save_file

    from onerec.errors import CorruptFileError

    SemanticIds(torch.tensor([[1, 2, 0], [3, 4, 0]]), [8, 8, 1], 2).save(tmp_path / "sid")
    save_file({"codes": torch.tensor([[1, 2, 0], [3, 5, 0]])}, str(tmp_path / "sid" / CODES_FILE))
    with pytest.raises(CorruptFileError, match="checksum mismatch|truncated"):
        SemanticIds.load(tmp_path / "sid")
    (tmp_path / "sid" / MANIFEST_FILE).unlink()  # as written by an older onerec
    (tmp_path / "sid" / CODES_FILE).write_bytes(b"\xff" * 64)
    with pytest.raises(CorruptFileError, match="unreadable semantic IDs"):
        SemanticIds.load(tmp_path / "sid")
