"""HSTU building blocks (Zhai et al., "Actions speak louder than words", arXiv 2402.17152):
the pointwise aggregated attention unit and its relative attention bias. Used by the HSTU
baseline (onerec/baselines/hstu.py, causal) and, with model.encoder_block=hstu, as the encoder
of the OneRec model (onerec/model/onerec.py, bidirectional over the history).

One HSTU block (pre-norm, residual), per position:

    U, V, Q, K = split(SiLU(W_uvqk . LayerNorm(x)))                 pointwise projection
    A[i, j]    = SiLU(Q_i . K_j + rab(i, j)) / max_len, (i, j) allowed   pointwise aggregated attention
    x          = x + W_o . dropout(U * LayerNorm(sum_j A[i, j] V_j)) gated transformation

SiLU in place of a softmax: the weights do not sum to one, so the intensity of a user's
engagement survives aggregation (the paper's section 3.1). rab is a learned bias per relative
position (i - j) plus, when times are given, one per log2 bucket of the time gap |t_i - t_j|.

Shape legend: B batch, S positions, D model dim, H heads, Dh head dim (D / H).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RelativeBias(nn.Module):
    """rab(i, j) [B, S, S] (or [1, S, S] without times): a learned weight per relative position
    i - j, plus one per log2 bucket of the time gap when times are given.

    causal: only j <= i is ever attended, so the table holds i - j in [0, max_len) (the
    baseline); bidirectional: i - j in (-max_len, max_len) (the OneRec encoder)."""

    def __init__(self, max_len: int, time_buckets: int = 0, bidirectional: bool = False) -> None:
        super().__init__()
        self.max_len = max_len
        self.time_buckets = time_buckets
        self.bidirectional = bidirectional
        self.position_w = nn.Parameter(torch.empty(2 * max_len - 1 if bidirectional else max_len).normal_(std=0.02))
        self.time_w = nn.Parameter(torch.empty(time_buckets + 1).normal_(std=0.02)) if time_buckets else None

    def forward(self, S: int, times_BS: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        if S > self.max_len:
            raise ValueError(f"{S} positions exceed the bias table's max_len={self.max_len}")
        index = torch.arange(S, device=device)
        distance_SS = index[:, None] - index[None, :]
        # Causal: the upper triangle gets a valid index too and is masked out by the caller.
        distance_SS = distance_SS + (self.max_len - 1) if self.bidirectional else distance_SS.clamp(min=0)
        bias_1SS = self.position_w[distance_SS].unsqueeze(0)
        if times_BS is None or self.time_w is None:
            return bias_1SS
        # Bucket k holds gaps in [2^k, 2^(k+1)) time units (the reference's log(x) / 0.301);
        # log2 is exact at powers of two, so bucket edges do not wobble with rounding.
        gap_BSS = (times_BS[:, :, None] - times_BS[:, None, :]).abs().double().clamp(min=1.0)
        bucket_BSS = gap_BSS.log2().floor().long().clamp(max=self.time_buckets)
        return bias_1SS + self.time_w[bucket_BSS]


class HSTUBlock(nn.Module):
    """One HSTU layer (see the module docstring); `allowed` says which (i, j) attend, so the same
    block serves a causal stack and a bidirectional one."""

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
        """bias_BSS and allowed_BSS may have 1 in place of B or of the query axis (broadcast)."""
        B, S, D = x_BSD.shape
        H = self.num_heads
        u_BSD, v_BSD, q_BSD, k_BSD = F.silu(self.uvqk(self.norm_in(x_BSD))).chunk(4, dim=-1)
        q_BHSd, k_BHSd, v_BHSd = (t.view(B, S, H, D // H).transpose(1, 2) for t in (q_BSD, k_BSD, v_BSD))
        scores_BHSS = q_BHSd @ k_BHSd.transpose(-1, -2) + bias_BSS.unsqueeze(1)
        # Divided by the model's fixed length, not the batch's: the same scale in every batch.
        weights_BHSS = F.silu(scores_BHSS) / self.max_len * allowed_BSS.unsqueeze(1)
        attended_BSD = (weights_BHSS @ v_BHSd).transpose(1, 2).reshape(B, S, D)
        return x_BSD + self.out(self.dropout(u_BSD * self.norm_attended(attended_BSD)))
