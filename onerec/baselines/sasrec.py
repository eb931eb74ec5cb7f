"""SASRec (Kang & McAuley, ICDM 2018): a causal transformer over item-ID embeddings.

Trained with softmax cross-entropy over the full catalogue at every position (the
"SASRec + CE" variant, stronger than the paper's sampled binary loss), scored by the
dot product of the last position's state with every item embedding (tied).

Shape legend: B users, S positions (max_history), D model dim, N items, U users with a
training row, W row width (max_len + 1), I interactions.
Inputs are item indices right-aligned with -1 padding on the left (the harness's layout).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from onerec.config import SASRecConfig
from onerec.inference.metrics import MetricAccumulator
from onerec.model.layers import EncoderLayer


class NextItemRanker:
    """What the baseline harness asks of a next-item model (SASRec, HSTU): forward(items_BS,
    times_BS) -> states [B, S, D], item_logits(states) -> [..., N], num_items, uses_time."""

    uses_time = False  # whether forward reads the items' times (otherwise they are never gathered)

    def _add_input_tables(self, num_items: int, max_len: int, d_model: int, dropout: float) -> None:
        """The item and absolute-position tables both models read their inputs through."""
        if num_items < 1 or max_len < 1:
            raise ValueError(f"num_items={num_items} and max_len={max_len} must both be >= 1")
        self.num_items = num_items
        self.max_len = max_len
        self.item_emb = nn.Embedding(num_items + 1, d_model)  # row 0 is padding; item i lives at row i + 1
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.dropout = nn.Dropout(dropout)

    def _embed_inputs(self, items_BS: torch.Tensor, item_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [B, S, D] = item x item_scale + position, zero under padding, after dropout;
        padding mask [B, S]). Right-aligned: the newest item sits at the last position."""
        S = items_BS.shape[1]
        if S > self.max_len:
            raise ValueError(f"sequence of {S} items exceeds max_len={self.max_len}")
        pad_BS = items_BS < 0
        positions = torch.arange(self.max_len - S, self.max_len, device=items_BS.device)
        x_BSD = self.item_emb(items_BS.clamp(min=-1) + 1) * item_scale + self.pos_emb(positions)
        return self.dropout(x_BSD.masked_fill(pad_BS.unsqueeze(-1), 0.0)), pad_BS

    @torch.no_grad()
    def top_k(
        self, history_BS: torch.Tensor, k: int, exclude_history: bool = False, times_BS: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The k best items after each history (right-aligned), [B, k]; exclude_history: never
        one of the history's own items (the same rule as the beam search's `eval.exclude_history`)."""
        hidden_BD = self.forward(history_BS, times_BS)[:, -1]
        scores_BN = self.item_logits(hidden_BD)
        if exclude_history:
            scores_BN = self.without_history(scores_BN, history_BS)
        return scores_BN.topk(min(k, self.num_items), dim=-1).indices

    def without_history(self, scores_BN: torch.Tensor, history_BS: torch.Tensor) -> torch.Tensor:
        """scores_BN with each history's own items at -inf (the `eval.exclude_history` rule)."""
        # Padding (-1) lands on an extra column that is dropped again.
        seen_BN = torch.zeros(scores_BN.shape[0], self.num_items + 1, dtype=torch.bool, device=scores_BN.device)
        seen_BN.scatter_(1, torch.where(history_BS >= 0, history_BS, self.num_items), True)
        return scores_BN.masked_fill(seen_BN[:, :-1], float("-inf"))


class SASRec(NextItemRanker, nn.Module):
    def __init__(self, cfg: SASRecConfig, num_items: int, max_len: int) -> None:
        super().__init__()
        D = cfg.d_model
        self._add_input_tables(num_items, max_len, D, cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(D, cfg.num_heads, 4 * D, cfg.dropout) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(D)
        for table in (self.item_emb.weight, self.pos_emb.weight):
            nn.init.normal_(table, std=D**-0.5)

    def forward(self, items_BS: torch.Tensor, times_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [B, S, D]; position s summarises items up to and including s (times unused)."""
        S = items_BS.shape[1]
        x_BSD, pad_BS = self._embed_inputs(items_BS)
        causal_SS = torch.ones(S, S, dtype=torch.bool, device=items_BS.device).tril()
        # Causal, never to padding; every row may see itself so an all-padding prefix has no empty row.
        allowed_BSS = (causal_SS & ~pad_BS.unsqueeze(1)) | torch.eye(S, dtype=torch.bool, device=items_BS.device)
        for layer in self.layers:
            x_BSD = layer(x_BSD, allowed_BSS)
        return self.norm(x_BSD)

    def item_logits(self, hidden_xD: torch.Tensor) -> torch.Tensor:
        """Scores [..., N] of every real item (the padding row is left out)."""
        return hidden_xD @ self.item_emb.weight[1:].T


def training_sequences(offsets: np.ndarray, items: np.ndarray, train_len: np.ndarray, max_len: int) -> np.ndarray:
    """One row per user with >= 2 training items: the last max_len + 1 items of their training
    part, right-aligned with -1 padding, [U', max_len + 1]. Inputs are row[:-1], targets row[1:]."""
    keep = np.flatnonzero(train_len >= 2)
    return _window_rows(items, offsets[keep], offsets[keep] + train_len[keep], max_len + 1)


def _window_rows(items: np.ndarray, starts_U: np.ndarray, ends_U: np.ndarray, width: int) -> np.ndarray:
    """[U, width] int64: the last `width` items of items[start:end] per row, right-aligned, -1 on the left."""
    pos_UW = ends_U[:, None] - width + np.arange(width)[None, :]
    valid_UW = pos_UW >= starts_U[:, None]
    return np.where(valid_UW, items[np.where(valid_UW, pos_UW, 0)], -1).astype(np.int64)


def augmented_sequences(
    offsets: np.ndarray,
    items: np.ndarray,
    train_len: np.ndarray,
    max_len: int,
    rng: np.random.Generator,
    crop_prob: float = 0.0,
    crop_ratio: float = 0.6,
    shuffle_prob: float = 0.0,
    shuffle_ratio: float = 0.3,
) -> np.ndarray:
    """The rows of `training_sequences` (the same users, in the same order, the same layout),
    drawn afresh with CL4SRec's item crop and reorder; one call per epoch.

    Per user with n >= 2 training items, independently:
      crop (probability crop_prob): keep a random contiguous window of L = max(2, floor(crop_ratio
          x n)) of the n items (at most n), every start equally likely;
      then the last max_len + 1 items of what is left form the row (m of them);
      shuffle (probability shuffle_prob): a random contiguous window of w = floor(shuffle_ratio
          x m) of the row's items is permuted at random (nothing changes when w < 2).
    Every row keeps >= 2 real items. The draws have fixed shapes, so a generator seeded alike
    gives the same rows. Vectorised over users: O(U x max_len) per call."""
    keep = np.flatnonzero(train_len >= 2)
    U, width = len(keep), max_len + 1
    starts_U = offsets[keep].astype(np.int64)
    n_U = train_len[keep].astype(np.int64)
    ends_U = starts_U + n_U
    if crop_prob > 0:
        cropped_U = rng.random(U) < crop_prob
        length_U = np.minimum(np.maximum(np.floor(crop_ratio * n_U).astype(np.int64), 2), n_U)
        shift_U = np.floor(rng.random(U) * (n_U - length_U + 1)).astype(np.int64)  # 0 .. n - L
        starts_U = np.where(cropped_U, starts_U + shift_U, starts_U)
        ends_U = np.where(cropped_U, starts_U + length_U, ends_U)
    rows_UW = _window_rows(items, starts_U, ends_U, width)
    if shuffle_prob > 0:
        m_U = np.minimum(ends_U - starts_U, width)  # real items in the row, in its last m columns
        w_U = np.floor(shuffle_ratio * m_U).astype(np.int64)
        shuffled_U = (rng.random(U) < shuffle_prob) & (w_U >= 2)
        first_U = (width - m_U) + np.floor(rng.random(U) * (m_U - w_U + 1)).astype(np.int64)
        noise_UW = rng.random((U, width))
        # Sort keys: a column outside the window keeps its own index; a column inside the window
        # [a, a + w) gets a random key in [a, a + w), so a stable sort permutes the window alone.
        column_W = np.arange(width)
        inside_UW = shuffled_U[:, None] & (column_W >= first_U[:, None]) & (column_W < (first_U + w_U)[:, None])
        keys_UW = np.where(inside_UW, first_U[:, None] + noise_UW * w_U[:, None], column_W[None, :].astype(np.float64))
        rows_UW = np.take_along_axis(rows_UW, np.argsort(keys_UW, axis=1, kind="stable"), axis=1)
    return rows_UW


def sequence_loss(model: NextItemRanker, rows_BT: torch.Tensor, times_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Mean full-catalogue cross-entropy of the next item at every real (input, target) pair;
    times_BT (aligned with rows_BT) only for a model that reads them."""
    inputs_BS, targets_BS = rows_BT[:, :-1], rows_BT[:, 1:]
    hidden_BSD = model(inputs_BS, None if times_BT is None else times_BT[:, :-1])
    real = (targets_BS >= 0) & (inputs_BS >= 0)
    logits_RN = model.item_logits(hidden_BSD[real])
    return nn.functional.cross_entropy(logits_RN, targets_BS[real])


WEIGHTS_FILE = "model.safetensors"


def load_item_vectors(weights_path: Path, num_items: int) -> torch.Tensor:
    """[N, D] item embeddings of a trained SASRec (its padding row dropped): the vectors its
    output layer scores items with, so items that follow similar histories lie close."""
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"{weights_path} does not exist: run `onerec baseline` with the same run.out_dir first "
            "(`onerec pipeline` runs it before tokenize when tokenizer.collaborative_source names sasrec)"
        )
    with safe_open(str(weights_path), framework="pt") as weights:
        if "item_emb.weight" not in weights.keys():
            raise ValueError(f"{weights_path}: no tensor 'item_emb.weight'; not a SASRec checkpoint")
        table = weights.get_tensor("item_emb.weight")
    if table.ndim != 2 or table.shape[0] != num_items + 1:
        raise ValueError(
            f"{weights_path}: item_emb.weight has shape {tuple(table.shape)}, expected ({num_items + 1}, D) for "
            f"{num_items} items plus padding; it was trained on other data: re-run `onerec baseline`"
        )
    return table[1:].float()


def evaluate_next_item(
    model: NextItemRanker,
    history_BS: np.ndarray,
    target_B: np.ndarray,
    ks: list[int],
    batch_size: int,
    device,
    exclude_history: bool = False,
    times_BS: np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@K / NDCG@K of a next-item model over the full catalogue (times_BS, aligned with
    the histories, only for a model that reads them)."""
    accumulator = MetricAccumulator(ks)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(target_B), batch_size):
            history = torch.as_tensor(history_BS[start : start + batch_size], device=device)
            times = None if times_BS is None else torch.as_tensor(times_BS[start : start + batch_size], device=device)
            ranked = model.top_k(history, accumulator.ks[-1], exclude_history, times)
            accumulator.update(ranked.cpu(), torch.as_tensor(target_B[start : start + batch_size]))
    finally:
        model.train(was_training)
    return accumulator.compute()
