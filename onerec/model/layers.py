"""Transformer building blocks (pre-norm, T5-style): attention, dense FFN, encoder/decoder layers.

Shape legend: B batch, Q query positions, S key/value positions, D model dim, F FFN dim,
H heads, Dh head dim (D / H).
"""

from __future__ import annotations

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
        B, Q, D = x_BQD.shape
        H = self.num_heads
        q_BHQd = self.q_proj(x_BQD).view(B, Q, H, D // H).transpose(1, 2)
        k_BSD, v_BSD = self.kv_proj(memory_BSD).chunk(2, dim=-1)
        k_BHSd = k_BSD.reshape(B, -1, H, D // H).transpose(1, 2)
        v_BHSd = v_BSD.reshape(B, -1, H, D // H).transpose(1, 2)
        mask = None if allowed_BQS is None else allowed_BQS.unsqueeze(1)  # True = may attend
        out_BHQd = F.scaled_dot_product_attention(
            q_BHQd,
            k_BHSd,
            v_BHSd,
            attn_mask=mask,
            is_causal=is_causal and mask is None,
        )
        return self.out_proj(out_BHQd.transpose(1, 2).reshape(B, Q, D))


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
