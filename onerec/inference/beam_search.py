"""Trie-constrained beam search: every beam is always a prefix of a real item's code tuple.

Shape legend: B requests, W beams per request, N = B * W beam rows (N = B at the first step),
S history length, L code levels, C codebook size (C_max), T codes generated so far, I items
(the catalogue, in the item head's scores).

The encoder runs once per request; each of the L steps runs the decoder for all beams, then
one `constrained_beam_step` (log-softmax, valid trie children only, top W per request) and a
gather that reorders the generated prefixes by parent. The first step has one row per
request, the root, and fans out to W beams (the decoder and the step would otherwise score
W identical copies of it):

    step t:  generated_NT --decode_step--> logits_NC --beam step--> tokens_N, parents_N
             generated_N(T+1) = cat(generated_NT[parents_N], tokens_N)

Two guards run before the W-wide steps allocate anything:
- Width: a search never runs more beams than there are distinct answers (items, or item
  sequences for sessions). The extra beams could only ever be dead, so the result is the same
  (the extra output columns are dead beams) and the memory is that of the useful width.
- Memory: everything per beam row (the encoder memory repeated per beam and its attention
  projections, the decoder's activations, the logits) scales with N = B * W; the estimate
  (`estimate_beam_search_bytes`) is compared with the memory left on the device and a
  ResourceError says what it needs, what there is, and which settings to lower.

Optionally (item_score_weight > 0) the final beams are reranked by the model's item head
(OneRecModel.item_logits), read from the same encoder pass: score = beam log-prob +
weight x log-softmax over the catalogue of the item's logit. The search itself, and so the set
of W items, is unchanged; only their order and scores are.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from onerec.errors import ResourceError
from onerec.kernels.constrained_beam import constrained_beam_step
from onerec.tokenizer.trie import Trie

# What a ResourceError tells the user to lower, unless the caller names its own settings.
DEFAULT_SETTINGS = "the number of requests per call (batch size) or the beam width"


@dataclass
class BeamSearchOutput:
    items_BW: torch.Tensor  # int64 item_index, -1 for dead beams
    scores_BW: torch.Tensor  # float32 sum of per-level log-probs, -inf for dead beams; sorted descending
    codes_BWL: torch.Tensor  # int64 code tuple of each beam's item, all -1 for dead beams


def num_leaves(trie: Trie) -> int:
    """Items in the trie: its depth-L nodes, each exactly one item (no host sync: the node
    ranges are Python ints)."""
    return trie.depth_starts[trie.depth + 1] - trie.depth_starts[trie.depth]


def estimate_beam_search_bytes(
    model,
    requests: int,
    beam_width: int,
    history_len: int,
    trie: Trie,
    session_len: int = 1,
    excluded_per_request: int = 0,
    cached: bool = False,
) -> int:
    """The peak bytes a search of `requests` x `beam_width` beams allocates, roughly: within
    about 25% of the peak measured on CPU for the OneRec model (dense and MoE, S 5..100,
    D 64..256, sessions of 1..5 items), enough to tell a search that fits from one that
    needs several times the memory there is.

    Per beam row N = B * W (fp32, 4 bytes): the encoder memory repeated per beam and the
    key/value projection of it that each cross-attention computes, 3 x (S + 1) x D; the
    decoder's activations over the P = M * (L + 1) - 1 positions of the longest prefix, per
    position its FFN (x top_k with MoE, x 1.5 for the activation), a few D-wide tensors and
    the cross-attention weights, 3 x H x (S + 1); the logits and their log-softmax, 4 x C;
    and, when items are excluded, the X excluded ids per row (int64) and the
    leaf-versus-excluded comparison of the last level (Bd x X bytes). The encoder runs once
    per request: (S + 1) x (1.5 F + 8 D + H (S + 1)) per request. A model without a `cfg`
    (ModelConfig) is sized from the trie's codebook only.

    cached (the KV-cached decoder): the memory is not repeated per beam, and each step runs
    the decoder over 1 new position (2 where a session's item ends); per beam row instead, each decoder layer's
    self-attention keys and values over P positions, twice (the reorder copies them), and per
    request each layer's cross-attention keys and values, 2 x (S + 1) x D.
    """
    cfg = getattr(model, "cfg", None)
    D = getattr(cfg, "d_model", 0)
    F = getattr(cfg, "d_ff", 0)
    H = getattr(cfg, "num_heads", 0)
    moe = getattr(cfg, "moe", None)
    ffn_copies = moe.top_k if moe is not None and moe.enabled else 1
    S1, L, C = history_len + 1, trie.depth, max(trie.codebook_sizes)
    P = session_len * (L + 1) - 1
    Bd = trie.level_child_tokens[-1].shape[1] if trie.level_child_tokens else 0
    activations = 1.5 * F * ffn_copies + 8 * D + 3 * H * S1  # per decoder position
    per_request = S1 * (1.5 * F + 8 * D + H * S1) * 4
    if cached:
        layers = getattr(cfg, "decoder_layers", 1)
        new_positions = 2 if session_len > 1 else 1
        per_beam = layers * 2 * 2 * P * D * 4 + new_positions * activations * 4 + 4 * C * 4
        per_request += layers * 2 * S1 * D * 4
    else:
        per_beam = 3 * S1 * D * 4 + P * activations * 4 + 4 * C * 4
    per_beam += excluded_per_request * (8 + Bd)
    return int(requests * beam_width * per_beam + requests * per_request)


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`, or None when it cannot be told.

    CUDA: the device's free memory plus what PyTorch's caching allocator holds unused (it
    hands that out again first). CPU: the available RAM (psutil when installed, else the
    free pages), capped by the cgroup limit of a container or Slurm job when there is one.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
            return None
    cgroup_left = _cgroup_memory_left()
    return available if cgroup_left is None else min(available, cgroup_left)


def _cgroup_memory_left() -> int | None:
    """limit - usage of this process's memory cgroup, or None without a limit: its own group
    (named in /proc/self/cgroup, as under Slurm) or the namespace root (as in a container),
    cgroup v2 ("memory.max") or v1 ("memory.limit_in_bytes")."""
    v2, v1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")
    own = {"v2": "", "v1": ""}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                own["v2"] = path.lstrip("/")
            elif "memory" in controllers.split(","):
                own["v1"] = path.lstrip("/")
    except (OSError, ValueError):
        pass
    candidates = [
        (v2 / own["v2"], "memory.max", "memory.current"),
        (v1 / own["v1"], "memory.limit_in_bytes", "memory.usage_in_bytes"),
        (v2, "memory.max", "memory.current"),
        (v1, "memory.limit_in_bytes", "memory.usage_in_bytes"),
    ]
    for folder, limit_name, usage_name in candidates:
        try:
            limit = (folder / limit_name).read_text().strip()
            usage = int((folder / usage_name).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**60:  # v1 writes "no limit" as a huge number
            return None
        return max(0, int(limit) - usage)
    return None


def check_beam_search_memory(
    model,
    requests: int,
    beam_width: int,
    history_len: int,
    trie: Trie,
    device: torch.device,
    session_len: int = 1,
    excluded_per_request: int = 0,
    settings: str = DEFAULT_SETTINGS,
    cached: bool = False,
) -> None:
    """ResourceError when the search's estimated peak (estimate_beam_search_bytes) exceeds the
    memory left on `device`; the message gives both and tells the user to lower `settings`."""
    needed = estimate_beam_search_bytes(
        model, requests, beam_width, history_len, trie, session_len, excluded_per_request, cached
    )
    available = available_memory(device)
    if available is None or needed <= available:
        return
    raise ResourceError(
        f"beam search of {requests} request(s) x {beam_width} beams over a {history_len}-item history "
        f"needs about {_size(needed)} of {device.type.upper()} memory, but only {_size(available)} is available: "
        f"lower {settings} (memory grows with their product)"
    )


def _size(num_bytes: float) -> str:
    """'23.1 GiB', or '64 MiB' below a GiB."""
    return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.0f} MiB"


def _pad_beams(tensor: torch.Tensor, width: int, fill: float) -> torch.Tensor:
    """[B, W', ...] -> [B, width, ...], the new columns `fill` (dead beams)."""
    if tensor.shape[1] == width:
        return tensor
    shape = (tensor.shape[0], width - tensor.shape[1], *tensor.shape[2:])
    return torch.cat([tensor, tensor.new_full(shape, fill)], dim=1)


def model_device(model: torch.nn.Module, fallback: torch.device) -> torch.device:
    """The device of the model's first parameter or buffer (fallback for a model with neither)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return fallback


def check_item_scores(model, item_score_weight: float, setting: str = "eval.item_score_weight") -> None:
    """ValueError unless item_score_weight is a finite number >= 0 and, when > 0, the model
    has the item head (an item-ID embedding); `setting` names the option in the message."""
    if not (math.isfinite(item_score_weight) and item_score_weight >= 0):
        raise ValueError(f"{setting}={item_score_weight}: expected a finite number >= 0")
    if item_score_weight > 0 and getattr(model, "item_emb", None) is None:
        raise ValueError(
            f"{setting}={item_score_weight} reranks the beams by the model's item head, but this model has no "
            f"item-ID embedding (model.item_id_embedding: false): set {setting}=0, or train a model with "
            "model.item_id_embedding=true and train.item_loss_weight > 0"
        )


def rerank_by_item_scores(
    model, memory, output: BeamSearchOutput, item_score_weight: float
) -> BeamSearchOutput:
    """`output` with each beam's score raised by item_score_weight x the item head's
    log-probability of its item (log-softmax over the whole catalogue), re-sorted descending.

    `memory` is the search's encoder memory, one row per request. Dead beams keep -inf and
    sort last; equal scores keep the beam order (stable sort).
    """
    log_probs_BI = torch.log_softmax(model.item_logits(memory), dim=-1)
    item_log_probs_BW = log_probs_BI.gather(1, output.items_BW.clamp(min=0))
    scores_BW = output.scores_BW + item_score_weight * item_log_probs_BW  # -inf + finite stays -inf
    order_BW = torch.sort(scores_BW, dim=1, descending=True, stable=True).indices
    L = output.codes_BWL.shape[-1]
    return BeamSearchOutput(
        items_BW=output.items_BW.gather(1, order_BW),
        scores_BW=scores_BW.gather(1, order_BW),
        codes_BWL=output.codes_BWL.gather(1, order_BW.unsqueeze(-1).expand(-1, -1, L)),
    )


def _caches(model, use_cache: bool) -> bool:
    """Whether a search with `use_cache` will decode through the model's KV cache."""
    return use_cache and hasattr(model, "start_decoding")


class BeamDecoder:
    """The decoder's logits for every beam row at each step, with or without a KV cache.

    Cached (the model's start_decoding / decode_next, when use_cache and the model has them):
    the encoder states stay one row per request and each step feeds only the new decoder
    positions; after a beam step, `follow` reorders the cached keys/values by parent. Without
    the cache (use_cache=False, or a model with decode_step only, such as the tests' scripted
    models): every step recomputes the decoder over the whole prefix, with the encoder
    states repeated per beam at the first fan-out.
    """

    def __init__(self, model, memory, use_cache: bool) -> None:
        self.model = model
        self.memory = memory
        self.cache = model.start_decoding(memory) if _caches(model, use_cache) else None
        self.rows_per_request = 1

    def logits(self, generated_NT: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            return self.model.decode_next(self.cache, generated_NT)
        return self.model.decode_step(self.memory, generated_NT)

    def follow(self, parents_N: torch.Tensor, beam_width: int) -> None:
        """The rows after a beam step: row n continues row parents_N[n]."""
        if self.cache is not None:
            self.cache.reorder(parents_N)
        elif self.rows_per_request == 1:
            self.memory = self.memory.repeat_beams(beam_width)
        self.rows_per_request = beam_width


@torch.inference_mode()
def constrained_beam_search(
    model,
    history_codes_BSL: torch.Tensor,
    trie: Trie,
    beam_width: int,
    user_B: torch.Tensor | None = None,
    history_items_BS: torch.Tensor | None = None,
    exclude_items_BX: torch.Tensor | None = None,
    settings: str = DEFAULT_SETTINGS,
    use_cache: bool = True,
    item_score_weight: float = 0.0,
) -> BeamSearchOutput:
    """Top-`beam_width` items per request by beam search restricted to the trie.

    exclude_items_BX (item indices, -1 padding) are never returned: at the last level their
    leaves are masked out of each request's beams, so the W beams go to other items (used to
    leave out what the user already has, where items are not consumed twice).

    A beam width above the number of items runs as one beam per item (the output keeps
    `beam_width` columns, the extra ones dead). Before the search allocates its W-wide
    tensors, its memory is estimated: ResourceError when it would not fit, telling the user
    to lower `settings` (e.g. "eval.batch_size (256) or eval.beam_width (100000)").

    use_cache=False recomputes the decoder over the whole prefix at every step (the
    reference path; see BeamDecoder). Runs on the model's device, in whatever train/eval mode
    the caller left the model (call `model.eval()` first for deterministic results).

    item_score_weight > 0 reorders the W final beams by beam log-prob + item_score_weight x the
    item head's log-probability (rerank_by_item_scores; the model needs an item-ID embedding).
    The output's scores are then those combined scores. 0: the beams' own order.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width={beam_width}: expected >= 1")
    check_item_scores(model, item_score_weight, setting="item_score_weight")
    if history_codes_BSL.dim() != 3 or history_codes_BSL.shape[-1] != trie.depth:
        raise ValueError(
            f"history_codes_BSL must be [batch, history, {trie.depth}] (the trie has {trie.depth} code levels), "
            f"got shape {tuple(history_codes_BSL.shape)}"
        )
    device = model_device(model, history_codes_BSL.device)
    # Never more beams than items: the extra ones would be dead at every step.
    B, W, L = history_codes_BSL.shape[0], min(beam_width, max(1, num_leaves(trie))), trie.depth
    excluded = 0 if exclude_items_BX is None else exclude_items_BX.shape[-1]
    check_beam_search_memory(
        model, B, W, history_codes_BSL.shape[1], trie, device, 1, excluded, settings, cached=_caches(model, use_cache)
    )
    trie = trie.to(device)
    history_codes_BSL = history_codes_BSL.to(device)
    user_B = None if user_B is None else user_B.to(device)
    history_items_BS = None if history_items_BS is None else history_items_BS.to(device)
    if exclude_items_BX is not None and (exclude_items_BX.dim() != 2 or exclude_items_BX.shape[0] != B):
        raise ValueError(f"exclude_items_BX must be [batch={B}, X], got shape {tuple(exclude_items_BX.shape)}")
    excluded_rows = None if exclude_items_BX is None else exclude_items_BX.to(device)  # [rows, X]

    # The first step reads one row per request (its root) and fans out to W beams; from then
    # on every request has W rows.
    memory = model.encode(history_codes_BSL, user_B, history_items_BS)  # one row per request
    decoder = BeamDecoder(model, memory, use_cache)
    rows_per_request = 1
    scores_N = torch.zeros(B, device=device)
    states_N = torch.zeros(B, dtype=torch.long, device=device)
    generated_NT = torch.zeros(B, 0, dtype=torch.long, device=device)
    for depth in range(L):
        # Dead beams carry -1 tokens; feed them as code 0 (their logits are never used).
        logits_NC = decoder.logits(generated_NT.clamp(min=0))
        local_states_N, child_tokens, child_nodes = trie.step_tables(depth, states_N)
        if excluded_rows is not None and depth == L - 1:
            logits_NC, scores_N = _mask_excluded_leaves(
                logits_NC, scores_N, local_states_N, child_tokens, child_nodes, trie, excluded_rows
            )
        tokens_N, parents_N, scores_N, states_N = constrained_beam_step(
            logits_NC, scores_N, local_states_N, child_tokens, child_nodes, W, rows_per_request=rows_per_request
        )
        generated_NT = torch.cat([generated_NT[parents_N], tokens_N.unsqueeze(1)], dim=1)
        decoder.follow(parents_N, W)
        if rows_per_request == 1:
            excluded_rows = None if excluded_rows is None else excluded_rows.repeat_interleave(W, dim=0)
            rows_per_request = W

    # After L steps each live beam sits on a leaf. Items are distinct by construction: each
    # leaf is exactly one item, and two beams never share a path (a beam's children are
    # distinct trie nodes and every step keeps each (parent, child) candidate at most once).
    live_N = states_N >= 0
    items_N = torch.where(live_N, trie.node_item[states_N.clamp(min=0)], -1)
    codes_NL = generated_NT.masked_fill(~live_N.unsqueeze(1), -1)
    # The step returns each request's beams sorted by score, dead ones last, so the output is
    # sorted; padding up to beam_width adds dead beams, which sort last.
    output = BeamSearchOutput(
        items_BW=_pad_beams(items_N.view(B, W), beam_width, -1),
        scores_BW=_pad_beams(scores_N.view(B, W), beam_width, float("-inf")),
        codes_BWL=_pad_beams(codes_NL.view(B, W, L), beam_width, -1),
    )
    if item_score_weight > 0:
        output = rerank_by_item_scores(model, memory, output, item_score_weight)
    return output


def _mask_excluded_leaves(
    logits_NC: torch.Tensor,
    scores_N: torch.Tensor,
    local_states_N: torch.Tensor,
    child_tokens: torch.Tensor,
    child_nodes: torch.Tensor,
    trie: Trie,
    excluded_NX: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, beam scores) with -inf at the last-level codes whose leaf is one of the beam's
    excluded items.

    The step's log-softmax then renormalises over the codes left, i.e. it scores an item
    given that it is not an excluded one. A row left with no finite logit at all (every code
    of the level excluded) would make that log-softmax NaN, and whether a NaN candidate sorts
    first or last depends on its sign bit, which differs between CPU and GPU arithmetic: such
    a beam is made dead instead (score -inf, finite logits).
    """
    rows_N = local_states_N.clamp(min=0)
    nodes_NK = child_nodes[rows_N]  # [N, Bd], -1 padding
    items_NK = torch.where(nodes_NK >= 0, trie.node_item[nodes_NK.clamp(min=0)], -1)
    hit_NK = (items_NK.unsqueeze(-1) == excluded_NX.unsqueeze(1)).any(-1) & (items_NK >= 0)
    # amax, not a plain scatter: padding entries (token clamped to 0, hit False) must not
    # overwrite a real hit on code 0.
    mask_NC = torch.zeros(logits_NC.shape, dtype=torch.int8, device=logits_NC.device)
    mask_NC.scatter_reduce_(1, child_tokens[rows_N].clamp(min=0), hit_NK.to(torch.int8), reduce="amax")
    logits_NC = logits_NC.masked_fill(mask_NC.bool(), float("-inf"))
    emptied_N = torch.isneginf(logits_NC).all(dim=1)
    logits_NC = logits_NC.masked_fill(emptied_N.unsqueeze(1), 0.0)
    return logits_NC, scores_N.masked_fill(emptied_N, float("-inf"))


@dataclass
class SessionSearchOutput:
    items_BWM: torch.Tensor  # int64 item_index per session slot, -1 for dead beams
    scores_BW: torch.Tensor  # float32 session log-prob (every code of every item), sorted descending
    codes_BWML: torch.Tensor  # int64 code tuples, all -1 for dead beams


@torch.inference_mode()
def generate_sessions(
    model,
    history_codes_BSL: torch.Tensor,
    trie: Trie,
    num_sessions: int,
    session_len: int,
    user_B: torch.Tensor | None = None,
    history_items_BS: torch.Tensor | None = None,
    settings: str = DEFAULT_SETTINGS,
    use_cache: bool = True,
) -> SessionSearchOutput:
    """The `num_sessions` best M-item sessions per request, code by code, every item a real one.

    The same beam search as `constrained_beam_search`, run for M * L steps: whenever a beam
    completes an item (reaches a trie leaf) it restarts at the root for the next item, and
    the decoder sees the BOS that separates items. The W output beams are W distinct
    sessions (distinct code paths), as IPA samples them (OneRec section 3.4).

    As there: at most one beam per distinct session (items ** M), the memory checked first
    (ResourceError naming `settings`).
    """
    if num_sessions < 1 or session_len < 1:
        raise ValueError(f"num_sessions={num_sessions} and session_len={session_len}: expected >= 1")
    if session_len > model.session_len:
        raise ValueError(f"session_len={session_len} exceeds the model's session_len={model.session_len}")
    if history_codes_BSL.dim() != 3 or history_codes_BSL.shape[-1] != trie.depth:
        raise ValueError(
            f"history_codes_BSL must be [batch, history, {trie.depth}], got shape {tuple(history_codes_BSL.shape)}"
        )
    device = model_device(model, history_codes_BSL.device)
    # Never more beams than distinct sessions (every prefix is one of at most items ** M).
    W = min(num_sessions, max(1, num_leaves(trie)) ** session_len)
    B, L, M = history_codes_BSL.shape[0], trie.depth, session_len
    N = B * W
    check_beam_search_memory(
        model, B, W, history_codes_BSL.shape[1], trie, device, M, 0, settings, cached=_caches(model, use_cache)
    )
    trie = trie.to(device)
    user_B = None if user_B is None else user_B.to(device)
    history_items_BS = None if history_items_BS is None else history_items_BS.to(device)
    decoder = BeamDecoder(model, model.encode(history_codes_BSL.to(device), user_B, history_items_BS), use_cache)

    # As in constrained_beam_search: one row per request until the first step fans out to W.
    rows_per_request = 1
    scores_N = torch.zeros(B, device=device)
    states_N = torch.zeros(B, dtype=torch.long, device=device)
    generated_NT = torch.zeros(B, 0, dtype=torch.long, device=device)
    items_NM = torch.full((B, M), -1, dtype=torch.long, device=device)
    for m in range(M):
        for depth in range(L):
            logits_NC = decoder.logits(generated_NT.clamp(min=0))
            local_states_N, child_tokens, child_nodes = trie.step_tables(depth, states_N)
            tokens_N, parents_N, scores_N, states_N = constrained_beam_step(
                logits_NC, scores_N, local_states_N, child_tokens, child_nodes, W, rows_per_request=rows_per_request
            )
            generated_NT = torch.cat([generated_NT[parents_N], tokens_N.unsqueeze(1)], dim=1)
            items_NM = items_NM[parents_N]
            decoder.follow(parents_N, W)
            rows_per_request = W
        live_N = states_N >= 0
        items_NM[:, m] = torch.where(live_N, trie.node_item[states_N.clamp(min=0)], -1)
        states_N = torch.where(live_N, torch.zeros_like(states_N), states_N)  # next item starts at the root
    live_N = items_NM[:, -1] >= 0
    items_NM = items_NM.masked_fill(~live_N.unsqueeze(1), -1)
    codes_NML = generated_NT.view(N, M, L).masked_fill(~live_N.view(N, 1, 1), -1)
    return SessionSearchOutput(
        items_BWM=_pad_beams(items_NM.view(B, W, M), num_sessions, -1),
        scores_BW=_pad_beams(scores_N.view(B, W), num_sessions, float("-inf")),
        codes_BWML=_pad_beams(codes_NML.view(B, W, M, L), num_sessions, -1),
    )
