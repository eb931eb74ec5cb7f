"""HSTU (Zhai et al., "Actions speak louder than words", ICML 2024, arXiv 2402.17152) as a
next-item baseline: a causal stack of Hierarchical Sequential Transduction Units over item-ID
embeddings, trained and scored like our SASRec (full-catalogue cross-entropy, the same split).

One HSTU block (pre-norm, residual), per position:

    U, V, Q, K = split(SiLU(W_uvqk . LayerNorm(x)))                 pointwise projection
    A[i, j]    = SiLU(Q_i . K_j + rab(i, j)) / max_len, j <= i       pointwise aggregated attention
    x          = x + W_o . dropout(U * LayerNorm(sum_j A[i, j] V_j)) gated transformation

SiLU in place of a softmax: the weights do not sum to one, so the intensity of a user's
engagement survives aggregation (the paper's section 3.1). rab is a learned bias per relative
position (i - j) plus, when the log has timestamps, one per log2 bucket of the time gap
t_i - t_j between the query's own latest item and the key. (The reference code buckets the gap
to the next item's time, which at serving time is the request time; the harness has no request
time, so the query's latest item stands in for it and no target timestamp is ever read.)

Output: as in the reference, states and item embeddings are L2-normalised and their cosine
divided by a temperature gives the logits over the full catalogue.

Shape legend: B users, S positions (max_len), D model dim, H heads, Dh head dim (D / H),
N items. Inputs are item indices right-aligned with -1 padding on the left (the harness's
layout); times, when given, are aligned with them (any value under padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from onerec.baselines.sasrec import NextItemRanker
from onerec.config import HSTUConfig

class RelativeBias(nn.Module):
    """rab(i, j) [B, S, S]: a learned weight per relative position i - j, plus one per log2
    bucket of the time gap when times are given."""

    def __init__(self, max_len: int, time_buckets: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.time_buckets = time_buckets
        self.position_w = nn.Parameter(torch.empty(max_len).normal_(std=0.02))  # by i - j in [0, max_len)
        self.time_w = nn.Parameter(torch.empty(time_buckets + 1).normal_(std=0.02)) if time_buckets else None

    def forward(self, S: int, times_BS: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        index = torch.arange(S, device=device)
        # Only j <= i is ever attended (causal), so i - j in [0, S) indexes the table; the
        # upper triangle gets a valid index too and is masked out later.
        distance_SS = (index[:, None] - index[None, :]).clamp(min=0)
        bias_1SS = self.position_w[distance_SS].unsqueeze(0)
        if times_BS is None or self.time_w is None:
            return bias_1SS
        # Bucket k holds gaps in [2^k, 2^(k+1)) time units (the reference's log(x) / 0.301);
        # log2 is exact at powers of two, so bucket edges do not wobble with rounding.
        gap_BSS = (times_BS[:, :, None] - times_BS[:, None, :]).abs().double().clamp(min=1.0)
        bucket_BSS = gap_BSS.log2().floor().long().clamp(max=self.time_buckets)
        return bias_1SS + self.time_w[bucket_BSS]


class HSTUBlock(nn.Module):
    def __init__(self, d_model: int, num_heads: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.max_len = max_len
        self.norm_in = nn.LayerNorm(d_model)
        self.uvqk = nn.Linear(d_model, 4 * d_model)
        self.norm_attended = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_BSD: torch.Tensor, bias_BSS: torch.Tensor, allowed_BSS: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        H = self.num_heads
        u_BSD, v_BSD, q_BSD, k_BSD = F.silu(self.uvqk(self.norm_in(x_BSD))).chunk(4, dim=-1)
        q_BHSd, k_BHSd, v_BHSd = (t.view(B, S, H, D // H).transpose(1, 2) for t in (q_BSD, k_BSD, v_BSD))
        scores_BHSS = q_BHSd @ k_BHSd.transpose(-1, -2) + bias_BSS.unsqueeze(1)
        # Divided by the model's fixed length, not the batch's: the same scale in every batch.
        weights_BHSS = F.silu(scores_BHSS) / self.max_len * allowed_BSS.unsqueeze(1)
        attended_BSD = (weights_BHSS @ v_BHSd).transpose(1, 2).reshape(B, S, D)
        return x_BSD + self.out(self.dropout(u_BSD * self.norm_attended(attended_BSD)))


class HSTU(NextItemRanker, nn.Module):
    def __init__(self, cfg: HSTUConfig, num_items: int, max_len: int) -> None:
        super().__init__()
        D = cfg.d_model
        self._add_input_tables(num_items, max_len, D, cfg.dropout)
        self.temperature = cfg.temperature
        self.uses_time = cfg.time_buckets > 0
        self.bias = RelativeBias(max_len, cfg.time_buckets)
        self.blocks = nn.ModuleList(HSTUBlock(D, cfg.num_heads, max_len, cfg.dropout) for _ in range(cfg.layers))
        for table in (self.item_emb.weight, self.pos_emb.weight):
            nn.init.normal_(table, std=0.02)

    def forward(self, items_BS: torch.Tensor, times_BS: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised states [B, S, D]; position s summarises items up to and including s."""
        if times_BS is not None and times_BS.shape != items_BS.shape:
            raise ValueError(f"times of shape {tuple(times_BS.shape)} for items of shape {tuple(items_BS.shape)}")
        S, device = items_BS.shape[1], items_BS.device
        # Item vectors scaled by sqrt(D) as in the reference (their tables start at std 0.02).
        x_BSD, pad_BS = self._embed_inputs(items_BS, item_scale=self.item_emb.embedding_dim**0.5)
        causal_SS = torch.ones(S, S, dtype=torch.bool, device=device).tril()
        allowed_BSS = causal_SS & ~pad_BS.unsqueeze(1)
        bias_BSS = self.bias(S, times_BS if self.uses_time else None, device)
        for block in self.blocks:
            x_BSD = block(x_BSD, bias_BSS, allowed_BSS)
        return F.normalize(x_BSD, dim=-1)

    def item_logits(self, hidden_xD: torch.Tensor) -> torch.Tensor:
        """Cosine / temperature [..., N] against every real item (the padding row left out)."""
        return hidden_xD @ F.normalize(self.item_emb.weight[1:], dim=-1).T / self.temperature
