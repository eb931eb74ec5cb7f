"""The prefix trie of valid semantic-ID tuples, as flat tensors.

Shape legend: N items, L code levels, Nn trie nodes, Nd nodes at depth d, Bd max children
of a depth-d node, Bm max children of any node.

Following STATIC ("Vectorizing the Trie", arXiv 2602.22647), each node's children are a
fixed-width row, so one decoding step gathers the rows of every beam's node at once with no
per-beam Python work:

    node 0 = root (depth 0); nodes are numbered depth by depth in lexicographic order, so
    depth-d nodes are the id range [depth_starts[d], depth_starts[d + 1])
    level_child_tokens[d][n - depth_starts[d]] = [codes of node n's children, ascending, -1 padding]
    level_child_nodes[d][n - depth_starts[d]]  = [their node ids,                          -1 padding]
    node_item[n] = item_index when n is a complete tuple (depth L), else -1

The tables are per depth because the root is as wide as a codebook while deeper nodes have a
handful of children: a table of every node as wide as the widest (Nn x Bm, 8 GB at a
million items and 256 codes) would be almost all padding. Per depth, a step's cost follows
the real branching and the tables together hold about one entry per trie edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Trie:
    node_item: torch.Tensor  # [Nn] int64
    depth: int
    codebook_sizes: list[int]
    depth_starts: list[int]  # depth-d node ids are [depth_starts[d], depth_starts[d + 1]); L + 2 entries
    level_child_tokens: list[torch.Tensor]  # [d]: [Nd, Bd] int64, d < L
    level_child_nodes: list[torch.Tensor]  # [d]: [Nd, Bd] int64, the same rows: global child node ids

    def to(self, device) -> "Trie":
        return Trie(
            self.node_item.to(device),
            self.depth,
            list(self.codebook_sizes),
            list(self.depth_starts),
            [t.to(device) for t in self.level_child_tokens],
            [t.to(device) for t in self.level_child_nodes],
        )

    def step_tables(self, depth: int, states_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(states relative to the depth's table, its child tokens, its child nodes) for beams at `depth`.

        Dead beams (-1) stay -1; live ones must sit on depth-`depth` nodes, as they do in a
        decode where every beam advances one level per step.
        """
        local_N = torch.where(states_N >= 0, states_N - self.depth_starts[depth], states_N)
        return local_N, self.level_child_tokens[depth], self.level_child_nodes[depth]

    def num_items(self) -> int:
        return int((self.node_item >= 0).sum())

    @property
    def num_nodes(self) -> int:
        return self.node_item.shape[0]

    @property
    def max_children(self) -> int:
        return max(t.shape[1] for t in self.level_child_tokens)

    def children(self, node: int) -> tuple[list[int], list[int]]:
        """(codes, node ids) of `node`'s children, ascending codes (a leaf has none)."""
        depth = int(np.searchsorted(self.depth_starts, node, side="right")) - 1
        if depth >= self.depth:
            return [], []
        row = node - self.depth_starts[depth]
        tokens = self.level_child_tokens[depth][row].tolist()
        nodes = self.level_child_nodes[depth][row].tolist()
        return [t for t in tokens if t >= 0], [n for n, t in zip(nodes, tokens) if t >= 0]

    def dense_child_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([Nn, Bm] child codes, [Nn, Bm] child node ids) of every node, -1 padded: the
        single-table layout, for tests and small tries only (see the module docstring)."""
        tokens = torch.full((self.num_nodes, self.max_children), -1, dtype=torch.long, device=self.node_item.device)
        nodes = torch.full_like(tokens, -1)
        for d in range(self.depth):
            rows = slice(self.depth_starts[d], self.depth_starts[d + 1])
            width = self.level_child_tokens[d].shape[1]
            tokens[rows, :width] = self.level_child_tokens[d]
            nodes[rows, :width] = self.level_child_nodes[d]
        return tokens, nodes


def build_trie(codes_NL: torch.Tensor, codebook_sizes: list[int]) -> Trie:
    """Vectorised build: sort tuples lexicographically, number each depth's distinct prefixes.

    Rows must be distinct full tuples (run `add_dedup_level` first); row i's leaf maps to item i.

        sorted rows      same_as_previous[:, 1..3] (prefix of length d repeats the row above)
        (0, 1, 0)        F F F   -> new nodes at depths 1, 2, 3
        (0, 2, 0)        T F F   -> new nodes at depths 2, 3 (parent: the depth-1 node above)
        (0, 2, 1)        T T F   -> new node at depth 3
    """
    if codes_NL.dim() != 2 or codes_NL.is_floating_point() or codes_NL.dtype == torch.bool:
        raise ValueError(f"expected integer codes of shape [N, L], got {codes_NL.dtype} {tuple(codes_NL.shape)}")
    codes = codes_NL.detach().cpu().numpy().astype(np.int64)
    N, L = codes.shape
    if N == 0 or L == 0:
        raise ValueError(f"cannot build a trie over codes of shape {tuple(codes.shape)}: need N, L >= 1")
    if len(codebook_sizes) != L:
        raise ValueError(f"{len(codebook_sizes)} codebook sizes for {L} code levels")
    if (codes < 0).any() or (codes >= np.asarray(codebook_sizes)).any():
        raise ValueError("codes must lie in [0, codebook_size) at every level")
    order = np.lexsort(codes.T[::-1])  # primary key: level 0
    rows = codes[order]
    same_as_previous = np.zeros((N, L + 1), dtype=bool)  # [:, d]: prefix of length d equals previous row's
    same_as_previous[1:, 0] = True  # the empty prefix (root) is shared by all
    same_as_previous[1:, 1:] = np.cumprod(rows[1:] == rows[:-1], axis=1).astype(bool)
    if same_as_previous[:, L].any():
        dup = order[np.flatnonzero(same_as_previous[:, L])[0]]
        raise ValueError(f"item {dup} shares its full code tuple with another item: add the dedup level first")

    parent_ids, tokens = [], []
    prefix_node_N = np.zeros(N, dtype=np.int64)  # node of each row's prefix at the previous depth
    next_id = 1
    depth_starts = [0, 1]
    for d in range(1, L + 1):
        new_N = ~same_as_previous[:, d]
        node_N = next_id + np.cumsum(new_N) - 1
        parent_ids.append(prefix_node_N[new_N])
        tokens.append(rows[new_N, d - 1])
        next_id += int(new_N.sum())
        depth_starts.append(next_id)
        prefix_node_N = node_N
    leaf_node_N = prefix_node_N

    parent = np.concatenate(parent_ids)  # parent of node 1, 2, ... (already grouped by parent, codes ascending)
    token = np.concatenate(tokens)
    num_nodes = next_id
    child_count = np.bincount(parent, minlength=num_nodes)
    first_child = np.concatenate([[0], np.cumsum(child_count)[:-1]])
    slot = np.arange(len(parent)) - first_child[parent]  # column of each child in its parent's row
    node_item = np.full(num_nodes, -1, dtype=np.int64)
    node_item[leaf_node_N] = order
    level_tokens, level_nodes = [], []
    for d in range(L):  # the children of depth-d nodes are exactly the depth-(d+1) nodes
        first, stop = depth_starts[d + 1], depth_starts[d + 2]
        edges = slice(first - 1, stop - 1)  # node n's entry in parent/token/slot is n - 1
        row = parent[edges] - depth_starts[d]
        level_width = int(child_count[depth_starts[d] : depth_starts[d + 1]].max())
        level_tokens_d = np.full((depth_starts[d + 1] - depth_starts[d], level_width), -1, dtype=np.int64)
        level_nodes_d = np.full_like(level_tokens_d, -1)
        level_tokens_d[row, slot[edges]] = token[edges]
        level_nodes_d[row, slot[edges]] = np.arange(first, stop)
        level_tokens.append(torch.from_numpy(level_tokens_d))
        level_nodes.append(torch.from_numpy(level_nodes_d))
    return Trie(
        torch.from_numpy(node_item),
        L,
        list(codebook_sizes),
        depth_starts,
        level_tokens,
        level_nodes,
    )
