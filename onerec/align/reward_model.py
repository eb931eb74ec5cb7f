"""Session reward model (OneRec section 3.3): how much will the user like this whole session?

Shape legend: B users, S history items, M session items, L code levels, D model dim, K signals.

    history item h_s = id_emb[h_s] + sum_l code_emb[l, c_l(h_s)] + pos_emb[s]
    session item e_m = id_emb[e_m] + sum_l code_emb[l, c_l(e_m)]
    target-aware:  e'_m = e_m + CrossAttn(q = e_m, k = v = history)      (each item reads the history)
    session:       e''  = SelfAttn-Transformer(e')                          (items see each other)
    pooled:        p    = mean over real session items of e''
    signal k:      logit_k = Tower_k(p)                                    (sigmoid for binary signals,
                                                                            identity for regression)

Items are scored through both their ID and their semantic codes, so a session the
generator produces (always real items) and a logged one are scored the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from onerec.model.layers import Attention, EncoderLayer


class SessionRewardModel(nn.Module):
    def __init__(
        self,
        num_items: int,
        codebook_sizes: list[int],
        num_signals: int,
        max_history: int,
        d_model: int = 64,
        num_heads: int = 2,
        session_layers: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_items < 1 or num_signals < 1 or not codebook_sizes:
            raise ValueError(
                f"num_items={num_items}, num_signals={num_signals} and codebook_sizes={codebook_sizes} must be non-empty"
            )
        D = d_model
        self.num_levels = len(codebook_sizes)
        self.c_max = max(codebook_sizes)
        self.max_history = max_history
        self.item_emb = nn.Embedding(num_items, D)
        self.code_emb = nn.Embedding(self.num_levels * self.c_max, D)
        self.history_pos_emb = nn.Embedding(max_history, D)
        self.cross_norm = nn.LayerNorm(D)
        self.cross_attn = Attention(D, num_heads)
        self.session_layers = nn.ModuleList(EncoderLayer(D, num_heads, 4 * D, dropout) for _ in range(session_layers))
        self.norm = nn.LayerNorm(D)
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, 1)) for _ in range(num_signals)
        )
        self.dropout = nn.Dropout(dropout)
        for table in (self.item_emb.weight, self.code_emb.weight, self.history_pos_emb.weight):
            nn.init.normal_(table, std=D**-0.5)

    def _embed(self, items_xM: torch.Tensor, codes_xML: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(self.num_levels, device=codes_xML.device) * self.c_max
        codes = self.code_emb(codes_xML.clamp(min=0) + offsets).sum(-2)
        real = (items_xM >= 0).unsqueeze(-1)
        return (self.item_emb(items_xM.clamp(min=0)) + codes) * real

    def forward(
        self,
        history_BS: torch.Tensor,
        history_codes_BSL: torch.Tensor,
        session_BM: torch.Tensor,
        session_codes_BML: torch.Tensor,
    ) -> torch.Tensor:
        """Raw tower outputs [B, K] (logits for binary signals, values for regression ones).

        Items are indices with -1 padding (history right-aligned, session padded at the end);
        every session needs at least one real item.
        """
        B, S = history_BS.shape
        if S > self.max_history:
            raise ValueError(f"history of {S} items exceeds max_history={self.max_history}")
        positions = torch.arange(self.max_history - S, self.max_history, device=history_BS.device)
        history_BSD = self._embed(history_BS, history_codes_BSL) + self.history_pos_emb(positions)
        session_real_BM = session_BM >= 0
        x_BMD = self.dropout(self._embed(session_BM, session_codes_BML))
        # Every session item reads the history; a user with no history reads nothing (zero update).
        history_real_BS = history_BS >= 0
        allowed_BMS = history_real_BS.unsqueeze(1).expand(-1, x_BMD.shape[1], -1)
        has_history_B11 = history_real_BS.any(1).view(B, 1, 1)
        safe_allowed = allowed_BMS | ~has_history_B11  # avoid an all-masked softmax row
        read_BMD = self.cross_attn(self.cross_norm(x_BMD), history_BSD, safe_allowed)
        x_BMD = x_BMD + self.dropout(read_BMD) * has_history_B11
        eye = torch.eye(x_BMD.shape[1], dtype=torch.bool, device=x_BMD.device)
        allowed_BMM = (session_real_BM.unsqueeze(1) & session_real_BM.unsqueeze(2)) | eye
        for layer in self.session_layers:
            x_BMD = layer(x_BMD, allowed_BMM)
        x_BMD = self.norm(x_BMD) * session_real_BM.unsqueeze(-1)
        pooled_BD = x_BMD.sum(1) / session_real_BM.sum(1, keepdim=True).clamp(min=1)
        return torch.cat([tower(pooled_BD) for tower in self.towers], dim=1)
