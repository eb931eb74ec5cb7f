"""How the cost of `onerec data`, `onerec tokenize` and `onerec pretrain` grows with the log,
measured on synthetic logs of growing size, and the generator of those logs.

    python bench/scale.py --sizes 1e5,1e6,3e6,1e7          # bench/results/scale_<device>.{json,md,png}
    python bench/scale.py --sizes 1e5 --results-dir /tmp/x # a quick look, results elsewhere
    python bench/scale.py report bench/results/scale_cpu.json  # rewrite its .md and .png from the json
    python bench/scale.py generate OUT --rows 1e6 --users 10000 --items 10000 \\
        [--zipf 1.0] [--format parquet|csv|both] [--shards 4] [--no-text] [--feedback] [--seed 0]

The generator (`generate_log`, or the `generate` mode) writes an interaction log that the
generic reader takes as it is (data.format=parquet or csv; `SyntheticLog.data_overrides` lists
the data.* keys), in bounded memory: users are drawn in fixed blocks of `block_users`, each
block from its own seeded random stream, and written as soon as about `rows_per_write` rows
are ready (pyarrow ParquetWriter / CSVWriter), so the output is the same whatever the number
of shards or the write size, and no row ever exists as a Python object.

  users     each user's number of interactions is 1 + a share of (rows - users) proportional
            to a lognormal weight (sigma `length_sigma`): a long tail of heavy users and some
            users below data.min_user_interactions, whom the data stage drops (on_bad_rows=skip)
  items     popularity rank r (1-based) drawn with probability proportional to r^-s (Zipf,
            s = `zipf_exponent`); ranks map to item ids through a fixed random permutation
  time      int64 seconds; each user starts at a random point of a 90-day window, sessions have
            geometric lengths (mean `session_mean` items), ~1 min between items of a session and
            ~1 day between sessions: timestamps strictly increase per user (so no two rows are
            exact duplicates). Rows are written in time order within each block of users.
  text      items file (item_id, title, category): titles of 2-5 words from a small vocabulary,
            the noun given by the item's category, so text vectors cluster by category
  feedback  optional columns like (0/1, ~10% ones) and watch_ratio (lognormal, <= 10)
Layout: interactions.parquet / .csv (or interactions_parquet/part-00000.parquet ... with
--shards N), items.parquet / .csv, generator.json (the parameters and totals).

The benchmark, for each size (rows; users = rows / --rows-per-user and items = rows /
--rows-per-item, 100 each by default: at 1e8 rows that is the 1M users and 1M items of the
scale target), generates the log into a temporary folder and runs, each as its own process:

  data      onerec data on the Parquet log (+ items file), on_bad_rows=skip
  tokenize  tokenizer.encoder=hashing (no text model), levels 3, codebook_size K = the power of
            two nearest sqrt(items) within [16, 8192] (about sqrt(items) items per first-level
            code; that rule reaches OneRec's 8192 at ~67M items), at most one code per 8 items
  pretrain  a small model (d_model 64, 1 + 1 layers, 4 experts) for train.max_steps=20 steps,
            evaluated once at the end on eval.max_valid_users=500 validation users
  tokenize_onerec  when items >= 100,000: tokenize again at OneRec's 3 x 8192 codebooks
            (after pretrain; the embedding cache of the first run is reused, so this one is
            the residual k-means), with tokenizer.kmeans_iters=--onerec-kmeans-iters

Each process runs through `python bench/scale.py stage --report FILE -- <onerec args>`, a thin wrapper that
calls onerec.cli.main in-process and reports the time spent inside it, tokenize's time and
peak RSS per k-means level (it wraps rq_kmeans.balanced_kmeans and resets the kernel's RSS
high-water mark between levels through /proc/self/clear_refs), and on a GPU
torch.cuda.max_memory_allocated. The process's peak RSS is its ru_maxrss from wait4 (what
/usr/bin/time -v reports), or the wrapper's own running maximum of the high-water marks where
it reset them; wall time is the whole process, start-up and imports included.

A stage that fails or runs past --stage-timeout is recorded as "failed" / "timed out" with the
reason (the tail of its log; a tokenize stage also with the levels it finished), and the stages
that read its output as "skipped". Results are written after every size, so a long run leaves
what finished. --shards N gives the data stage a directory of Parquet shards, which needs a
reader that takes a directory; the default is one file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"

# ---------------------------------------------------------------------------------------------
# the synthetic log
# ---------------------------------------------------------------------------------------------

START_TIME = 1_700_000_000  # 2023-11-14, seconds since 1970 UTC
START_WINDOW_S = 90 * 86_400
ITEMS_PER_WRITE = 1 << 18  # items file rows per random stream and write

# Titles: [adjectives] [colour] noun; the noun comes from the item's category (department).
DEPARTMENTS = {
    "Kitchen": ["mug", "kettle", "skillet", "teapot", "blender", "colander"],
    "Audio": ["headphones", "speaker", "earbuds", "turntable", "amplifier"],
    "Outdoors": ["tent", "backpack", "lantern", "hammock", "compass"],
    "Beauty": ["serum", "lipstick", "moisturizer", "shampoo", "perfume"],
    "Office": ["notebook", "stapler", "marker", "planner", "lamp"],
    "Toys": ["puzzle", "kite", "robot", "yo-yo", "doll"],
    "Garden": ["trowel", "planter", "hose", "seeds", "shears"],
    "Sports": ["racket", "helmet", "jersey", "dumbbell", "skateboard"],
}
ADJECTIVES = [
    "classic", "compact", "deluxe", "durable", "elegant", "ergonomic", "foldable", "heavy", "light",
    "modern", "organic", "portable", "premium", "quiet", "rustic", "sleek", "smart", "soft", "sturdy",
    "tiny", "vintage", "waterproof", "wireless", "large", "mini", "pro", "eco", "handmade", "travel", "family",
]
COLOURS = ["black", "white", "red", "blue", "green", "grey", "pink", "gold", "silver", "wooden", "steel", "cotton"]
FEEDBACK_COLUMNS = ["like", "watch_ratio"]


@dataclass
class LogSpec:
    """What to generate; every number of rows, users and items is exact."""

    rows: int
    users: int
    items: int
    zipf_exponent: float = 1.0  # item popularity ~ rank^-s
    length_sigma: float = 1.2  # lognormal spread of the users' history lengths
    session_mean: float = 5.0  # mean items per session (geometric)
    within_session_gap_s: float = 60.0  # mean seconds between items of a session
    between_session_gap_s: float = 86_400.0  # mean seconds between sessions
    text: bool = True  # write an items file with title and category
    feedback: bool = False  # add the columns like and watch_ratio
    seed: int = 0
    block_users: int = 4096  # users per random stream: fixes the output whatever the writes

    def __post_init__(self) -> None:
        if min(self.users, self.items) < 1:
            raise ValueError(f"users={self.users}, items={self.items}: expected at least 1 of each")
        if self.rows < self.users:
            raise ValueError(f"rows={self.rows} < users={self.users}: every user has at least one interaction")
        if self.block_users < 1 or self.session_mean < 1 or self.zipf_exponent < 0:
            raise ValueError("block_users >= 1, session_mean >= 1 and zipf_exponent >= 0 expected")


@dataclass
class SyntheticLog:
    """A generated log: where its files are, and the counts the data stage should arrive at."""

    root: Path
    spec: LogSpec
    interactions_files: dict  # format -> file or shard directory, relative to root
    items_files: dict  # format -> items file relative to root (empty without text)
    user_lengths: np.ndarray  # [users] interactions per user, user i has raw id i + 1
    item_counts: np.ndarray  # [items] interactions per item, item j has raw id j + 1
    # [items] the longest history among the users who interacted with the item (0: nobody):
    # the items left after dropping users shorter than m are those with a value >= m.
    item_longest_user: np.ndarray
    seconds: float = 0.0
    bytes_on_disk: int = 0

    def expected_counts(self, min_user_interactions: int = 3, with_items_file: bool = True) -> dict:
        """users, items and interactions in <run>/data/meta.json after the data stage drops the
        users with fewer than `min_user_interactions` rows (on_bad_rows=skip); with an items
        file every item stays in the catalogue, without one only those still interacted with."""
        kept = self.user_lengths >= min_user_interactions
        items = self.spec.items if with_items_file else int((self.item_longest_user >= min_user_interactions).sum())
        return {
            "users": int(kept.sum()),
            "items": items,
            "interactions": int(self.user_lengths[kept].sum()),
            "short_users": int((~kept).sum()),
        }

    def data_overrides(self, fmt: str = "parquet", with_items_file: bool = True) -> list[str]:
        """The data.* overrides that make `onerec data` read this log."""
        if fmt not in self.interactions_files:
            raise ValueError(f"no {fmt} files were written (have: {sorted(self.interactions_files)})")
        overrides = [
            f"data.format={fmt}", f"data.root={self.root}", f"data.interactions_file={self.interactions_files[fmt]}",
            "data.user_column=user_id", "data.item_column=item_id", "data.time_column=timestamp",
            "data.on_bad_rows=skip",
        ]
        if self.spec.feedback:
            overrides.append(f"data.feedback_columns=[{','.join(FEEDBACK_COLUMNS)}]")
        if with_items_file and self.items_files:
            overrides += [f"data.items_file={self.items_files[fmt]}", "data.item_id_column=item_id",
                          "data.text_fields=[title,category]"]
        return overrides


class _Writer:
    """One output format: a single file, or one file per shard opened as its first rows come."""

    def __init__(self, root: Path, stem: str, fmt: str, shards: int, schema: pa.Schema) -> None:
        self.fmt, self.schema, self.shards = fmt, schema, shards
        if shards == 1:
            self.relative = f"{stem}.{fmt}"
            self.paths = [root / self.relative]
        else:
            self.relative = f"{stem}_{fmt}"
            (root / self.relative).mkdir(parents=True, exist_ok=True)
            self.paths = [root / self.relative / f"part-{i:05d}.{fmt}" for i in range(shards)]
        self.shard, self.writer = -1, None

    def write(self, table: pa.Table, shard: int = 0) -> None:
        if shard != self.shard:
            self.close()
            self.shard = shard
            if self.fmt == "parquet":
                self.writer = pq.ParquetWriter(self.paths[shard], self.schema)
            else:
                self.writer = pacsv.CSVWriter(self.paths[shard], self.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _history_lengths(spec: LogSpec) -> np.ndarray:
    """[users] interactions per user: 1 + a lognormal-weighted share of rows - users, rounded so
    that the total is exactly spec.rows (largest remainders get the leftover rows)."""
    rng = np.random.default_rng([spec.seed, 0])
    weights = rng.lognormal(0.0, spec.length_sigma, spec.users)
    share = (spec.rows - spec.users) * weights / weights.sum()
    extra = np.floor(share).astype(np.int64)
    left = spec.rows - spec.users - int(extra.sum())
    if left > 0:
        extra[np.argpartition(extra - share, left - 1)[:left]] += 1  # the largest fractions first
    return 1 + extra


def _zipf_cdf(items: int, exponent: float) -> np.ndarray:
    cdf = np.cumsum(np.arange(1, items + 1, dtype=np.float64) ** -exponent)
    return cdf / cdf[-1]


def _block_rows(spec: LogSpec, block: int, lengths: np.ndarray, cdf: np.ndarray, rank_to_item: np.ndarray) -> dict:
    """The rows of one block of users, as numpy columns in time order. Its own random stream:
    the same rows whatever else is generated or how it is written."""
    rng = np.random.default_rng([spec.seed, 1, block])
    first_user = block * spec.block_users
    n_users, n = len(lengths), int(lengths.sum())
    user_index = np.repeat(np.arange(first_user, first_user + n_users, dtype=np.int64), lengths)
    ranks = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), spec.items - 1)
    item_index = rank_to_item[ranks]
    # Time: a gap before every row (~1 min inside a session, ~1 day before a new one), the
    # user's start time before their first, summed per user.
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    new_session = rng.random(n) < 1.0 / spec.session_mean
    mean_gap = np.where(new_session, spec.between_session_gap_s, spec.within_session_gap_s)
    gaps = 1 + np.floor(rng.exponential(1.0, n) * mean_gap).astype(np.int64)
    gaps[starts] = START_TIME + np.floor(rng.random(n_users) * START_WINDOW_S).astype(np.int64)
    total = np.cumsum(gaps)
    timestamp = total - np.repeat(total[starts] - gaps[starts], lengths)
    columns = {"user_index": user_index, "item_index": item_index, "timestamp": timestamp}
    if spec.feedback:
        columns["like"] = (rng.random(n) < 0.1).astype(np.int8)
        columns["watch_ratio"] = np.minimum(rng.lognormal(-0.3, 0.7, n), 10.0).astype(np.float32)
    order = np.lexsort((user_index, timestamp))  # a log fragment in time order
    return {name: values[order] for name, values in columns.items()}


def _interaction_schema(feedback: bool) -> pa.Schema:
    columns = [("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())]
    if feedback:
        columns += [("like", pa.int8()), ("watch_ratio", pa.float32())]
    return pa.schema(columns)


def _interaction_table(columns: dict, schema: pa.Schema) -> pa.Table:
    """Raw ids are 1-based: user i and item j of the generator are user_id i + 1, item_id j + 1."""
    arrays = {"user_id": columns["user_index"] + 1, "item_id": columns["item_index"] + 1}
    return pa.table({name: pa.array(arrays.get(name, columns.get(name))) for name in schema.names}, schema=schema)


def _item_table(spec: LogSpec, start: int, stop: int) -> pa.Table:
    """Items start..stop-1: id, title ("[adjectives] [colour] noun") and category, vectorised
    with Arrow (nulls are skipped when the words are joined)."""
    rng = np.random.default_rng([spec.seed, 2, start // ITEMS_PER_WRITE])
    n = stop - start
    nouns = [(dept, noun) for dept, names in DEPARTMENTS.items() for noun in names]
    noun = np.minimum(np.searchsorted(_zipf_cdf(len(nouns), 0.8), rng.random(n), side="right"), len(nouns) - 1)
    adjectives = pa.array(ADJECTIVES)
    n_adjectives = rng.integers(1, 4, n)  # 1-3 adjectives
    words = [pc.take(adjectives, pa.array(rng.integers(0, len(ADJECTIVES), n), mask=n_adjectives <= i))
             for i in range(3)]
    words.append(pc.take(pa.array(COLOURS), pa.array(rng.integers(0, len(COLOURS), n), mask=rng.random(n) < 0.5)))
    words.append(pc.take(pa.array([name for _, name in nouns]), pa.array(noun)))
    return pa.table({
        "item_id": pa.array(np.arange(start + 1, stop + 1, dtype=np.int64)),
        "title": pc.binary_join_element_wise(*words, " ", null_handling="skip"),
        "category": pc.take(pa.array([dept for dept, _ in nouns]), pa.array(noun)),
    })


def generate_log(
    out_dir: str | Path,
    spec: LogSpec,
    formats: tuple[str, ...] = ("parquet",),
    shards: int = 1,
    rows_per_write: int = 1 << 20,
) -> SyntheticLog:
    """Write the log described by `spec` to out_dir in each of `formats` (parquet, csv), as one
    file or `shards` files; see the module docstring for the layout and the distributions."""
    started = time.perf_counter()
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    unknown = set(formats) - {"parquet", "csv"}
    if unknown or not formats:
        raise ValueError(f"formats={formats}: expected parquet and/or csv")
    blocks = math.ceil(spec.users / spec.block_users)
    if not 1 <= shards <= blocks:
        raise ValueError(f"shards={shards}: expected 1..{blocks}, so that every shard gets at least one block "
                         f"of {spec.block_users} users")

    lengths = _history_lengths(spec)
    cdf = _zipf_cdf(spec.items, spec.zipf_exponent)
    rank_to_item = np.random.default_rng([spec.seed, 3]).permutation(spec.items)
    item_counts = np.zeros(spec.items, dtype=np.int64)
    item_longest_user = np.zeros(spec.items, dtype=np.int64)

    schema = _interaction_schema(spec.feedback)
    writers = [_Writer(root, "interactions", fmt, shards, schema) for fmt in formats]
    pending, pending_rows = [], 0

    def flush(shard: int) -> None:
        nonlocal pending, pending_rows
        if pending:
            table = _interaction_table({k: np.concatenate([p[k] for p in pending]) for k in pending[0]}, schema)
            for writer in writers:
                writer.write(table, shard)
        pending, pending_rows = [], 0

    shard = 0
    for block in range(blocks):
        block_shard = block * shards // blocks
        if block_shard != shard:
            flush(shard)
            shard = block_shard
        block_lengths = lengths[block * spec.block_users : (block + 1) * spec.block_users]
        rows = _block_rows(spec, block, block_lengths, cdf, rank_to_item)
        item_counts += np.bincount(rows["item_index"], minlength=spec.items)
        np.maximum.at(item_longest_user, rows["item_index"], lengths[rows["user_index"]])
        pending.append(rows)
        pending_rows += len(rows["item_index"])
        if pending_rows >= rows_per_write:
            flush(shard)
    flush(shard)
    for writer in writers:
        writer.close()

    items_files = {}
    if spec.text:
        item_writers = [_Writer(root, "items", fmt, 1, _item_table(spec, 0, 1).schema) for fmt in formats]
        for start in range(0, spec.items, ITEMS_PER_WRITE):
            table = _item_table(spec, start, min(start + ITEMS_PER_WRITE, spec.items))
            for writer in item_writers:
                writer.write(table)
        for writer in item_writers:
            writer.close()
        items_files = {w.fmt: w.relative for w in item_writers}

    log = SyntheticLog(
        root=root, spec=spec, interactions_files={w.fmt: w.relative for w in writers}, items_files=items_files,
        user_lengths=lengths, item_counts=item_counts, item_longest_user=item_longest_user,
    )
    log.bytes_on_disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    log.seconds = time.perf_counter() - started
    summary = {
        "spec": asdict(spec), "formats": list(formats), "shards": shards,
        "interactions_files": log.interactions_files, "items_files": items_files,
        "interacted_items": int((item_counts > 0).sum()), "max_user_length": int(lengths.max()),
        "expected_counts_min3": log.expected_counts(3), "seconds": log.seconds, "bytes_on_disk": log.bytes_on_disk,
    }
    (root / "generator.json").write_text(json.dumps(summary, indent=2) + "\n")
    return log


# ---------------------------------------------------------------------------------------------
# one stage in a process: the in-process wrapper and the measurement from outside
# ---------------------------------------------------------------------------------------------


class PeakRss:
    """The kernel's RSS high-water mark (VmHWM), read and reset so that each phase of a process
    gets its own peak, with a running maximum over all phases. Where /proc/self/clear_refs is
    not writable the marks cannot be reset: each phase's value is then the peak so far."""

    def __init__(self) -> None:
        self.peak = 0
        self.resettable = True

    @staticmethod
    def high_water_mark() -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def take(self) -> int | None:
        """This phase's peak RSS in bytes, then start the next phase."""
        mark = self.high_water_mark()
        if mark is not None:
            self.peak = max(self.peak, mark)
        if self.resettable:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
            except OSError:
                self.resettable = False
        return mark


def _cuda_in_use():
    """torch, where this process has used CUDA; else None (torch is not imported for this)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch


def _cuda_peak() -> int | None:
    """torch.cuda.max_memory_allocated() where this process used CUDA, else None."""
    torch = _cuda_in_use()
    return None if torch is None else int(torch.cuda.max_memory_allocated())


def _instrument_tokenize(report: dict, rss: PeakRss, save) -> None:
    """Time and peak RSS (and GPU memory) of the embedding and of each level's balanced k-means,
    saved after each, so a stage killed at its time limit still tells how far it got."""
    import onerec.stages.tokenize as tokenize_stage
    import onerec.tokenizer.rq_kmeans as rq_kmeans

    def cuda_synchronize(reset_peak: bool = False) -> None:
        torch = _cuda_in_use()
        if torch is not None:
            torch.cuda.synchronize()  # the clock reads when the device's work is done
            if reset_peak:
                torch.cuda.reset_peak_memory_stats()

    embed, balanced_kmeans = tokenize_stage.embed_texts, rq_kmeans.balanced_kmeans

    def timed_embed(*args, **kwargs):
        started = time.perf_counter()
        vectors = embed(*args, **kwargs)
        report["embed_s"] = time.perf_counter() - started
        report["load_and_embed_peak_rss_bytes"] = rss.take()  # from process start to here
        report["embed_cuda_max_memory_allocated_bytes"] = _cuda_peak()  # a text model on the GPU
        save()
        return vectors

    def timed_level(*args, **kwargs):
        cuda_synchronize(reset_peak=True)
        rss.take()  # what came between two levels (the residual update) counts to the overall peak only
        started = time.perf_counter()
        result = balanced_kmeans(*args, **kwargs)
        cuda_synchronize()
        report["levels"].append({
            "level": len(report["levels"]),
            "seconds": time.perf_counter() - started,
            "peak_rss_bytes": rss.take(),
            "cuda_max_memory_allocated_bytes": _cuda_peak(),
        })
        save()
        return result

    report["levels"] = []
    report["per_level_rss"] = "reset per level" if rss.resettable else "peak so far"
    tokenize_stage.embed_texts = timed_embed
    rq_kmeans.balanced_kmeans = timed_level


def stage_main(argv: list[str]) -> int:
    """`bench/scale.py stage --report FILE -- <onerec command and overrides>`: run one onerec
    command in this process and write what only the process itself can see to FILE."""
    parser = argparse.ArgumentParser(prog="bench/scale.py stage")
    parser.add_argument("--report", required=True, type=Path)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    from onerec.cli import main as onerec_main

    report: dict = {"exit_code": None}
    rss = PeakRss()

    def save() -> None:
        report["peak_rss_tracked_bytes"] = rss.peak
        # the peak is reset before each k-means level: the largest of the phases' peaks
        phases = [report.get("embed_cuda_max_memory_allocated_bytes"), _cuda_peak(),
                  *(level["cuda_max_memory_allocated_bytes"] for level in report.get("levels", []))]
        peaks = [peak for peak in phases if peak is not None]
        report["cuda_max_memory_allocated_bytes"] = max(peaks) if peaks else None
        args.report.write_text(json.dumps(report, indent=2) + "\n")

    if command[:1] == ["tokenize"]:
        _instrument_tokenize(report, rss, save)
    started = time.perf_counter()
    try:
        report["exit_code"] = onerec_main(command)
    finally:
        report["stage_s"] = time.perf_counter() - started
        rss.take()
        save()
    return report["exit_code"]


def run_measured(command: list[str], log_path: Path, timeout_s: float, env: dict | None = None) -> dict:
    """Run `command` to completion (its own process group, output to log_path) and return its
    status, wall time, CPU times and peak RSS (ru_maxrss from wait4, as /usr/bin/time -v)."""
    with open(log_path, "wb") as log_file:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - started > timeout_s:
                timed_out = True
                try:
                    os.killpg(process.pid, signal.SIGKILL)  # the stage and anything it started
                except ProcessLookupError:
                    pass  # it ended just now
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.1)
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
    # ru_maxrss is in kilobytes on Linux, in bytes on macOS
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    result = {
        "status": "timed out" if timed_out else ("ok" if process.returncode == 0 else "failed"),
        "exit_code": process.returncode,
        "wall_s": wall,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "peak_rss_bytes": peak,
    }
    if timed_out:
        result["reason"] = f"killed after {timeout_s:.0f} s (--stage-timeout)"
    elif process.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        result["reason"] = f"exit code {process.returncode}: " + " | ".join(line.strip() for line in tail)[-1500:]
    return result


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------

ONEREC_CODEBOOK = 8192  # OneRec's codes per level
ONEREC_MIN_ITEMS = 100_000
DATA_MAX_HISTORY = "data.max_history=20"  # what every config in configs/ uses
PRETRAIN_OVERRIDES = [
    "model.d_model=64", "model.num_heads=2", "model.encoder_layers=1",
    "model.decoder_layers=1", "model.d_ff=128", "model.moe.num_experts=4", "model.moe.top_k=2",
    "train.batch_size=256", "train.max_steps=20", "train.log_every=10", "eval.max_valid_users=500",
    "eval.beam_width=20",
]


def codebook_size_for(items: int) -> int:
    """The power of two nearest sqrt(items) (in log scale), within [16, 8192], and no more than
    one code per 8 items (onerec.tokenizer.item_vectors.suggest_codebook_size's rule)."""
    size = 2 ** round(math.log2(max(items, 1)) / 2)
    size = min(max(size, 16), ONEREC_CODEBOOK)
    while size > 2 and size * 8 > items:
        size //= 2
    return size


def parse_size(text: str) -> int:
    value = float(text)
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text}: expected a whole number of rows, e.g. 1e6")
    return int(value)


def _stage(name: str, onerec_args: list[str], work: Path, timeout_s: float) -> dict:
    report_path = work / f"{name}.report.json"
    command = [sys.executable, str(Path(__file__).resolve()), "stage", "--report", str(report_path), "--", *onerec_args]
    env = {**os.environ, "ONEREC_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    print(f"  {name}: onerec {' '.join(onerec_args[:1])} ...", flush=True)
    result = run_measured(command, work / f"{name}.log", timeout_s, env)
    result["command"] = "onerec " + shlex.join(onerec_args)
    if report_path.is_file():
        inner = json.loads(report_path.read_text())
        result["stage_s"] = inner.get("stage_s")
        result["peak_rss_bytes"] = max(result["peak_rss_bytes"], inner.get("peak_rss_tracked_bytes") or 0)
        result["cuda_max_memory_allocated_bytes"] = inner.get("cuda_max_memory_allocated_bytes")
        for key in ("embed_s", "load_and_embed_peak_rss_bytes", "levels", "per_level_rss"):
            if key in inner:
                result[key] = inner[key]
    print(f"    {result['status']}: {result['wall_s']:.1f} s, peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB"
          + (f" ({result['reason'][:200]})" if "reason" in result else ""), flush=True)
    return result


STAGE_NEEDS = {"data": (), "tokenize": ("data",), "pretrain": ("data", "tokenize"), "tokenize_onerec": ("data",)}


def measure_size(rows: int, args: argparse.Namespace, work: Path) -> dict:
    users, items = max(rows // args.rows_per_user, 1), max(rows // args.rows_per_item, 2)
    spec = LogSpec(rows=rows, users=users, items=items, zipf_exponent=args.zipf, feedback=args.feedback, seed=args.seed)
    raw, run = work / "raw", work / "run"
    print(f"{rows:,} rows, {users:,} users, {items:,} items: generating ...", flush=True)
    shards = min(args.shards, math.ceil(users / spec.block_users))  # every shard holds at least one block of users
    log = generate_log(raw, spec, formats=(args.input_format,), shards=shards)
    entry = {
        "rows": rows, "users": users, "items": items, "shards": shards, "source_digest": source_digest(),
        "generator": {"seconds": log.seconds, "bytes_on_disk": log.bytes_on_disk,
                      "expected": log.expected_counts(args.min_user_interactions)},
        "stages": {},
    }
    # Every stage repeats the data.* keys (and pretrain the tokenizer.* keys): a stage checks
    # that the outputs it reads were made from the same config.
    common = [f"run.out_dir={run}", f"run.device={args.device}", f"run.seed={args.seed}",
              *log.data_overrides(args.input_format), DATA_MAX_HISTORY,
              f"data.min_user_interactions={args.min_user_interactions}"]
    codebook = codebook_size_for(items)
    tokenizer = ["tokenizer.encoder=hashing", "tokenizer.levels=3", f"tokenizer.codebook_size={codebook}",
                 f"tokenizer.kmeans_iters={args.kmeans_iters}"]
    plan = {
        "data": ["data", *common],
        "tokenize": ["tokenize", *common, *tokenizer],
        "pretrain": ["pretrain", *common, *tokenizer, *PRETRAIN_OVERRIDES],
    }
    if items >= ONEREC_MIN_ITEMS:  # after pretrain: it replaces the semantic IDs pretrain read
        plan["tokenize_onerec"] = ["tokenize", *common, "tokenizer.encoder=hashing", "tokenizer.levels=3",
                                   f"tokenizer.codebook_size={ONEREC_CODEBOOK}",
                                   f"tokenizer.kmeans_iters={args.onerec_kmeans_iters}"]
    for name, command in plan.items():
        if name not in args.stages:
            continue
        unfinished = [need for need in STAGE_NEEDS[name] if entry["stages"][need]["status"] != "ok"]
        if unfinished:
            entry["stages"][name] = {"status": "skipped", "command": "onerec " + shlex.join(command),
                                     "reason": f"needs {', '.join(unfinished)}, which did not finish"}
            continue
        result = _stage(name, command, work, args.stage_timeout)
        if name.startswith("tokenize"):
            result["codebook_size"] = codebook if name == "tokenize" else ONEREC_CODEBOOK
            result["kmeans_iters"] = args.kmeans_iters if name == "tokenize" else args.onerec_kmeans_iters
        if name == "data" and result["status"] == "ok":
            meta = json.loads((run / "data" / "meta.json").read_text())
            result["meta"] = {k: meta[k] for k in ("users", "items", "interactions", "bad_rows")}
            result["rows_per_s"] = rows / result["stage_s"]
        entry["stages"][name] = result
    return entry


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def _slope(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Exponent of the growth between two (rows, cost) points: 1.0 is linear."""
    if min(a[0], a[1], b[0], b[1]) <= 0 or a[0] == b[0]:
        return ""
    return f"{math.log(b[1] / a[1]) / math.log(b[0] / a[0]):.2f}"


STAGE_LABELS = {"data": "data", "tokenize": "tokenize", "pretrain": "pretrain", "tokenize_onerec": "tokenize, K=8192"}


def markdown(report: dict) -> str:
    s = report["settings"]
    code = report["code"]
    changed = f" plus uncommitted changes to {', '.join(code['modified'])}" if code.get("modified") else ""
    # the digest of onerec/**/*.py when each size started: one value means one version of the code
    digests = ", ".join(f"{size['rows']:,}: {size.get('source_digest', '?')}" for size in report["sizes"])
    lines = [
        f"# Scale: data, tokenize and pretrain against the size of the log ({report['device']}, {report['date']})",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Device: {report['device']} ({report['cpus']} CPUs, shared with other jobs: times are wall clock on a "
        f"loaded machine). Date: {report['date']}. Code: {code.get('commit', 'unknown')}{changed}; "
        f"onerec/ source digest per size: {digests}.",
        "",
        f"Synthetic logs from `bench/scale.py generate`: {s['rows_per_user']} interactions per user and "
        f"{s['rows_per_item']} per item on average (at 1e8 rows: {1e8 / s['rows_per_user']:,.0f} users and "
        f"{1e8 / s['rows_per_item']:,.0f} items), Zipf item popularity "
        f"s = {s['zipf']}, lognormal history lengths, geometric sessions, int64 timestamps, one "
        f"{s['input_format']} file{' in up to ' + str(s['shards']) + ' shards' if s['shards'] > 1 else ''} plus an items "
        f"file (title, category). `onerec data` drops users with fewer than {s['min_user_interactions']} "
        f"interactions (on_bad_rows=skip); every stage: {DATA_MAX_HISTORY}. tokenize: hashing encoder "
        "(256-dim), 3 levels, K = the power of two "
        f"nearest sqrt(items), kmeans_iters={s['kmeans_iters']}; with items >= {ONEREC_MIN_ITEMS:,} also K = 8192 "
        f"(OneRec) with kmeans_iters={s['onerec_kmeans_iters']}. pretrain: {' '.join(s['pretrain_overrides'])}."
        + (f" Stages measured: {', '.join(s['stages'])}." if s.get("stages", list(STAGE_NEEDS)) != list(STAGE_NEEDS) else ""),
        "",
        "Each stage is its own process. wall: the whole process (start-up and imports included); in-stage: the "
        "time inside `onerec.cli.main`; peak RSS: the process's ru_maxrss (wait4, as `/usr/bin/time -v`); "
        "rows/s: generated rows over the data stage's in-stage time. GPU: torch.cuda.max_memory_allocated "
        "(n/a on CPU).",
        "",
        "| rows | users | items | data wall s | data rows/s | data peak RSS | tokenize K | tokenize wall s "
        "| tokenize peak RSS | pretrain wall s | pretrain peak RSS | pretrain GPU peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(stage: dict | None, key: str, fmt) -> str:
        if not stage:
            return ""
        if stage.get("status") != "ok":
            return stage.get("status", "")
        value = stage.get(key)
        return "n/a" if value is None else fmt(value)

    seconds, per_second = "{:.1f}".format, "{:,.0f}".format
    for size in report["sizes"]:
        data, tokenize, pretrain = (size["stages"].get(name) for name in ("data", "tokenize", "pretrain"))
        cells = [
            f"{size['rows']:,}", f"{size['users']:,}", f"{size['items']:,}",
            cell(data, "wall_s", seconds), cell(data, "rows_per_s", per_second), cell(data, "peak_rss_bytes", _gib),
            str((tokenize or {}).get("codebook_size", "")),
            cell(tokenize, "wall_s", seconds), cell(tokenize, "peak_rss_bytes", _gib),
            cell(pretrain, "wall_s", seconds), cell(pretrain, "peak_rss_bytes", _gib),
            cell(pretrain, "cuda_max_memory_allocated_bytes", _gib),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    checked = [size for size in report["sizes"] if "meta" in size["stages"].get("data", {})]
    counts = ("users", "items", "interactions")
    differ = [f"{size['rows']:,}" for size in checked
              if any(size["stages"]["data"]["meta"][k] != size["generator"]["expected"][k] for k in counts)]
    if checked:
        lines += ["", f"Users, items and interactions in the data stage's meta.json equal the generator's own counts "
                  f"after the same filtering at {len(checked) - len(differ)} of {len(checked)} sizes"
                  + (f"; they differ at {', '.join(differ)} rows." if differ else ".")]
    lines += [
        "",
        "## Growth",
        "",
        "Per stage and size: seconds per million rows and peak RSS per row (bytes); the exponents compare each "
        "size with the one before (cost ~ rows^exponent: 1.00 is linear, below 1 the fixed start-up cost still "
        "dominates). CPU s: user + system time of the process, steadier than wall time on a shared machine.",
        "",
        "| stage | rows | wall s | in-stage s | CPU s | s per 1M rows (wall) | peak RSS | bytes per row "
        "| time exponent | RSS exponent |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label in STAGE_LABELS.items():
        previous = None
        for size in report["sizes"]:
            stage = size["stages"].get(name)
            if not stage:
                continue
            if stage["status"] != "ok":
                lines.append(f"| {label} | {size['rows']:,} | {stage['status']} | | | | | | | |")
                continue
            point = (size["rows"], stage["wall_s"], stage["peak_rss_bytes"])
            lines.append(
                f"| {label} | {size['rows']:,} | {stage['wall_s']:.1f} | {stage.get('stage_s') or 0:.1f} "
                f"| {stage.get('user_s', 0) + stage.get('sys_s', 0):.1f} "
                f"| {stage['wall_s'] / size['rows'] * 1e6:.1f} | {_gib(stage['peak_rss_bytes'])} "
                f"| {stage['peak_rss_bytes'] / size['rows']:,.0f} "
                f"| {_slope(previous[:2], point[:2]) if previous else ''} "
                f"| {_slope((previous[0], previous[2]), (point[0], point[2])) if previous else ''} |"
            )
            previous = point
    lines += [
        "",
        "## tokenize per level",
        "",
        "Seconds and peak RSS of each level's balanced k-means (the process's RSS high-water mark, reset "
        "between levels); embed: the hashing encoder over the item texts (0 s where the K = 8192 run "
        "reused the first run's embedding cache). A stage stopped at its time limit shows the levels it finished.",
        "",
        "| rows | items | K | iters | in-stage s | embed s | level 0 s | level 1 s | level 2 s | level 0 RSS "
        "| level 1 RSS | level 2 RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in report["sizes"]:
        for name in ("tokenize", "tokenize_onerec"):
            stage = size["stages"].get(name)
            if not stage or (stage["status"] != "ok" and not stage.get("levels")):
                continue
            levels = (stage.get("levels") or []) + [{}] * 3
            in_stage = f"{stage['stage_s']:.1f}" if stage["status"] == "ok" else stage["status"]
            embed = f"{stage['embed_s']:.1f}" if "embed_s" in stage else ""
            lines.append(
                f"| {size['rows']:,} | {size['items']:,} | {stage['codebook_size']} | {stage['kmeans_iters']} "
                f"| {in_stage} | {embed} | "
                + " | ".join(f"{lv['seconds']:.1f}" if lv else "" for lv in levels[:3]) + " | "
                + " | ".join(_gib(lv.get("peak_rss_bytes")) if lv else "" for lv in levels[:3]) + " |"
            )
    unfinished = [(size["rows"], name, stage) for size in report["sizes"] for name, stage in size["stages"].items()
                  if stage["status"] != "ok"]
    if unfinished:
        lines += ["", "## Did not finish", ""]
        lines += [f"- {rows:,} rows, {STAGE_LABELS.get(name, name)}: {stage['status']}: {stage.get('reason', '')}"
                  for rows, name, stage in unfinished]
    lines += ["", "The exact stage commands (with this run's temporary paths) are in the json, per size and stage."]
    return "\n".join(lines) + "\n"


def _code_version() -> dict:
    """The commit measured and the files under onerec/ that differed from it (read-only git)."""
    def git(*arguments: str) -> str:
        try:
            return subprocess.run(["git", "--no-optional-locks", *arguments], cwd=ROOT, capture_output=True,
                                  text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    # porcelain lines are "XY path": two status letters (either may be a space), a space, the path
    modified = [line[3:] for line in git("status", "--porcelain", "--", "onerec").splitlines() if line.strip()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or "unknown", "modified": modified,
            "source_digest": source_digest()}


def source_digest() -> str:
    """sha256 (first 12 hex digits) of every onerec/**/*.py as it is on disk now: sizes measured
    with the same digest ran the same code, whatever else changed in the working tree meanwhile."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "onerec").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def bench_main(argv: list[str] | None) -> dict:
    parser = argparse.ArgumentParser(prog="bench/scale.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e5,1e6,3e6,1e7", help="rows per log, comma-separated (1e6 or 1000000)")
    parser.add_argument("--rows-per-user", type=int, default=100)
    parser.add_argument("--rows-per-item", type=int, default=100)
    parser.add_argument("--zipf", type=float, default=1.0, help="item popularity exponent s")
    parser.add_argument("--feedback", action="store_true", help="add the feedback columns like and watch_ratio")
    parser.add_argument("--input-format", choices=("parquet", "csv"), default="parquet")
    parser.add_argument("--shards", type=int, default=1, help="interaction files (a directory when > 1)")
    parser.add_argument("--min-user-interactions", type=int, default=3)
    parser.add_argument("--kmeans-iters", type=int, default=25, help="tokenizer.kmeans_iters (the default config's)")
    parser.add_argument("--onerec-kmeans-iters", type=int, default=5, help="kmeans_iters of the K=8192 run")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="run.device")
    parser.add_argument("--stage-timeout", type=float, default=1800, help="seconds before a stage is killed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, help="where the logs and runs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep each size's log and run folder")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--stages", default=",".join(STAGE_NEEDS),
                        help=f"which stages to measure, comma-separated (default: all of {','.join(STAGE_NEEDS)})")
    parser.add_argument("--tag", default="", help="results go to scale_<device>_<tag>.{json,md} (default: no tag)")
    args = parser.parse_args(argv)
    args.stages = [name.strip() for name in args.stages.split(",") if name.strip()]
    unknown = [name for name in args.stages if name not in STAGE_NEEDS]
    if unknown:
        parser.error(f"--stages: unknown {unknown}; expected some of {list(STAGE_NEEDS)}")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]

    import torch

    sys.path.insert(0, str(BENCH))
    from devices import accelerator_name, device_slug
    from figures import save_figure

    cuda = args.device != "cpu" and torch.cuda.is_available()
    name = accelerator_name(cuda)
    slug = device_slug(torch.device("cuda" if cuda else "cpu"), name)
    report = {
        "device": name,
        "device_slug": slug,
        "cpus": os.cpu_count(),
        "date": dt.date.today().isoformat(),
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *(sys.argv[1:] if argv is None else argv)]),
        "code": _code_version(),
        "torch": torch.__version__,
        "pyarrow": pa.__version__,
        "settings": {
            "rows_per_user": args.rows_per_user, "rows_per_item": args.rows_per_item, "zipf": args.zipf,
            "feedback": args.feedback, "input_format": args.input_format, "shards": args.shards,
            "min_user_interactions": args.min_user_interactions, "kmeans_iters": args.kmeans_iters,
            "onerec_kmeans_iters": args.onerec_kmeans_iters, "stage_timeout_s": args.stage_timeout,
            "pretrain_overrides": PRETRAIN_OVERRIDES, "seed": args.seed, "stages": args.stages,
        },
        "sizes": [],
    }
    stem = args.results_dir / (f"scale_{slug}_{args.tag}" if args.tag else f"scale_{slug}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    base = args.work_dir or Path(tempfile.mkdtemp(prefix="onerec-scale-"))
    for rows in sizes:
        work = base / f"rows_{rows}"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        try:
            report["sizes"].append(measure_size(rows, args, work))
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(report))
        save_figure(report, stem.with_suffix(".json"))
    if not args.work_dir and not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    print(markdown(report))
    return report


def generate_main(argv: list[str]) -> SyntheticLog:
    parser = argparse.ArgumentParser(prog="bench/scale.py generate", description="Write a synthetic interaction log.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--rows", type=parse_size, required=True)
    parser.add_argument("--users", type=parse_size, help="default: rows / 100")
    parser.add_argument("--items", type=parse_size, help="default: rows / 100")
    parser.add_argument("--zipf", type=float, default=1.0, help="item popularity exponent s")
    parser.add_argument("--length-sigma", type=float, default=1.2, help="lognormal spread of history lengths")
    parser.add_argument("--session-mean", type=float, default=5.0, help="mean items per session")
    parser.add_argument("--format", choices=("parquet", "csv", "both"), default="parquet")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--no-text", action="store_true", help="no items file")
    parser.add_argument("--feedback", action="store_true", help="add the columns like and watch_ratio")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    spec = LogSpec(
        rows=args.rows, users=args.users or max(args.rows // 100, 1), items=args.items or max(args.rows // 100, 2),
        zipf_exponent=args.zipf, length_sigma=args.length_sigma, session_mean=args.session_mean,
        text=not args.no_text, feedback=args.feedback, seed=args.seed,
    )
    formats = ("parquet", "csv") if args.format == "both" else (args.format,)
    log = generate_log(args.out_dir, spec, formats=formats, shards=args.shards)
    print(f"{spec.rows:,} rows, {spec.users:,} users, {spec.items:,} items -> {log.root} "
          f"({log.bytes_on_disk / 2**20:.1f} MiB, {log.seconds:.1f} s)")
    for fmt in formats:
        print(f"  onerec data run.out_dir=runs/synthetic {' '.join(log.data_overrides(fmt))}")
    return log


def report_main(argv: list[str]) -> Path:
    """`bench/scale.py report bench/results/scale_cpu.json`: rewrite its .md and .png from the json."""
    parser = argparse.ArgumentParser(prog="bench/scale.py report")
    parser.add_argument("json", type=Path)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(BENCH))
    from figures import save_figure

    report = json.loads(args.json.read_text())
    args.json.with_suffix(".md").write_text(markdown(report))
    save_figure(report, args.json)
    return args.json.with_suffix(".md")


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["generate"]:
        return generate_main(argv[1:])
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    if argv[:1] == ["stage"]:
        return stage_main(argv[1:])
    return bench_main(argv)


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
