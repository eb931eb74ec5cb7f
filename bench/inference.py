"""End-to-end recommendation speed: one user history in, the top-10 items out.

    python bench/inference.py --export /work/scale/beauty_export     # bench/results/inference_<tag>.{json,md}
    python bench/inference.py --export DIR --catalogues beauty --batches 1 --beams 20 --seconds-per-cell 5
    python bench/inference.py --export DIR --quick                     # a smoke run: tiny catalogue, few batches

A request is one user's history (item indices, at most data.max_history of them) and its answer
the 10 best items. Requests are served in batches of B (1 and 64 by default) with beam width W
(20 and 50), by three systems:

  ours          onerec.inference.beam_search.constrained_beam_search(..., use_cache=True): the
                OneRec model, KV-cached decoding, the trie-constrained beam step
  ours_nocache  the same with use_cache=False: every step runs the decoder over the whole prefix.
                A checkout whose constrained_beam_search has no use_cache keyword only has this
                path; "ours" is then skipped and the results say so.
  t5            Hugging Face transformers' T5ForConditionalGeneration with the OneRec model's
                dimensions (d_model, d_ff, heads, d_kv = d_model / heads, encoder and decoder
                layers), randomly initialised (only speed is compared), TIGER style: vocabulary =
                every level's codes (L x C, C the largest codebook) + pad, eos and decoder start;
                encoder input = the history's code tokens, flattened (S x L tokens); decoded by
                generate(num_beams=W, num_return_sequences=10, max_new_tokens=L,
                prefix_allowed_tokens_fn=<a Python dict from the decoded prefix to the allowed
                next tokens>), with its KV cache (generate's default). Before timing, its answers
                are checked to be real items, distinct within each request.

Timed per batch, after warm-up batches, with time.perf_counter (plus the process CPU time, as
other jobs on a shared machine slow the wall clock): the codes lookup of the histories (T5:
their tokens), the search, and the top-10 item indices on the host. Every request of a batch
finishes when the batch does, so a request's latency is its batch's time; p50 / p99 are over the
timed batches, requests/s = requests / total time. A cell stops after --repetitions batches or
--seconds-per-cell seconds, whichever comes first (at least --min-batches). Every batch holds
different histories; a batch is cut to its longest history (the left columns that are padding
in every row are dropped), the same tensors for every system. The answers leave history items
in (no exclusion), as T5's generate cannot exclude them.

Catalogues:
  beauty        the export given by --export (its trained weights, semantic IDs and trie).
                Histories: the test split of the run's data (--data-dir, else <run>/data found
                from the export's location or its manifest) when it is there and matches the
                export's catalogue; else random items with lengths drawn like a log (below).
  synthetic1m   --synthetic-items (1,000,000) random distinct code tuples: --synthetic-levels
                (3) levels of --synthetic-codebook (256) codes + a dedup level, the trie built
                over them (build_trie), the model of the export's config built over this
                codebook, randomly initialised (seed 0; item-ID embedding included when the
                export has one). Histories: random items, lengths drawn like a log.
                T5's prefix dict is built once, outside timing; its build time and the process's
                RSS growth are recorded.

"Beauty's full test split decoded": the time to run ours and ours_nocache over as many histories
as the split has users (22,363 for Beauty), beam eval.beam_width (20), batches of
eval.batch_size (256), leaving out history items when eval.exclude_history says so, as
`onerec evaluate` decodes them (without the metric bookkeeping). Real test histories when the
data is found, else that many random histories.

Random histories: item indices uniform over the catalogue; lengths drawn from the real test
histories' lengths when the data is found, else 1 + a lognormal (median 6, sigma 0.6), capped at
max_history. Everything random is seeded (--seed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devices import accelerator_name, device_slug  # noqa: E402  (same folder)
from figures import save_figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

SYSTEMS = ("ours", "ours_nocache", "t5")
SYSTEM_LABELS = {"ours": "ours (KV cache)", "ours_nocache": "ours, no cache", "t5": "transformers T5"}
CATALOGUES = ("beauty", "synthetic1m")
TOP_K = 10
# T5's special tokens; level l's code c is token FIRST_CODE + l * C + c.
PAD, EOS, DECODER_START, FIRST_CODE = 0, 1, 2, 3
BEAUTY_TEST_USERS = 22_363  # the test split's size when the data is not found
# Progress bars on stderr; redrawn at most every 5 s when stderr is a log file, not a terminal.
PROGRESS = dict(file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 5.0)


# ---------------------------------------------------------------------------------------------
# catalogues and histories
# ---------------------------------------------------------------------------------------------


@dataclass
class Catalogue:
    name: str
    model: torch.nn.Module  # OneRecModel, eval mode, on the device
    codes_NL: torch.Tensor  # [N, L] on the device
    codebook_sizes: list[int]
    trie: object  # onerec.tokenizer.trie.Trie on the device
    max_history: int
    histories_RS: np.ndarray  # the pool requests are drawn from: item indices, right-aligned, -1 padding
    histories: str  # where the pool comes from
    weights: str  # trained / random
    info: dict = field(default_factory=dict)  # build times, sizes
    test_histories_RS: np.ndarray | None = None  # beauty only
    test_source: str = ""
    real_lengths: np.ndarray | None = None  # the lengths of every real test history (beauty, data found)
    eval_settings: dict = field(default_factory=dict)
    config: object = None  # the export's RootConfig (beauty only)

    @property
    def num_items(self) -> int:
        return int(self.codes_NL.shape[0])


def history_lengths(count: int, max_history: int, rng: np.random.Generator,
                    real_lengths: np.ndarray | None = None) -> np.ndarray:
    """[count] history lengths in [1, max_history]: drawn from `real_lengths` when given (the
    lengths of real histories), else 1 + lognormal(log 5, 0.6) rounded (median 6), capped."""
    if real_lengths is not None and len(real_lengths):
        return rng.choice(np.clip(real_lengths, 1, max_history), size=count)
    lengths = 1 + np.rint(rng.lognormal(math.log(5.0), 0.6, size=count)).astype(np.int64)
    return np.clip(lengths, 1, max_history)


def random_histories(num_items: int, count: int, max_history: int, seed: int,
                     real_lengths: np.ndarray | None = None) -> np.ndarray:
    """[count, max_history] int64 random item indices, right-aligned, -1 on the left."""
    rng = np.random.default_rng(seed)
    lengths = history_lengths(count, max_history, rng, real_lengths)
    items = rng.integers(0, num_items, size=(count, max_history))
    real = np.arange(max_history)[None, :] >= (max_history - lengths)[:, None]
    return np.where(real, items, -1).astype(np.int64)


def history_lengths_of(histories_RS: np.ndarray) -> np.ndarray:
    """[R] real items per history row."""
    return (histories_RS >= 0).sum(axis=1)


def find_data_dir(export_dir: Path, given: str | None) -> Path | None:
    """The prepared data the export's run read: --data-dir (a path, or "none" for none), else
    <run>/data beside <run>/pretrain/export, else the run of the manifest's source weights
    (<run>/pretrain/best/model.safetensors)."""
    if given is not None:
        return None if given.lower() == "none" else Path(given)
    candidates = [export_dir.parent.parent / "data"]
    manifest = export_dir / "manifest.json"
    if manifest.is_file():
        source = json.loads(manifest.read_text(encoding="utf-8")).get("source")
        if source:
            candidates.append(Path(source).parent.parent.parent / "data")
    return next((c for c in candidates if (c / "meta.json").is_file()), None)


def load_test_histories(data_dir: Path | None, cfg, num_items: int, quiet: bool) -> tuple[np.ndarray | None, str]:
    """(test-split histories [users, max_history], where from), or (None, why not)."""
    if data_dir is None:
        return None, "no data directory found for the export's run"
    if not (data_dir / "meta.json").is_file():
        return None, f"{data_dir} has no meta.json"
    meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))
    if int(meta.get("items", -1)) != num_items:
        return None, f"{data_dir} has {meta.get('items')} items, the export {num_items}: not the export's data"
    from onerec.data.prepared import load_prepared
    from onerec.data.splits import make_splits

    start = time.perf_counter()
    splits = make_splits(load_prepared(data_dir).sequences, cfg.data)
    histories = np.asarray(splits["test"].history, dtype=np.int64)
    if not quiet:
        print(f"test split of {data_dir}: {len(histories):,} histories ({time.perf_counter() - start:.1f} s)",
              file=sys.stderr)
    return histories, f"the test split of {data_dir} ({len(histories):,} users)"


def load_beauty(args, device: torch.device) -> Catalogue:
    from onerec.export import load_export

    start = time.perf_counter()
    exported = load_export(Path(args.export), device)
    load_s = time.perf_counter() - start
    cfg = exported.cfg
    num_items = int(exported.semantic_ids.codes.shape[0])
    data_dir = find_data_dir(Path(args.export), args.data_dir)
    test, test_source = load_test_histories(data_dir, cfg, num_items, args.quiet)
    rng = np.random.default_rng(args.seed)
    if test is not None:
        pool = test[rng.permutation(len(test))[: args.pool]]
        source = f"real histories: {min(args.pool, len(test)):,} drawn from {test_source}"
        test_count = len(test) if args.test_users is None else min(args.test_users, len(test))
        test_histories = test[:test_count]
        if test_count < len(test):
            test_source = f"the first {test_count:,} of {test_source}"
    else:
        pool = random_histories(num_items, args.pool, cfg.data.max_history, args.seed)
        source = f"random histories ({test_source})"
        test_count = BEAUTY_TEST_USERS if args.test_users is None else args.test_users
        test_histories = random_histories(num_items, test_count, cfg.data.max_history, args.seed + 1)
        why_random = test_source
        test_source = f"{test_count:,} random histories"
        if args.test_users is None:
            test_source += ", as many as Beauty's test split has users"
        test_source += f" ({why_random})"
    return Catalogue(
        name="beauty", model=exported.model, codes_NL=exported.semantic_ids.codes.to(device),
        codebook_sizes=list(exported.semantic_ids.codebook_sizes), trie=exported.trie,
        max_history=cfg.data.max_history, histories_RS=pool, histories=source,
        weights=f"trained ({args.export})", info={"export_load_s": load_s, "export": str(args.export)},
        test_histories_RS=test_histories, test_source=test_source,
        real_lengths=None if test is None else history_lengths_of(test),
        eval_settings={"beam_width": cfg.eval.beam_width, "batch_size": cfg.eval.batch_size,
                       "exclude_history": cfg.eval.exclude_history},
        config=cfg,
    )


def synthetic_codes(num_items: int, codebook: int, levels: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """[num_items, levels + 1] random code tuples made distinct by a dedup level, and the sizes."""
    from onerec.tokenizer.semantic_ids import add_dedup_level

    g = torch.Generator().manual_seed(seed)
    codes, dedup_size = add_dedup_level(torch.randint(0, codebook, (num_items, levels), generator=g))
    return codes, [codebook] * levels + [dedup_size]


def build_synthetic(args, device: torch.device, cfg, real_lengths: np.ndarray | None) -> Catalogue:
    """A random catalogue of args.synthetic_items items with the export's model shape."""
    from onerec.model.onerec import OneRecModel
    from onerec.tokenizer.trie import build_trie

    info = {}
    start = time.perf_counter()
    codes, sizes = synthetic_codes(args.synthetic_items, args.synthetic_codebook, args.synthetic_levels, args.seed)
    info["codes_s"] = time.perf_counter() - start
    start = time.perf_counter()
    trie = build_trie(codes, sizes)
    info["trie_build_s"] = time.perf_counter() - start
    info["trie_nodes"] = trie.num_nodes
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = OneRecModel(cfg.model, sizes, cfg.data.max_history, cfg.data.session_len, num_items=len(codes))
    model.to(device).eval()
    info["model_build_s"] = time.perf_counter() - start
    pool = random_histories(len(codes), args.pool, cfg.data.max_history, args.seed + 2, real_lengths)
    lengths_from = "the Beauty test histories' lengths" if real_lengths is not None else "a lognormal (median 6)"
    return Catalogue(
        name="synthetic1m", model=model, codes_NL=codes.to(device), codebook_sizes=sizes, trie=trie.to(device),
        max_history=cfg.data.max_history, histories_RS=pool,
        histories=f"random histories: {len(pool):,} of uniformly drawn items, lengths from {lengths_from}",
        weights="random (seed %d): the export's config, this codebook" % args.seed, info=info,
    )


# ---------------------------------------------------------------------------------------------
# the systems
# ---------------------------------------------------------------------------------------------


def has_use_cache() -> bool:
    """Whether this checkout's constrained_beam_search takes use_cache (KV-cached decoding)."""
    from onerec.inference.beam_search import constrained_beam_search

    return "use_cache" in inspect.signature(constrained_beam_search).parameters


def trim_history(histories_BS: torch.Tensor) -> torch.Tensor:
    """Drop the left columns that are padding in every row (a batch read at its longest history)."""
    real_S = (histories_BS >= 0).any(dim=0)
    if not bool(real_S.any()):
        return histories_BS[:, -1:]
    first = int(real_S.nonzero()[0])
    return histories_BS[:, first:]


class Ours:
    """constrained_beam_search on the catalogue's OneRec model; run(items_BS, W) -> top-10 items [B, 10]."""

    def __init__(self, catalogue: Catalogue, use_cache: bool | None) -> None:
        """use_cache None: call without the keyword (a checkout without the cache)."""
        self.catalogue = catalogue
        self.kwargs = {} if use_cache is None else {"use_cache": use_cache}

    def search(self, items_BS: torch.Tensor, beam_width: int, exclude: bool = False):
        from onerec.inference.beam_search import constrained_beam_search
        from onerec.model.onerec import lookup_codes

        cat = self.catalogue
        items_BS = items_BS.to(cat.codes_NL.device)
        return constrained_beam_search(
            cat.model, lookup_codes(items_BS, cat.codes_NL), cat.trie, beam_width, history_items_BS=items_BS,
            exclude_items_BX=items_BS if exclude else None, **self.kwargs,
        )

    def run(self, items_BS: torch.Tensor, beam_width: int) -> torch.Tensor:
        return self.search(items_BS, beam_width).items_BW[:, :TOP_K].cpu()


def prefix_table(codes_NL: torch.Tensor, c_max: int) -> dict[tuple, list[int]]:
    """T5's constraint: decoder prefix (decoder start + code tokens) -> sorted allowed next tokens."""
    tokens = (codes_NL.cpu() + FIRST_CODE + torch.arange(codes_NL.shape[1]) * c_max).tolist()
    table: dict[tuple, set] = {}
    for row in tokens:
        key = (DECODER_START,)
        for token in row:
            table.setdefault(key, set()).add(token)
            key = key + (token,)
    return {key: sorted(allowed) for key, allowed in table.items()}


def tuples_to_items(sequences_BKL: torch.Tensor, item_of: dict[tuple, int]) -> torch.Tensor:
    """[B, K] item indices of T5's code tuples (tokens already mapped back to codes). ValueError
    when a tuple is not an item of the catalogue or a request repeats an item: the T5 path must
    answer with real, distinct items for the comparison to be fair."""
    B, K, _ = sequences_BKL.shape
    items = []
    for b, request in enumerate(sequences_BKL.tolist()):
        row = []
        for k, codes in enumerate(request):
            item = item_of.get(tuple(codes))
            if item is None:
                raise ValueError(f"request {b}, answer {k}: code tuple {tuple(codes)} is not an item of the catalogue")
            row.append(item)
        if len(set(row)) != len(row):
            raise ValueError(f"request {b}: repeated items in {row}")
        items.append(row)
    return torch.tensor(items, dtype=torch.long).view(B, K)


class T5:
    """transformers' T5ForConditionalGeneration, TIGER style (see the module docstring)."""

    def __init__(self, catalogue: Catalogue, seed: int) -> None:
        import transformers
        from transformers import T5Config, T5ForConditionalGeneration

        transformers.logging.set_verbosity_error()
        cfg = catalogue.model.cfg
        self.catalogue = catalogue
        self.levels, self.c_max = len(catalogue.codebook_sizes), max(catalogue.codebook_sizes)
        self.config = T5Config(
            vocab_size=FIRST_CODE + self.levels * self.c_max, d_model=cfg.d_model, d_kv=cfg.d_model // cfg.num_heads,
            d_ff=cfg.d_ff, num_layers=cfg.encoder_layers, num_decoder_layers=cfg.decoder_layers,
            num_heads=cfg.num_heads, dropout_rate=0.0, pad_token_id=PAD, eos_token_id=EOS,
            decoder_start_token_id=DECODER_START,
        )
        torch.manual_seed(seed)
        device = catalogue.codes_NL.device
        self.model = T5ForConditionalGeneration(self.config).to(device).eval()
        self.offsets_L = (FIRST_CODE + torch.arange(self.levels) * self.c_max).to(device)
        rss = _rss_bytes()
        start = time.perf_counter()
        self.table = prefix_table(catalogue.codes_NL, self.c_max)
        self.item_of = {tuple(codes): i for i, codes in enumerate(catalogue.codes_NL.cpu().tolist())}
        self.build = {
            "prefix_table_s": time.perf_counter() - start,
            "prefix_entries": len(self.table),
            "prefix_and_item_tables_rss_bytes": None if rss is None else max(0, _rss_bytes() - rss),
            "params": sum(p.numel() for p in self.model.parameters()),
            "vocab_size": self.config.vocab_size,
        }
        table, fallback = self.table, [EOS]

        def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:  # generate calls this once per beam per step
            return table.get(tuple(sent.tolist()), fallback)

        self.allowed = allowed

    def generate(self, items_BS: torch.Tensor, beam_width: int) -> torch.Tensor:
        """[B, 10, L] code tuples (codes, not tokens) of the 10 best sequences per request."""
        from onerec.model.onerec import lookup_codes

        cat = self.catalogue
        items_BS = items_BS.to(cat.codes_NL.device)
        codes_BSL = lookup_codes(items_BS, cat.codes_NL)
        tokens_BSL = torch.where(codes_BSL >= 0, codes_BSL + self.offsets_L, PAD)
        input_ids = tokens_BSL.flatten(1)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=(input_ids != PAD).long(), num_beams=beam_width,
                num_return_sequences=TOP_K, max_new_tokens=self.levels,
                prefix_allowed_tokens_fn=self.allowed, do_sample=False, early_stopping=True, length_penalty=0.0,
            )
        generated = out[:, 1:].view(len(items_BS), TOP_K, -1)  # drop the decoder start
        return generated - self.offsets_L

    def run(self, items_BS: torch.Tensor, beam_width: int) -> torch.Tensor:
        return tuples_to_items(self.generate(items_BS, beam_width).cpu(), self.item_of)


def _rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def request_batches(histories_RS: np.ndarray, batch: int, count: int) -> list[torch.Tensor]:
    """`count` batches of `batch` consecutive pool rows (wrapping around), each trimmed to its
    longest history."""
    pool = torch.from_numpy(histories_RS)
    rows = np.arange(count * batch) % len(pool)
    return [trim_history(pool[rows[i * batch:(i + 1) * batch]]) for i in range(count)]


def time_cell(run: Callable[[torch.Tensor], torch.Tensor], batches: list[torch.Tensor], device: torch.device,
              warmup: int, repetitions: int, seconds: float, min_batches: int, desc: str, quiet: bool) -> dict:
    """Time `run` on batches[warmup:], one batch per call, until `repetitions` batches or
    `seconds` (at least min_batches); the first `warmup` batches are run untimed."""
    from tqdm.auto import tqdm

    for batch in batches[:warmup]:
        run(batch)
    sync(device)
    wall, cpu, requests = [], [], 0
    start = time.perf_counter()
    with tqdm(total=repetitions, desc=desc, disable=quiet, **PROGRESS) as bar:
        for batch in batches[warmup:]:
            if len(wall) >= repetitions or (len(wall) >= min_batches and time.perf_counter() - start >= seconds):
                break
            t0, c0 = time.perf_counter(), time.process_time()
            run(batch)
            sync(device)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            requests += len(batch)
            bar.update()
    wall_a = np.asarray(wall)
    return {
        "batches": len(wall), "requests": requests, "seconds": float(wall_a.sum()),
        "requests_per_s": requests / float(wall_a.sum()),
        "p50_ms": float(np.percentile(wall_a, 50) * 1e3), "p99_ms": float(np.percentile(wall_a, 99) * 1e3),
        "mean_ms": float(wall_a.mean() * 1e3), "max_ms": float(wall_a.max() * 1e3),
        "cpu_ms_per_request": float(np.sum(cpu) * 1e3 / requests),
        "history_len_mean": float(np.mean([(b >= 0).sum(1).float().mean().item()
                                           for b in batches[warmup:warmup + len(wall)]])),
    }


def decode_split(ours: Ours, histories_RS: np.ndarray, beam_width: int, batch_size: int, exclude: bool,
                 device: torch.device, desc: str, quiet: bool) -> dict:
    """Seconds to decode every history (one warm-up batch first, untimed), as the evaluation does."""
    from tqdm.auto import tqdm

    histories = torch.from_numpy(histories_RS)
    ours.search(histories[:batch_size], beam_width, exclude)
    sync(device)
    start, cpu0 = time.perf_counter(), time.process_time()
    for first in tqdm(range(0, len(histories), batch_size), desc=desc, disable=quiet, **PROGRESS):
        ours.search(histories[first:first + batch_size], beam_width, exclude).items_BW.cpu()
    sync(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_seconds": time.process_time() - cpu0, "users": len(histories),
            "users_per_s": len(histories) / seconds}


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------


def bench_catalogue(cat: Catalogue, args, device: torch.device, systems: list[str], cache: bool) -> dict:
    result = {
        "items": cat.num_items, "codebook_sizes": cat.codebook_sizes, "levels": len(cat.codebook_sizes),
        "max_history": cat.max_history, "weights": cat.weights, "histories": cat.histories,
        "model": {"params": sum(p.numel() for p in cat.model.parameters()),
                  "item_id_params": 0 if cat.model.item_emb is None else cat.model.item_emb.weight.numel(),
                  **{k: getattr(cat.model.cfg, k) for k in ("d_model", "num_heads", "encoder_layers", "decoder_layers",
                                                             "d_ff", "item_id_embedding")},
                  "moe": {"enabled": cat.model.cfg.moe.enabled, "num_experts": cat.model.cfg.moe.num_experts,
                          "top_k": cat.model.cfg.moe.top_k}},
        "build": cat.info, "cells": [], "skipped": [],
    }
    runners: dict[str, object] = {}
    for system in systems:
        if system == "ours" and not cache:
            result["skipped"].append({"system": "ours", "reason": "constrained_beam_search has no use_cache keyword "
                                      "in this checkout (no KV-cached decoding yet)"})
        elif system in ("ours", "ours_nocache"):
            runners[system] = Ours(cat, (system == "ours") if cache else None)
        else:
            t5 = T5(cat, args.seed)
            runners[system] = t5
            result["t5"] = dict(t5.build)
            if not args.quiet:
                print(f"{cat.name}: T5 prefix dict of {t5.build['prefix_entries']:,} prefixes in "
                      f"{t5.build['prefix_table_s']:.1f} s", file=sys.stderr)

    # Checks before timing: T5 answers with real, distinct items; ours with and without the cache agree.
    check = torch.from_numpy(cat.histories_RS[: args.check_requests])
    check_beam = max(args.beams)
    answers = {name: runner.run(trim_history(check), check_beam) for name, runner in runners.items()}
    result["checks"] = {"requests": len(check), "beam": check_beam}
    if "t5" in answers:  # T5.run raises when an answer is not a real item or a request repeats one
        result["checks"]["t5_answers_are_distinct_real_items"] = True
    if "ours" in answers and "ours_nocache" in answers:
        same = (answers["ours"] == answers["ours_nocache"]).float().mean()
        result["checks"]["ours_equals_nocache_top10"] = float(same)

    for batch in args.batches:
        count = args.warmup + args.repetitions
        batches = request_batches(cat.histories_RS, batch, count)
        for beam in args.beams:
            for name, runner in runners.items():
                cell = time_cell(
                    lambda b, r=runner, w=beam: r.run(b, w), batches, device, args.warmup, args.repetitions,
                    args.seconds_per_cell, args.min_batches, f"{cat.name} {name} B={batch} W={beam}", args.quiet,
                )
                result["cells"].append({"system": name, "batch": batch, "beam": beam, **cell})
                if not args.quiet:
                    print(f"{cat.name:12s} {name:13s} B={batch:<3d} W={beam:<3d} {cell['requests_per_s']:9.1f} req/s  "
                          f"p50 {cell['p50_ms']:8.1f} ms  p99 {cell['p99_ms']:8.1f} ms  ({cell['batches']} batches)",
                          file=sys.stderr)
    result["ratios"] = ratios(result["cells"])
    return result


def ratios(cells: list[dict]) -> list[dict]:
    """requests/s of ours (and ours_nocache) over T5's, for every (batch, beam) that has both."""
    by_key = {(c["system"], c["batch"], c["beam"]): c["requests_per_s"] for c in cells}
    out = []
    for (system, batch, beam), rate in by_key.items():
        t5 = by_key.get(("t5", batch, beam))
        if system != "t5" and t5:
            out.append({"system": system, "batch": batch, "beam": beam, "speedup_over_t5": rate / t5})
    return out


def bench_test_split(cat: Catalogue, args, device: torch.device, systems: list[str], cache: bool) -> dict:
    settings = cat.eval_settings
    beam, batch_size, exclude = settings["beam_width"], settings["batch_size"], settings["exclude_history"]
    result = {"users": len(cat.test_histories_RS), "histories": cat.test_source, "beam": beam, "batch_size": batch_size,
              "exclude_history": exclude, "target_s": 60.0}
    for system in ("ours", "ours_nocache"):
        if system not in systems or (system == "ours" and not cache):
            continue
        ours = Ours(cat, (system == "ours") if cache else None)
        result[system] = decode_split(ours, cat.test_histories_RS, beam, batch_size, exclude, device,
                                      f"test split {system}", args.quiet)
        if not args.quiet:
            print(f"test split {system}: {result[system]['seconds']:.1f} s for {result['users']:,} users",
                  file=sys.stderr)
    return result


def describe_model(m: dict) -> str:
    ffn = f"MoE {m['moe']['num_experts']} experts top-{m['moe']['top_k']}" if m["moe"]["enabled"] else "dense FFN"
    params = f"{m['params'] / 1e6:.2f}M params"
    if m["item_id_embedding"]:
        params += f" ({m['item_id_params'] / 1e6:.2f}M of them the item-ID embedding)"
    return (f"d_model {m['d_model']}, {m['num_heads']} heads, {m['encoder_layers']}+{m['decoder_layers']} layers, "
            f"d_ff {m['d_ff']}, {ffn}, item-ID embedding {'on' if m['item_id_embedding'] else 'off'}, {params}")


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"# End-to-end recommendation speed, {report['device']}, {report['date']}",
        "",
        f"`{report['command']}`",
        "",
        f"torch {report['torch']}, transformers {report['transformers']}, {report['threads']} torch thread(s), "
        f"device {report['device_type']}. Machine load (1-min average): {report['load_average_1min']['before']:.1f} "
        f"before, {report['load_average_1min']['after']:.1f} after, on {report['load_average_1min']['cpus']} CPUs.",
        "",
        f"A request = one user's history -> the top-{TOP_K} items. Each cell: {s['warmup']} untimed warm-up "
        f"batch{'' if s['warmup'] == 1 else 'es'}, then up to "
        f"{s['repetitions']} timed batches or {s['seconds_per_cell']:g} s (at least {s['min_batches']}). All requests "
        "of a batch finish together, so a request's latency is its batch's time: p50/p99 are over the timed batches; "
        "requests/s = requests / total time; x T5 = requests/s over T5's at the same batch and beam. Timed: codes "
        "lookup, search, top-10 item indices on the host. CPU ms/request is process CPU time: on a shared machine "
        "the wall clock also counts time spent waiting for a core.",
        "",
    ]
    if not report["kv_cache_available"]:
        lines += ["**No KV cache in this checkout** (constrained_beam_search has no use_cache): "
                  "\"ours, no cache\" is today's decoding; \"ours\" was not run.", ""]
    for name, cat in report["catalogues"].items():
        m = cat["model"]
        lines += [
            f"## {name}: {cat['items']:,} items, codebooks {cat['codebook_sizes']}",
            "",
            f"Model: {describe_model(m)}; "
            f"weights {cat['weights']}. Histories: {cat['histories']}.",
        ]
        if "t5" in cat:
            t = cat["t5"]
            rss = t["prefix_and_item_tables_rss_bytes"]
            lines += [
                "",
                f"T5: vocabulary {t['vocab_size']:,}, {t['params'] / 1e6:.2f}M params "
                "(dense FFN; no item-ID embedding), "
                f"random weights. Its Python prefix dict ({t['prefix_entries']:,} prefixes) and tuple -> item dict: "
                f"{t['prefix_table_s']:.1f} s to build, outside timing"
                + (f", {rss / 2**20:,.0f} MiB of RSS growth." if rss is not None else "."),
            ]
        build = cat["build"]
        if "trie_build_s" in build:
            lines += ["", f"Built outside timing: codes {build['codes_s']:.1f} s, trie ({build['trie_nodes']:,} nodes) "
                      f"{build['trie_build_s']:.1f} s, model {build['model_build_s']:.1f} s."]
        checks = cat.get("checks", {})
        notes = []
        if checks.get("t5_answers_are_distinct_real_items"):
            notes.append(f"T5's top-{TOP_K} on {checks['requests']} requests (beam {checks['beam']}) "
                         "are all real, distinct items")
        if "ours_equals_nocache_top10" in checks:
            notes.append(f"ours and ours-no-cache give the same item at {checks['ours_equals_nocache_top10']:.1%} of "
                         f"the {checks['requests']} x {TOP_K} top-{TOP_K} positions")
        if notes:
            lines += ["", "Checks: " + "; ".join(notes) + "."]
        lines += ["", "| batch | beam | system | requests/s | x T5 | p50 ms | p99 ms | batches | CPU ms/request |",
                  "|---|---|---|---|---|---|---|---|---|"]
        speedup = {(r["system"], r["batch"], r["beam"]): r["speedup_over_t5"] for r in cat["ratios"]}
        for c in sorted(cat["cells"], key=lambda c: (c["batch"], c["beam"], SYSTEMS.index(c["system"]))):
            ratio = speedup.get((c["system"], c["batch"], c["beam"]))
            lines.append(f"| {c['batch']} | {c['beam']} | {SYSTEM_LABELS[c['system']]} | {c['requests_per_s']:,.1f} "
                         f"| {'' if ratio is None else f'{ratio:.2f}'} | {c['p50_ms']:,.1f} | {c['p99_ms']:,.1f} "
                         f"| {c['batches']} | {c['cpu_ms_per_request']:,.1f} |")
        for skipped in cat["skipped"]:
            lines += ["", f"Not run: {SYSTEM_LABELS[skipped['system']]}: {skipped['reason']}."]
        headline = [r for r in cat["ratios"] if (r["batch"], r["beam"]) == (64, 50)]
        if headline:
            lines += ["", "At batch 64, beam 50, requests/s over T5's: "
                      + ", ".join(f"{SYSTEM_LABELS[r['system']]} {r['speedup_over_t5']:.2f}x" for r in headline) + "."]
        lines.append("")
    split = report.get("test_split")
    if split:
        lines += [
            "## Beauty's full test split decoded",
            "",
            f"{split['users']:,} histories: {split['histories']}; beam {split['beam']}, batches of "
            f"{split['batch_size']}, history items {'left out' if split['exclude_history'] else 'kept'} "
            "(the export's eval.exclude_history), histories read whole (not cut to each batch's longest): as "
            f"`onerec evaluate` decodes them. One untimed warm-up batch. Target: under {split['target_s']:.0f} s "
            "with the cache.",
            "",
            "| system | seconds | users/s | CPU seconds |",
            "|---|---|---|---|",
        ]
        for system in ("ours", "ours_nocache"):
            if system in split:
                r = split[system]
                lines.append(f"| {SYSTEM_LABELS[system]} | {r['seconds']:,.1f} | {r['users_per_s']:,.0f} "
                             f"| {r['cpu_seconds']:,.1f} |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="a model export (<run.out_dir>/pretrain/export)")
    p.add_argument("--data-dir", default=None, help="the prepared data of the export's run (default: found from the "
                   "export; 'none': random histories)")
    p.add_argument("--catalogues", default=",".join(CATALOGUES), help=f"comma-separated, of {','.join(CATALOGUES)}")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {','.join(SYSTEMS)}")
    p.add_argument("--batches", default="1,64", help="requests per batch, comma-separated")
    p.add_argument("--beams", default="20,50", help="beam widths, comma-separated (>= 10)")
    p.add_argument("--seconds-per-cell", type=float, default=60.0, help="cap on timed seconds per cell")
    p.add_argument("--repetitions", type=int, default=300, help="most timed batches per cell")
    p.add_argument("--min-batches", type=int, default=5, help="fewest timed batches per cell, whatever the time cap")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches per cell")
    p.add_argument("--pool", type=int, default=4096, help="distinct histories requests are drawn from")
    p.add_argument("--test-users", type=int, default=None,
                   help="histories of the test-split run (default: the whole split, or 22,363 random ones); 0: skip")
    p.add_argument("--synthetic-items", type=int, default=1_000_000)
    p.add_argument("--synthetic-codebook", type=int, default=256)
    p.add_argument("--synthetic-levels", type=int, default=3, help="code levels before the dedup level")
    p.add_argument("--check-requests", type=int, default=8, help="requests of the untimed answer checks")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS), help="where inference_<tag>.{json,md} go")
    p.add_argument("--tag", default=None, help="file name tag (default: the device: cpu, h100, ...)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 2,000 synthetic items, 2 timed batches per cell, 300 test-split users")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    args.catalogues = _choices(p, "--catalogues", args.catalogues, CATALOGUES)
    args.systems = _choices(p, "--systems", args.systems, SYSTEMS)
    args.batches = [int(x) for x in args.batches.split(",") if x]
    args.beams = [int(x) for x in args.beams.split(",") if x]
    if not args.batches or min(args.batches) < 1:
        p.error("--batches: expected positive integers")
    if not args.beams or min(args.beams) < TOP_K:
        p.error(f"--beams: expected widths >= {TOP_K} (the list length)")
    if args.quick:
        args.synthetic_items = min(args.synthetic_items, 2_000)
        args.synthetic_codebook = min(args.synthetic_codebook, 16)
        args.repetitions, args.min_batches, args.warmup = min(args.repetitions, 2), 1, min(args.warmup, 1)
        args.seconds_per_cell = min(args.seconds_per_cell, 2.0)
        args.pool = min(args.pool, 256)
        args.check_requests = min(args.check_requests, 4)
        args.test_users = 300 if args.test_users is None else args.test_users
    if args.repetitions < 1 or args.min_batches < 1 or args.warmup < 0 or args.pool < 1:
        p.error("--repetitions, --min-batches, --pool >= 1 and --warmup >= 0 expected")
    return args


def _choices(parser, flag: str, value: str, allowed: tuple) -> list[str]:
    chosen = [x for x in value.split(",") if x]
    unknown = [x for x in chosen if x not in allowed]
    if unknown or not chosen:
        parser.error(f"{flag}: {', '.join(unknown) or 'nothing chosen'}; expected some of {', '.join(allowed)}")
    return chosen


def main(argv=None) -> dict:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    try:
        import transformers
    except ImportError:  # e.g. a GPU machine given only the carried wheels: our systems alone
        transformers = None
        if "t5" in args.systems:
            print("transformers is not installed: the t5 system is skipped", file=sys.stderr)
            args.systems = [system for system in args.systems if system != "t5"]

    cache = has_use_cache()
    name = accelerator_name(device.type == "cuda")
    tag = args.tag or device_slug(device, name)
    load_before = os.getloadavg()
    report = {
        "device": name, "device_type": device.type, "device_slug": device_slug(device, name),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", os.path.relpath(Path(__file__).resolve(), Path.cwd()), *argv]),
        "torch": torch.__version__, "transformers": transformers.__version__ if transformers else "not installed", "threads": torch.get_num_threads(),
        "kv_cache_available": cache,
        "settings": {k: getattr(args, k) for k in ("catalogues", "systems", "batches", "beams", "seconds_per_cell",
                                                     "repetitions", "min_batches", "warmup", "pool", "seed", "quick",
                                                     "synthetic_items", "synthetic_codebook", "synthetic_levels")},
        "top_k": TOP_K, "catalogues": {},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"inference_{tag}"

    def write() -> str:  # after each part: a stopped run keeps what it measured
        report["load_average_1min"] = {"before": load_before[0], "after": os.getloadavg()[0], "cpus": os.cpu_count()}
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        text = markdown(report)
        stem.with_suffix(".md").write_text(text)
        return text

    beauty = load_beauty(args, device)  # the export's config shapes the synthetic model too
    real_lengths = beauty.real_lengths
    if "beauty" in args.catalogues:
        report["catalogues"]["beauty"] = bench_catalogue(beauty, args, device, args.systems, cache)
        write()
        if args.test_users != 0 and {"ours", "ours_nocache"} & set(args.systems):
            report["test_split"] = bench_test_split(beauty, args, device, args.systems, cache)
            write()
    if "synthetic1m" in args.catalogues:
        cfg = beauty.config
        del beauty  # only its config shapes the synthetic model
        synthetic = build_synthetic(args, device, cfg, real_lengths)
        report["catalogues"]["synthetic1m"] = bench_catalogue(synthetic, args, device, args.systems, cache)
    text = write()
    save_figure(report, stem.with_suffix(".json"))
    print(text)
    print(f"wrote {stem.with_suffix('.json')}, .md and .png", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
