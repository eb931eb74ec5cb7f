"""Transformer building blocks (pre-norm, T5-style): attention, dense FFN, encoder/decoder layers.

Shape legend: B batch, Q query positions, S key/value positions, D model dim, F FFN dim,
H heads, Dh head dim (D / H). Incremental decoding (DecoderLayer.decode_cached): N beam rows
= B requests x W beams (rows b*W .. b*W+W-1 are request b's), T cached decoder positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention through scaled_dot_product_attention (self or cross).

    No dropout on the attention weights: it forces SDPA's unfused math path and, on CPU,
    spent a third of a training step drawing random masks; residual dropout remains.
    """

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(
        self,
        x_BQD: torch.Tensor,
        memory_BSD: torch.Tensor,
        allowed_BQS: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        k_BHSd, v_BHSd = self.keys_values(memory_BSD)
        mask = None if allowed_BQS is None else allowed_BQS.unsqueeze(1)  # True = may attend
        return self.attend(self.queries(x_BQD), k_BHSd, v_BHSd, mask, is_causal)

    def queries(self, x_BQD: torch.Tensor) -> torch.Tensor:
        B, Q, D = x_BQD.shape
        H = self.num_heads
        return self.q_proj(x_BQD).view(B, Q, H, D // H).transpose(1, 2)

    def keys_values(self, memory_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, D = memory_BSD.shape
        H = self.num_heads
        k_BSD, v_BSD = self.kv_proj(memory_BSD).chunk(2, dim=-1)
        k_BHSd = k_BSD.reshape(B, -1, H, D // H).transpose(1, 2)
        v_BHSd = v_BSD.reshape(B, -1, H, D // H).transpose(1, 2)
        return k_BHSd, v_BHSd

    def attend(
        self,
        q_BHQd: torch.Tensor,
        k_BHSd: torch.Tensor,
        v_BHSd: torch.Tensor,
        mask_B1QS: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """SDPA then the output projection: [B, H, Q, Dh] queries -> [B, Q, D]."""
        B, H, Q, Dh = q_BHQd.shape
        out_BHQd = F.scaled_dot_product_attention(
            q_BHQd, k_BHSd, v_BHSd, attn_mask=mask_B1QS, is_causal=is_causal and mask_B1QS is None
        )
        return self.out_proj(out_BHQd.transpose(1, 2).reshape(B, Q, H * Dh))


class FeedForward(nn.Module):
    """Dense GELU FFN (the encoder's, and the decoder's when MoE is off)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.dropout(F.gelu(self.w1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(d_model)
        self.self_attn = Attention(d_model, num_heads)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_BSD: torch.Tensor, allowed_BSS: torch.Tensor) -> torch.Tensor:
        h = self.self_norm(x_BSD)
        x_BSD = x_BSD + self.dropout(self.self_attn(h, h, allowed_BSS))
        return x_BSD + self.dropout(self.ffn(self.ffn_norm(x_BSD)))


@dataclass
class LayerCache:
    """What one decoder layer keeps between decoding steps.

    The cross-attention keys/values are computed once per request from the encoder states
    and read by all of that request's beams (its W query rows attend together, as W query
    positions of one SDPA call), so the encoder memory is never copied per beam. The
    self-attention keys/values grow by the positions fed at each step and are reordered by
    the beams' parents (`reorder`).
    """

    cross_k_BHSd: torch.Tensor
    cross_v_BHSd: torch.Tensor
    self_k_NHTd: torch.Tensor
    self_v_NHTd: torch.Tensor

    def reorder(self, parents_N: torch.Tensor) -> None:
        """Row n continues row parents_N[n]'s prefix, so it takes that row's keys/values."""
        self.self_k_NHTd = self.self_k_NHTd.index_select(0, parents_N)
        self.self_v_NHTd = self.self_v_NHTd.index_select(0, parents_N)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder, then an FFN (dense or MoE).

    The FFN returns (y, aux) for MoE; a dense FFN is wrapped so both look the same here.
    """

    def __init__(self, d_model: int, num_heads: int, ffn: nn.Module, dropout: float) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(d_model)
        self.self_attn = Attention(d_model, num_heads)
        self.cross_norm = nn.LayerNorm(d_model)
        self.cross_attn = Attention(d_model, num_heads)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = ffn
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x_BQD: torch.Tensor, memory_BSD: torch.Tensor, memory_allowed_BQS: torch.Tensor
    ) -> tuple[torch.Tensor, Optional[dict]]:
        h = self.self_norm(x_BQD)
        x_BQD = x_BQD + self.dropout(self.self_attn(h, h, is_causal=True))
        x_BQD = x_BQD + self.dropout(self.cross_attn(self.cross_norm(x_BQD), memory_BSD, memory_allowed_BQS))
        out = self.ffn(self.ffn_norm(x_BQD))
        if isinstance(out, tuple):
            y_BQD, aux = out
        else:
            y_BQD, aux = out, None
        return x_BQD + self.dropout(y_BQD), aux

    def start_cache(self, memory_BSD: torch.Tensor) -> LayerCache:
        """The cache before the first decoding step: cross keys/values of each request, no positions."""
        k_BHSd, v_BHSd = self.cross_attn.keys_values(memory_BSD)
        B, H, _, Dh = k_BHSd.shape
        empty = k_BHSd.new_zeros(B, H, 0, Dh)
        return LayerCache(k_BHSd, v_BHSd, empty, empty)

    def decode_cached(self, x_NQD: torch.Tensor, cache: LayerCache, memory_allowed_B11S: torch.Tensor) -> torch.Tensor:
        """forward() for the Q new positions of each beam row, given the cache of the positions
        before them (which it extends). The same math as forward over the whole prefix; only
        the summation order inside the matmuls may differ (float rounding)."""
        N, Q, D = x_NQD.shape
        B = cache.cross_k_BHSd.shape[0]
        h = self.self_norm(x_NQD)
        k_new, v_new = self.self_attn.keys_values(h)
        cache.self_k_NHTd = torch.cat([cache.self_k_NHTd, k_new], dim=2)
        cache.self_v_NHTd = torch.cat([cache.self_v_NHTd, v_new], dim=2)
        T = cache.self_k_NHTd.shape[2]
        causal_QT = None
        if Q > 1:  # new position q sees every cached one and the new ones up to itself
            causal_QT = torch.arange(T, device=x_NQD.device) <= torch.arange(T - Q, T, device=x_NQD.device)[:, None]
        attn = self.self_attn.attend(self.self_attn.queries(h), cache.self_k_NHTd, cache.self_v_NHTd, causal_QT)
        x_NQD = x_NQD + self.dropout(attn)
        # Cross-attention: a request's W rows x Q positions are W*Q queries against its one memory.
        H = self.cross_attn.num_heads
        q_NQHd = self.cross_attn.q_proj(self.cross_norm(x_NQD)).view(N, Q, H, D // H)
        q_BHqd = q_NQHd.reshape(B, (N // B) * Q, H, D // H).transpose(1, 2)
        cross_BqD = self.cross_attn.attend(q_BHqd, cache.cross_k_BHSd, cache.cross_v_BHSd, memory_allowed_B11S)
        x_NQD = x_NQD + self.dropout(cross_BqD.reshape(N, Q, D))
        out = self.ffn(self.ffn_norm(x_NQD))
        y_NQD = out[0] if isinstance(out, tuple) else out
        return x_NQD + self.dropout(y_NQD)
