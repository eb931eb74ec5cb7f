"""Host memory that pretraining keeps for its training data, per interaction, before and after
training examples became compact (onerec.data.splits.Examples + onerec.data.sampler).

    python bench/pretrain_data_memory.py                                  # 1M, 10M and 100M interactions
    python bench/pretrain_data_memory.py --interactions 1000000 --users 20000

For each size it builds a synthetic log (users drawn uniformly per interaction, items from a
Zipf-like popularity, one timestamp per interaction), splits it leave-one-out as the pretrain
stage does, and counts the buffers the stage holds for the whole run, on one data-parallel
rank (every rank holds the same):

  before  the dense path: history [N, S], target [N, M] and user [N] int64 for every training
          prefix, the int64 permutation of each epoch, the int64 sequences (items and orders)
          and the dense validation and test rows the stage kept referenced, and on a GPU the
          same [N, S + M + 1] again in device memory. Counted from the shapes; at sizes up to
          --dense-up-to the dense arrays are also built and their bytes measured, to check
          the count.
  after   what pretrain keeps now: the train and validation `Examples` (the int32 items and
          offsets they share, a few int32 numbers per user) and the sampler's int32
          permutation of the current epoch, counted buffer by buffer (shared ones once), and
          cross-checked with tracemalloc (numpy reports its buffers to it); plus one step's
          batch, O(batch), which is all that reaches the device.

Also reported: the time to gather one batch on the host, which decides whether DataLoader
workers would pay (they would overlap this gather with the model step).
Results: bench/results/pretrain_data_memory_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import itertools
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devices import processor_name  # noqa: E402  (same folder)
from figures import save_figure  # noqa: E402

from onerec.config import DataConfig  # noqa: E402
from onerec.data.sampler import DistributedBatchSampler  # noqa: E402
from onerec.data.splits import UserSequences, gather_examples, make_splits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
INT64 = 8


def synthetic_sequences(interactions: int, users: int, items: int, seed: int) -> UserSequences:
    """A log sorted by user then time, as the data stage writes it."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(rng.integers(0, users, size=interactions), minlength=users)
    user_index = np.repeat(np.arange(users, dtype=np.int64), counts)
    # Zipf-like popularity without rejection sampling: item = floor(items * u^3), u uniform
    item_index = np.minimum((items * rng.random(interactions) ** 3).astype(np.int64), items - 1)
    order = np.arange(interactions, dtype=np.int64)  # increasing within each user
    return UserSequences.from_sorted(user_index, item_index, order, users)


def owned_bytes(arrays: list) -> int:
    """Bytes of the distinct buffers behind `arrays` (numpy or torch); a broadcast view
    (a zero stride) owns none, a buffer shared by several arrays counts once."""
    seen, total = set(), 0
    for array in arrays:
        if isinstance(array, torch.Tensor):
            key, size = array.untyped_storage().data_ptr(), array.untyped_storage().nbytes()
        else:
            if 0 in array.strides and array.size > 1:
                continue
            base = array
            while isinstance(base, np.ndarray) and base.base is not None:
                base = base.base
            key, size = id(base), base.nbytes if isinstance(base, np.ndarray) else array.nbytes
        if key not in seen:
            seen.add(key)
            total += size
    return total


def dense_training_examples(seqs: UserSequences, cfg: DataConfig):
    """The training prefixes as the dense path built them (every prefix of the training part)."""
    train_len = np.where(seqs.lengths() >= 3, seqs.lengths() - 2, 0)
    per_user = np.maximum(train_len - 1, 0)
    users = np.repeat(np.arange(len(seqs)), per_user)
    starts = np.concatenate([[0], np.cumsum(per_user)[:-1]])
    ends = np.arange(per_user.sum()) - np.repeat(starts, per_user) + 1
    return gather_examples(seqs, users, ends, train_len[users], cfg.max_history, cfg.session_len)


def measure(interactions: int, args: argparse.Namespace) -> dict:
    cfg = DataConfig(max_history=args.max_history, session_len=args.session_len)
    S, M = cfg.max_history, cfg.session_len
    seqs = synthetic_sequences(interactions, args.users, args.items, args.seed)
    sequences_bytes = owned_bytes([seqs.items, seqs.orders, seqs.offsets])

    make_splits(synthetic_sequences(100, 10, 10, 0), cfg)  # numpy's lazy imports, outside the measurement
    gc.collect()
    tracemalloc.start()
    before_split = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    started = time.perf_counter()
    splits = make_splits(seqs, cfg)
    split_seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] - before_split
    train, valid = splits["train"], splits["valid"]
    del splits  # as the pretrain stage does: it never reads the test split
    gc.collect()
    kept_traced = tracemalloc.get_traced_memory()[0] - before_split
    tracemalloc.stop()

    num_train, num_valid = len(train), len(valid)
    sampler = DistributedBatchSampler(num_train, args.batch_size, seed=0, rank=0, world_size=args.world_size)
    permutation = sampler.permutation(0)
    examples_bytes = owned_bytes([a for e in (train, valid) for a in vars(e).values() if isinstance(a, np.ndarray)])
    after_host = examples_bytes + owned_bytes([permutation])

    # One step: this rank's indices, the gathered rows, and what goes to the device.
    batches = list(itertools.islice(sampler.batches_from(0), 50))  # consecutive steps: random rows
    rows = train.gather(batches[0].numpy())
    batch_bytes = batches[0].nbytes + rows.user.nbytes + rows.history.nbytes + rows.target.nbytes
    started = time.perf_counter()
    for batch in batches:
        train.gather(batch.numpy())
    gather_ms = (time.perf_counter() - started) / len(batches) * 1e3
    started = time.perf_counter()
    sampler.permutation(1)
    permutation_seconds = time.perf_counter() - started

    # The dense path: every training prefix's rows on the host (and again on a GPU), the int64
    # permutation, the int64 sequences and the dense valid and test rows (the stage kept the
    # whole split dict and the prepared sequences referenced for the whole run).
    valid_test_rows = 2 * num_valid  # leave-one-out: the same users have a validation and a test row
    dense_examples = num_train * (S + M + 1) * INT64
    before_host = dense_examples + num_train * INT64 + sequences_bytes + valid_test_rows * (S + 1 + 1) * INT64
    measured_dense = None
    if interactions <= args.dense_up_to:
        dense = dense_training_examples(seqs, cfg)
        measured_dense = dense.user.nbytes + dense.history.nbytes + dense.target.nbytes
        assert measured_dense == dense_examples, (measured_dense, dense_examples)
        for column in ("user", "history", "target"):  # the compact rows are the same rows
            probe = batches[0].numpy()
            assert np.array_equal(getattr(rows, column), getattr(dense, column)[probe]), column
        del dense
    return {
        "interactions": interactions,
        "users": args.users,
        "train_examples": num_train,
        "valid_users": num_valid,
        "before": {
            "host_bytes": before_host,
            "host_bytes_per_interaction": before_host / interactions,
            "dense_examples_bytes": dense_examples,
            "dense_examples_measured_bytes": measured_dense,
            "permutation_bytes": num_train * INT64,
            "int64_sequences_bytes": sequences_bytes,
            "valid_test_rows_bytes": valid_test_rows * (S + 2) * INT64,
            "device_bytes_gpu": dense_examples,
            "device_bytes_gpu_per_interaction": dense_examples / interactions,
        },
        "after": {
            "host_bytes": after_host,
            "host_bytes_per_interaction": after_host / interactions,
            "examples_bytes": examples_bytes,
            "permutation_bytes": owned_bytes([permutation]),
            "permutation_dtype": str(permutation.dtype).replace("torch.", ""),
            "tracemalloc_kept_by_splits_bytes": kept_traced,
            "tracemalloc_make_splits_peak_bytes": peak,
            "batch_bytes": batch_bytes,
            "device_bytes_gpu": batch_bytes - batches[0].nbytes,
        },
        "make_splits_seconds": split_seconds,
        "gather_ms_per_batch": gather_ms,
        "permutation_seconds_per_epoch": permutation_seconds,
    }


def markdown(report: dict) -> str:
    lines = [
        f"Pretraining's training-data memory per rank, {report['device']}, {report['date']}",
        "",
        f"`{report['command']}`",
        "",
        f"Synthetic leave-one-out log, {report['users']:,} users, S = {report['max_history']}, "
        f"M = {report['session_len']}, batch {report['batch_size']} per rank. Before: the dense "
        "[N, S + M + 1] int64 training rows, the int64 permutation, the int64 sequences and the dense "
        "validation and test rows the stage kept referenced (counted from the shapes; built and measured "
        f"up to {report['dense_up_to']:,} interactions). After: the train and validation `Examples` and "
        "the sampler's permutation (buffers counted once), the batch separately. GPU device memory: "
        "before, the dense training rows again; after, one batch.",
        "",
        "| interactions | train examples | before, host B/interaction | after, host B/interaction "
        "| after (tracemalloc, splits only) | make_splits peak B/interaction | batch, KiB "
        "| before, GPU B/interaction | gather ms/batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        n = r["interactions"]
        lines.append(
            f"| {n:,} | {r['train_examples']:,} | {r['before']['host_bytes_per_interaction']:.1f} "
            f"| {r['after']['host_bytes_per_interaction']:.2f} "
            f"| {r['after']['tracemalloc_kept_by_splits_bytes'] / n:.2f} "
            f"| {r['after']['tracemalloc_make_splits_peak_bytes'] / n:.2f} "
            f"| {r['after']['batch_bytes'] / 1024:.1f} | {r['before']['device_bytes_gpu_per_interaction']:.1f} "
            f"| {r['gather_ms_per_batch']:.3f} |"
        )
    lines += [
        "",
        "After = int32 items (4 B/interaction) + int32 permutation (4 B per training example) + int32 "
        "offsets and per-user numbers of train and validation (24 B per user); the tracemalloc column "
        "counts the splits' numpy buffers only (no permutation, which torch allocates). Gathering a "
        "batch on the host takes the time in the last column, well under 1% of a training step (the "
        "smallest model preset takes ~30 ms for 16 samples on this CPU, train_throughput_cpu.md), so "
        "the pretrain stage gathers inside the training loop: DataLoader workers would have nothing to hide.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interactions", nargs="+", type=int, default=[1_000_000, 10_000_000, 100_000_000])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--max-history", type=int, default=20, help="data.max_history (every config uses 20)")
    parser.add_argument("--session-len", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256, help="train.batch_size, per rank")
    parser.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (the permutation is per rank)")
    parser.add_argument("--dense-up-to", type=int, default=1_000_000, help="build the dense path up to this size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for interactions in args.interactions:
        rows.append(measure(interactions, args))
        print(json.dumps({k: rows[-1][k] for k in ("interactions", "train_examples")}
                         | {"before": rows[-1]["before"]["host_bytes_per_interaction"],
                            "after": rows[-1]["after"]["host_bytes_per_interaction"]}), flush=True)
    report = {
        "device": processor_name(),
        "device_slug": "cpu",
        "date": dt.date.today().isoformat(),
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *(sys.argv[1:] if argv is None else argv)]),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "users": args.users,
        "items": args.items,
        "max_history": args.max_history,
        "session_len": args.session_len,
        "batch_size": args.batch_size,
        "world_size": args.world_size,
        "dense_up_to": args.dense_up_to,
        "rows": rows,
    }
    table = markdown(report)
    print(table)
    stem = Path(args.results_dir) / "pretrain_data_memory_cpu"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table)
    save_figure(report, stem.with_suffix(".json"))
    return report


if __name__ == "__main__":
    main()
