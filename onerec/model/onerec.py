"""The OneRec encoder-decoder: history items in, the next session's semantic IDs out.

Shape legend: B batch, S history length, M session items, L code levels (dedup level
included), C codebook size (C_max over levels), D model dim, P decoder positions
(M * (L + 1)), T generated codes so far, Q decoder positions fed in one cached step (1, or 2
where an item ends: its last code and the next BOS). N is the catalogue size (items) in
codes_NL and the item head's item_logits_BN, and the beam rows (B requests x W beams) in the
cached decoder (DecoderCache, decode_next).

Encoder input (memory), one vector per history item, right-aligned:

    [start(+user)] [item_1] ... [item_S]        item = sum_l code_emb[l, c_l] (+ id_emb[item]) + pos_emb[s]

The encoder is a stack of softmax self-attention layers, or with model.encoder_block=hstu of
HSTU blocks (onerec/model/hstu.py: pointwise SiLU attention gated by U, a learned bias per
relative position), bidirectional over [start] + history either way.

The optional item-ID embedding (model.item_id_embedding) adds a free vector per item to the
history side only, as OneRec's encoder reads sparse ID features beside the semantic ones; the
decoder and its output stay purely semantic, so generation is unchanged.

Item head (optional, `item_logits`): the encoder's state at the most recent history item
dotted with every item's ID embedding (the same table, tied) scores the whole catalogue at
once, a dense next-item objective beside the generative one (LIGER). It is trained with
train.item_loss_weight and can rerank the final beams (eval.item_score_weight).

Decoder input per session item m, teacher forced (OneRec section 3.2, TIGER section 3.2):

    position:  m*(L+1)+0  m*(L+1)+1 ... m*(L+1)+L
    input:     BOS        c_1       ... c_L
    predicts:  c_1        c_2       ... (nothing: the next item's BOS is fixed)

The output head is tied to the code embeddings of each level, so the logits at level l
cover exactly that level's codebook; codes beyond a level's size are -inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from onerec.config import ModelConfig
from onerec.model.hstu import HSTUBlock, RelativeBias
from onerec.model.layers import DecoderLayer, EncoderLayer, FeedForward, LayerCache
from onerec.model.moe import MoEFeedForward


@dataclass
class EncoderMemory:
    states_BSD: torch.Tensor
    pad_BS: torch.Tensor  # True where the position is padding (never attended)

    def repeat_beams(self, beam_width: int) -> "EncoderMemory":
        """Rows b -> b*W .. b*W+W-1, so every beam of request b reads b's memory."""
        return EncoderMemory(
            self.states_BSD.repeat_interleave(beam_width, dim=0), self.pad_BS.repeat_interleave(beam_width, dim=0)
        )


@dataclass
class DecoderCache:
    """The state of an incremental decode (OneRecModel.start_decoding / decode_next).

    Rows: B (one per request) until the first beam step fans out to N = B * W beam rows, rows
    b*W .. b*W+W-1 being request b's. Why a reorder by index_select rather than a paged
    layout: a session is at most M * (L + 1) positions (4 to ~20), so copying the per-row
    cache by parent at each step costs about what one decoder step does, and needs neither
    page tables nor a custom attention kernel.
    """

    layers: list[LayerCache]
    memory_allowed_B11S: torch.Tensor  # False at the memory's padding
    positions: int = 0  # decoder positions already in the cache

    def reorder(self, parents_N: torch.Tensor) -> None:
        """After a beam step: row n continues row parents_N[n] (a global row index)."""
        for layer in self.layers:
            layer.reorder(parents_N)


@dataclass
class ModelOutput:
    logits_BMLC: torch.Tensor
    aux_loss: torch.Tensor  # MoE load-balancing loss summed over layers, unweighted
    z_loss: torch.Tensor  # router z-loss summed over layers, unweighted
    expert_load: torch.Tensor  # [num_moe_layers, E] share of routed copies per expert
    item_logits_BN: torch.Tensor | None = None  # the item head's logits, when forward was asked for them


def lookup_codes(items_BS: torch.Tensor, codes_NL: torch.Tensor) -> torch.Tensor:
    """item_index -> code tuple, [B, S] -> [B, S, L] (any leading shape); item -1 gives an all -1 row."""
    real_BS = items_BS >= 0
    codes_BSL = codes_NL[items_BS.clamp(min=0)]
    return codes_BSL.masked_fill(~real_BS.unsqueeze(-1), -1)


class OneRecModel(nn.Module):
    """Encoder over the history, decoder over the session's codes; see the module docstring."""

    def __init__(
        self, cfg: ModelConfig, codebook_sizes: list[int], max_history: int, session_len: int, num_items: int = 0
    ) -> None:
        super().__init__()
        if not codebook_sizes or min(codebook_sizes) < 1:
            raise ValueError(f"codebook_sizes={list(codebook_sizes)}: expected one size >= 1 per code level")
        if max_history < 1 or session_len < 1:
            raise ValueError(f"max_history={max_history} and session_len={session_len} must both be >= 1")
        if cfg.item_id_embedding and num_items < 1:
            raise ValueError("model.item_id_embedding needs the catalogue size: pass num_items >= 1")
        self.cfg = cfg
        self.codebook_sizes = list(codebook_sizes)
        self.num_levels = L = len(codebook_sizes)
        self.c_max = C = max(codebook_sizes)
        self.max_history = max_history
        self.session_len = session_len
        D = cfg.d_model

        self.register_buffer(
            "code_mask_LC", torch.arange(C)[None, :] < torch.tensor(codebook_sizes)[:, None], persistent=False
        )
        self.code_emb = nn.Embedding(L * C, D)  # row l*C + c: code c at level l (shared enc/dec/head)
        self.history_pos_emb = nn.Embedding(max_history, D)
        self.memory_start = nn.Parameter(torch.zeros(D))
        self.user_emb = nn.Embedding(cfg.user_buckets, D) if cfg.user_buckets > 0 else None
        self.item_emb = nn.Embedding(num_items, D) if cfg.item_id_embedding else None
        self.bos_emb = nn.Parameter(torch.zeros(D))
        self.decoder_pos_emb = nn.Embedding(session_len * (L + 1), D)
        self.dropout = nn.Dropout(cfg.dropout)

        # The encoder reads [start] + S history items: S + 1 positions.
        if cfg.encoder_block == "hstu":
            self.encoder_layers = nn.ModuleList(
                HSTUBlock(D, cfg.num_heads, max_history + 1, cfg.dropout) for _ in range(cfg.encoder_layers)
            )
            # Between history items only: the start token's bias stays 0, so a left-padded
            # history and the same history unpadded get the same bias between real positions.
            self.encoder_bias = RelativeBias(max_history, bidirectional=True)
        else:
            self.encoder_layers = nn.ModuleList(
                EncoderLayer(D, cfg.num_heads, cfg.d_ff, cfg.dropout) for _ in range(cfg.encoder_layers)
            )
            self.encoder_bias = None
        self.encoder_norm = nn.LayerNorm(D)
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(D, cfg.num_heads, self._decoder_ffn(cfg), cfg.dropout) for _ in range(cfg.decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(D)
        # Every input vector starts at norm ~1 (std D^-0.5 per entry): positions must not drown
        # the codes (nn.Embedding's default std 1 would make them 11x louder at D=128), and the
        # tied head then starts with unit-scale logits (LayerNorm'd hidden of norm sqrt(D) . e).
        for table in (self.code_emb.weight, self.history_pos_emb.weight, self.decoder_pos_emb.weight):
            nn.init.normal_(table, std=D**-0.5)
        for extra in (self.user_emb, self.item_emb):
            if extra is not None:
                nn.init.normal_(extra.weight, std=D**-0.5)
        nn.init.normal_(self.memory_start, std=D**-0.5)
        nn.init.normal_(self.bos_emb, std=D**-0.5)

    @staticmethod
    def _decoder_ffn(cfg: ModelConfig) -> nn.Module:
        if cfg.moe.enabled:
            return MoEFeedForward(cfg.d_model, cfg.d_ff, cfg.moe.num_experts, cfg.moe.top_k, cfg.dropout)
        return FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)

    # ---------------------------------------------------------------- helpers
    def _embed_codes(self, codes_xL: torch.Tensor) -> torch.Tensor:
        """Sum of per-level code embeddings; -1 codes contribute nothing."""
        level_offset_L = torch.arange(self.num_levels, device=codes_xL.device) * self.c_max
        rows = codes_xL.clamp(min=0) + level_offset_L
        vectors = self.code_emb(rows) * (codes_xL >= 0).unsqueeze(-1)
        return vectors.sum(dim=-2)

    def _head(self, hidden_BMLD: torch.Tensor) -> torch.Tensor:
        """Tied output head: level l's logits are dot products with level l's code embeddings."""
        table_LCD = self.code_emb.weight.view(self.num_levels, self.c_max, -1)
        logits = torch.einsum("bmld,lcd->bmlc", hidden_BMLD, table_LCD)
        return logits.float().masked_fill(~self.code_mask_LC, float("-inf"))

    # ---------------------------------------------------------------- encoder
    def _check_codes(self, name: str, codes: torch.Tensor) -> None:
        # Shape only: a value check would cost a host sync per call on GPU.
        if codes.dim() != 3 or codes.shape[-1] != self.num_levels:
            raise ValueError(
                f"{name} must be int64 [batch, items, {self.num_levels}] (one code per level), "
                f"got shape {tuple(codes.shape)}"
            )
        if codes.dtype != torch.long:
            raise ValueError(f"{name} must be int64 codes, got {codes.dtype}")

    def encode(
        self,
        history_codes_BSL: torch.Tensor,
        user_B: torch.Tensor | None = None,
        history_items_BS: torch.Tensor | None = None,
    ) -> EncoderMemory:
        """Encoder states over [start(+user)] + history.

        user_B is used only when cfg.user_buckets > 0; history_items_BS (item indices, -1 for
        padding, aligned with the codes) is required when cfg.item_id_embedding is on.
        """
        self._check_codes("history_codes_BSL", history_codes_BSL)
        B, S, _ = history_codes_BSL.shape
        if self.item_emb is not None and (history_items_BS is None or history_items_BS.shape != (B, S)):
            got = None if history_items_BS is None else tuple(history_items_BS.shape)
            raise ValueError(f"model.item_id_embedding is on: pass history_items_BS of shape {(B, S)}, got {got}")
        if S > self.max_history:
            raise ValueError(
                f"history of {S} items exceeds the model's max_history={self.max_history} "
                "(keep the most recent items, or build the model with a larger data.max_history)"
            )
        # Right-aligned histories: the most recent item always sits at the last position.
        positions = torch.arange(self.max_history - S, self.max_history, device=history_codes_BSL.device)
        items_BSD = self._embed_codes(history_codes_BSL) + self.history_pos_emb(positions)
        if self.item_emb is not None:
            real_BS1 = (history_items_BS >= 0).unsqueeze(-1)
            items_BSD = items_BSD + self.item_emb(history_items_BS.clamp(min=0)) * real_BS1
        start_BD = self.memory_start.expand(B, -1)
        if self.user_emb is not None and user_B is not None:
            start_BD = start_BD + self.user_emb(user_B % self.cfg.user_buckets)
        x_BSD = self.dropout(torch.cat([start_BD.unsqueeze(1), items_BSD], dim=1))
        # The start token is never padding, so a user with no history still attends to something.
        pad_BS = torch.cat(
            [torch.zeros(B, 1, dtype=torch.bool, device=x_BSD.device), (history_codes_BSL < 0).all(-1)], dim=1
        )
        allowed_B1S = ~pad_BS.unsqueeze(1)
        if self.encoder_bias is not None:  # HSTU blocks: every position reads every real one
            bias_1SS = nn.functional.pad(self.encoder_bias(S, None, x_BSD.device), (1, 0, 1, 0))  # + start
            for layer in self.encoder_layers:
                x_BSD = layer(x_BSD, bias_1SS, allowed_B1S)
        else:
            for layer in self.encoder_layers:
                x_BSD = layer(x_BSD, allowed_B1S)
        return EncoderMemory(self.encoder_norm(x_BSD), pad_BS)

    # ---------------------------------------------------------------- decoder
    def _decoder_inputs(self, target_codes_BML: torch.Tensor) -> torch.Tensor:
        """[BOS, c_1 .. c_L] per item, flattened to P = M * (L + 1) input vectors."""
        B, M, L = target_codes_BML.shape
        level_offset_L = torch.arange(L, device=target_codes_BML.device) * self.c_max
        codes_BMLD = self.code_emb(target_codes_BML.clamp(min=0) + level_offset_L)
        bos_BM1D = self.bos_emb.expand(B, M, 1, -1)
        return torch.cat([bos_BM1D, codes_BMLD], dim=2).reshape(B, M * (L + 1), -1)

    def _decode(self, inputs_BPD: torch.Tensor, memory: EncoderMemory) -> tuple[torch.Tensor, list[dict]]:
        P = inputs_BPD.shape[1]
        x_BPD = self.dropout(inputs_BPD + self.decoder_pos_emb(torch.arange(P, device=inputs_BPD.device)))
        allowed_B1S = ~memory.pad_BS.unsqueeze(1)
        aux = []
        for layer in self.decoder_layers:
            x_BPD, layer_aux = layer(x_BPD, memory.states_BSD, allowed_B1S)
            if layer_aux is not None:
                aux.append(layer_aux)
        return self.decoder_norm(x_BPD), aux

    def forward(
        self,
        history_codes_BSL: torch.Tensor,
        target_codes_BML: torch.Tensor,
        user_B: torch.Tensor | None = None,
        history_items_BS: torch.Tensor | None = None,
        with_item_logits: bool = False,
    ) -> ModelOutput:
        """Teacher-forced logits for every target code of the session (see the module docstring).

        with_item_logits=True also returns the item head's logits (item_logits) from the same
        encoder pass; off, the head is not computed at all.
        """
        self._check_codes("target_codes_BML", target_codes_BML)
        B, M, L = target_codes_BML.shape
        if M > self.session_len:
            raise ValueError(f"target session of {M} items exceeds the model's session_len={self.session_len}")
        memory = self.encode(history_codes_BSL, user_B, history_items_BS)
        hidden_BPD, aux = self._decode(self._decoder_inputs(target_codes_BML), memory)
        # positions m*(L+1) + l (l < L) predict code l of item m
        hidden_BMLD = hidden_BPD.view(B, M, L + 1, -1)[:, :, :L]
        zero = hidden_BPD.new_zeros((), dtype=torch.float32)
        return ModelOutput(
            logits_BMLC=self._head(hidden_BMLD),
            aux_loss=sum((a["aux_loss"] for a in aux), zero),
            z_loss=sum((a["z_loss"] for a in aux), zero),
            expert_load=torch.stack([a["load_E"] for a in aux]) if aux else hidden_BPD.new_zeros(0, 0),
            item_logits_BN=self.item_logits(memory) if with_item_logits else None,
        )

    def item_logits(self, memory: EncoderMemory) -> torch.Tensor:
        """The item head: float32 logits [B, N] over the whole catalogue for the next item.

        The encoder's state at the last position, the most recent item (histories are
        right-aligned), dotted with every row of the item-ID table. Computed with autocast
        off: bf16 rounds logits of ~10 to steps of ~0.06, too coarse for a softmax over
        thousands of close candidates. Costs B x N x D multiply-adds and B x N floats.
        """
        if self.item_emb is None:
            raise ValueError(
                "the item head needs model.item_id_embedding: true (the item-ID table is its output layer)"
            )
        last_BD = memory.states_BSD[:, -1]
        with torch.autocast(last_BD.device.type, enabled=False):
            return last_BD.float() @ self.item_emb.weight.float().T

    def decode_step(self, memory: EncoderMemory, generated_BT: torch.Tensor) -> torch.Tensor:
        """Logits [B, C_max] for code number T (item T // L, level T % L) given the T codes so far.

        Recomputes the decoder over the whole prefix: the same math as forward(), so the logits
        match it exactly. The reference for the cached path (start_decoding / decode_next).
        """
        if generated_BT.dim() != 2 or generated_BT.shape[0] != memory.states_BSD.shape[0]:
            raise ValueError(
                f"generated_BT must be [B, T] with B={memory.states_BSD.shape[0]} (the memory's rows), "
                f"got shape {tuple(generated_BT.shape)}"
            )
        B, T = generated_BT.shape
        L = self.num_levels
        item, level = divmod(T, L)
        if item >= self.session_len:
            raise ValueError(f"cannot decode item {item + 1}: the model was built for {self.session_len}-item sessions")
        # Pad the partial item with dummy codes to reuse _decoder_inputs, then cut the inputs
        # right after the last real one: position item*(L+1) + level predicts code `level`.
        padded_BN = torch.cat([generated_BT, generated_BT.new_zeros(B, (item + 1) * L - T)], dim=1)
        inputs_BPD = self._decoder_inputs(padded_BN.view(B, item + 1, L))[:, : item * (L + 1) + level + 1]
        hidden_BPD, _ = self._decode(inputs_BPD, memory)
        table_CD = self.code_emb.weight.view(L, self.c_max, -1)[level]
        logits_BC = hidden_BPD[:, -1] @ table_CD.T
        return logits_BC.float().masked_fill(~self.code_mask_LC[level], float("-inf"))

    # ---------------------------------------------------------------- cached decoding
    def start_decoding(self, memory: EncoderMemory) -> DecoderCache:
        """An empty decoder cache over `memory` (one row per request; never repeated per beam)."""
        return DecoderCache(
            [layer.start_cache(memory.states_BSD) for layer in self.decoder_layers],
            (~memory.pad_BS)[:, None, None, :],
        )

    def decode_next(self, cache: DecoderCache, generated_NT: torch.Tensor) -> torch.Tensor:
        """decode_step's logits [N, C_max], feeding the decoder only the positions the cache
        does not hold yet; the caller keeps the cache's rows aligned with generated_NT's
        (cache.reorder after each beam step)."""
        N, T = generated_NT.shape
        L = self.num_levels
        item, level = divmod(T, L)
        if item >= self.session_len:
            raise ValueError(f"cannot decode item {item + 1}: the model was built for {self.session_len}-item sessions")
        last = item * (L + 1) + level  # the position whose output predicts code T
        if last < cache.positions:
            raise ValueError(f"the cache already holds {cache.positions} positions; code {T} needs position {last}")
        new_vectors = []
        for position in range(cache.positions, last + 1):
            m, j = divmod(position, L + 1)  # j == 0: item m's BOS, else its code j - 1
            if j == 0:
                new_vectors.append(self.bos_emb.expand(N, -1))
            else:
                new_vectors.append(self.code_emb(generated_NT[:, m * L + j - 1] + (j - 1) * self.c_max))
        positions_Q = torch.arange(cache.positions, last + 1, device=generated_NT.device)
        x_NQD = self.dropout(torch.stack(new_vectors, dim=1) + self.decoder_pos_emb(positions_Q))
        for layer, layer_cache in zip(self.decoder_layers, cache.layers):
            x_NQD = layer.decode_cached(x_NQD, layer_cache, cache.memory_allowed_B11S)
        cache.positions = last + 1
        hidden_ND = self.decoder_norm(x_NQD[:, -1])
        table_CD = self.code_emb.weight.view(L, self.c_max, -1)[level]
        logits_NC = hidden_ND @ table_CD.T
        return logits_NC.float().masked_fill(~self.code_mask_LC[level], float("-inf"))
