"""HSTU (Zhai et al., "Actions speak louder than words", ICML 2024, arXiv 2402.17152) as a
next-item baseline: a causal stack of Hierarchical Sequential Transduction Units over item-ID
embeddings, trained and scored like our SASRec (full-catalogue cross-entropy, the same split).

The blocks (onerec/model/hstu.py) replace softmax attention by a pointwise SiLU aggregation
gated by U, with a learned bias per relative position and, where the log has timestamps, per
log2 bucket of the time gap t_i - t_j between the query's own latest item and the key. (The
reference code buckets the gap to the next item's time, which at serving time is the request
time; the harness has no request time, so the query's latest item stands in for it and no
target timestamp is ever read.)

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
from onerec.model.hstu import HSTUBlock, RelativeBias


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
