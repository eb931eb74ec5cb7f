"""The flat-tensor prefix trie (STATIC, "Vectorizing the Trie")."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onerec.tokenizer.semantic_ids import add_dedup_level
from onerec.tokenizer.trie import Trie, build_trie


def _walk(trie: Trie, row: list[int]) -> int:
    node = 0
    for code in row:
        tokens, nodes = trie.children(node)
        assert code in tokens, f"code {code} missing under node {node}"
        node = nodes[tokens.index(code)]
    return node


def _all_paths(trie: Trie) -> list[tuple[tuple[int, ...], int]]:
    """Every root-to-depth-L path and the node_item at its end (depth-first over the padded rows)."""
    out, stack = [], [(0, ())]
    while stack:
        node, prefix = stack.pop()
        if len(prefix) == trie.depth:
            out.append((prefix, int(trie.node_item[node])))
            continue
        for token, child in zip(*trie.children(node)):
            stack.append((child, prefix + (token,)))
    return out


CODES = torch.tensor([[0, 2, 0], [0, 2, 1], [0, 1, 0], [3, 0, 0], [1, 1, 0]])


def test_every_item_is_walkable_to_its_own_leaf():
    trie = build_trie(CODES, [4, 3, 2])
    assert trie.depth == 3 and trie.codebook_sizes == [4, 3, 2]
    assert trie.num_items() == 5
    for item, row in enumerate(CODES.tolist()):
        assert int(trie.node_item[_walk(trie, row)]) == item


def test_every_path_is_a_real_item():
    trie = build_trie(CODES, [4, 3, 2])
    paths = _all_paths(trie)
    assert sorted(paths) == sorted((tuple(r), i) for i, r in enumerate(CODES.tolist()))


def test_layout_children_sorted_padding_branch_width_and_single_child():
    trie = build_trie(CODES, [4, 3, 2])
    # Distinct prefixes: root, depth 1 {0, 1, 3}, depth 2 {(0,1), (0,2), (1,1), (3,0)}, 5 leaves.
    assert trie.num_nodes == 1 + 3 + 4 + 5
    child_tokens, child_nodes = trie.dense_child_tables()
    assert child_tokens.shape == child_nodes.shape == (13, 3)  # B_max = 3 (the root)
    assert child_tokens.dtype == child_nodes.dtype == trie.node_item.dtype == torch.int64
    assert child_tokens[0].tolist() == [0, 1, 3]
    node_3 = int(child_nodes[0, 2])  # prefix (3,) has exactly one child, code 0
    assert child_tokens[node_3].tolist() == [0, -1, -1]
    assert trie.children(node_3) == ([0], [int(child_nodes[node_3, 0])])
    assert child_nodes[node_3, 1:].tolist() == [-1, -1]
    # Padding is aligned in both tables and children are ascending in every row.
    assert torch.equal(child_tokens < 0, child_nodes < 0)
    for row in child_tokens.tolist():
        real = [t for t in row if t >= 0]
        assert real == sorted(real) and row == real + [-1] * (len(row) - len(real))
    # Only leaves carry items, and leaves have no children.
    leaves = trie.node_item >= 0
    assert int(leaves.sum()) == 5
    assert bool((child_tokens[leaves] == -1).all())
    # The per-depth tables decoding reads are as wide as their own depth needs.
    assert [t.shape for t in trie.level_child_tokens] == [(1, 3), (3, 2), (4, 2)]


def test_a_single_item_is_a_chain():
    trie = build_trie(torch.tensor([[2, 1]]), [3, 2])
    assert trie.dense_child_tables()[0].shape == (3, 1) and trie.max_children == 1
    assert _all_paths(trie) == [((2, 1), 0)]


@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(0, 3), min_size=3, max_size=3), min_size=1, max_size=60),
)
def test_random_catalogues_round_trip_through_the_trie(rows):
    codes, dedup_size = add_dedup_level(torch.tensor(rows))
    trie = build_trie(codes, [4, 4, 4, dedup_size])
    assert trie.num_items() == len(rows)
    for item, row in enumerate(codes.tolist()):
        assert int(trie.node_item[_walk(trie, row)]) == item
    assert sorted(item for _, item in _all_paths(trie)) == list(range(len(rows)))
    # B_max is the widest node's number of distinct children.
    widths = (trie.dense_child_tables()[0] >= 0).sum(1)
    assert int(widths.max()) == trie.max_children


def test_duplicate_tuples_ask_for_the_dedup_level():
    with pytest.raises(ValueError, match="dedup"):
        build_trie(torch.tensor([[0, 1], [1, 0], [0, 1]]), [2, 2])


@pytest.mark.parametrize(
    "codes, sizes, match",
    [
        (torch.tensor([[0, 2]]), [2, 2], r"\[0, codebook_size\)"),
        (torch.tensor([[0, -1]]), [2, 2], r"\[0, codebook_size\)"),
        (torch.tensor([[0, 1]]), [2], "1 codebook sizes for 2"),
        (torch.zeros(0, 2, dtype=torch.long), [2, 2], "N, L >= 1"),
        (torch.tensor([[0.0, 1.0]]), [2, 2], "integer"),
    ],
)
def test_bad_codes_are_rejected(codes, sizes, match):
    with pytest.raises(ValueError, match=match):
        build_trie(codes, sizes)


def test_to_moves_every_table_and_keeps_metadata():
    trie = build_trie(CODES, [4, 3, 2])
    moved = trie.to("cpu")
    assert moved.depth == 3 and moved.codebook_sizes == [4, 3, 2]
    assert moved.depth_starts == trie.depth_starts and torch.equal(moved.node_item, trie.node_item)
    for d in range(trie.depth):
        assert torch.equal(moved.level_child_nodes[d], trie.level_child_nodes[d])
    if torch.cuda.is_available():
        on_gpu = trie.to("cuda")
        assert on_gpu.node_item.is_cuda and all(t.is_cuda for t in on_gpu.level_child_tokens + on_gpu.level_child_nodes)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3), st.integers(0, 4)), min_size=1, max_size=40, unique=True))
def test_per_depth_tables_hold_each_prefixs_next_codes_as_wide_as_the_widest_node_of_that_depth(rows):
    trie = build_trie(torch.tensor(rows), [6, 4, 5])
    starts = trie.depth_starts
    assert starts[0] == 0 and starts[1] == 1 and starts[-1] == trie.num_nodes and len(starts) == trie.depth + 2
    for d in range(trie.depth):
        # The oracle: the distinct codes that follow each length-d prefix among the rows.
        next_codes = {}
        for row in rows:
            next_codes.setdefault(tuple(row[:d]), set()).add(row[d])
        assert starts[d + 1] - starts[d] == len(next_codes) == trie.level_child_tokens[d].shape[0]
        width = max(len(codes) for codes in next_codes.values())
        assert trie.level_child_tokens[d].shape[1] == trie.level_child_nodes[d].shape[1] == width
        for prefix, codes in next_codes.items():
            row = _walk(trie, list(prefix)) - starts[d]
            expected = sorted(codes) + [-1] * (width - len(codes))
            assert trie.level_child_tokens[d][row].tolist() == expected
            nodes = trie.level_child_nodes[d][row]
            assert ((nodes >= 0) == (trie.level_child_tokens[d][row] >= 0)).all()
            real = nodes[nodes >= 0]
            assert ((real >= starts[d + 1]) & (real < starts[d + 2])).all()
    states = torch.tensor([-1, starts[1], starts[2] - 1])
    local, tokens, nodes = trie.step_tables(1, states)
    assert local.tolist() == [-1, 0, starts[2] - 1 - starts[1]] and tokens is trie.level_child_tokens[1]
