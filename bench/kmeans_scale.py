"""Balanced residual k-means at OneRec's shape: time, peak memory, balance and error as N grows.

    python bench/kmeans_scale.py                         # the default cases below, kmeans_iters=5
    python bench/kmeans_scale.py --iters 25 --cases 100000:64:3:8192
    python bench/kmeans_scale.py --device cuda           # the same on a GPU (when there is one)

Each case is N:D:L:K (items, dim, levels, codes per level) and runs in its own subprocess
under /usr/bin/time -v, so the peak RSS is that of one run: data generation + residual_kmeans
(the tokenize stage's call: onerec.tokenizer.rq_kmeans.residual_kmeans with its defaults).
Default cases: 12,101 x 384, 4 x 64 (Beauty's shape: MiniLM vectors, configs/beauty) and
100k / 300k / 1M x 64, 3 x 8192 (OneRec's codebooks).

The vectors are a seeded Gaussian mixture (topics of Zipf-distributed size, each with its own
spread): closer to item embeddings than pure noise, which has no clusters to find.

Per level: wall time, the number of balanced assignments run (1 + Lloyd iterations until the
assignment stops changing, at most kmeans_iters), seconds per assignment, seeding time,
balance (largest / smallest cluster) and the relative reconstruction error after that level,
mean ||x - x_hat||^2 / mean ||x||^2.

--compare runs the pre-change algorithm (the whole [N, K] score matrix and sequential
k-means++ over all items, selected by raising both size thresholds; it gives bit-identical
codes to the previous implementation) and the scalable path (8 MB score chunks, sampled
on-device seeding) on the same inputs, at sizes where both fit, and reports both.

Writes bench/results/kmeans_scale_<device>.{json,md} (<device> = cpu, h100, ...) and prints
the markdown table. Results are written after every case, so a long run leaves what finished.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devices import accelerator_name, device_slug  # noqa: E402  (same folder)
from figures import save_figure  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEFAULT_CASES = ["12101:384:4:64", "100000:64:3:8192", "300000:64:3:8192", "1000000:64:3:8192"]
COMPARE_CASES = ["12101:384:4:64", "50000:64:3:1024", "30000:64:3:4096"]
DATA_SEED = 0
KMEANS_SEED = 0


def parse_case(text: str) -> tuple[int, int, int, int]:
    n, d, levels, k = (int(v) for v in text.split(":"))
    return n, d, levels, k


def mixture(n: int, d: int, seed: int) -> torch.Tensor:
    """[N, D] float32: n points from max(64, n // 100) Gaussian topics of Zipf(1) sizes, spreads 0.3..1."""
    g = torch.Generator().manual_seed(seed)
    topics = max(64, n // 100)
    centres_CD = torch.randn(topics, d, generator=g)
    spread_C = 0.3 + 0.7 * torch.rand(topics, generator=g)
    weight_C = 1.0 / torch.arange(1, topics + 1, dtype=torch.float64)
    topic_N = torch.multinomial(weight_C, n, replacement=True, generator=g)
    x_ND = torch.randn(n, d, generator=g).mul_(spread_C[topic_N].unsqueeze(1)).add_(centres_CD[topic_N])
    return x_ND


def relative_errors(x_ND: torch.Tensor, codes_NL: torch.Tensor, books: list[torch.Tensor]) -> list[float]:
    """mean ||x - x_hat_l||^2 / mean ||x||^2 after each level l."""
    total = float(x_ND.double().pow(2).sum())
    residual_ND = x_ND.clone()
    errors = []
    for level, book_KD in enumerate(books):
        residual_ND -= book_KD[codes_NL[:, level]]
        errors.append(float(residual_ND.double().pow(2).sum()) / total)
    return errors


def run_case(case: str, iters: int, device: str, mode: str) -> dict:
    """One residual_kmeans run (in this process); returns its measurements."""
    from onerec.tokenizer import rq_kmeans

    n, d, levels, k = parse_case(case)
    started = time.perf_counter()
    x_ND = mixture(n, d, DATA_SEED)
    data_s = time.perf_counter() - started
    kwargs = {}
    if mode == "reference":  # the pre-change algorithm: dense scores, sequential k-means++ over all items
        rq_kmeans.EXACT_SEEDING_MAX = float("inf")
        kwargs["max_chunk_bytes"] = 2 * n * k * 4
    elif mode == "chunked":  # the scalable path forced at a size where the reference also runs
        rq_kmeans.EXACT_SEEDING_MAX = 0
        kwargs["max_chunk_bytes"] = 8 * 2**20

    # Per-level timings: residual_kmeans calls these through the module, so wrapping the
    # module's names times every call without touching the algorithm.
    levels_log: list[dict] = []
    original = {name: getattr(rq_kmeans, name) for name in ("balanced_kmeans", "balanced_assign", "_seed_centroids")}

    def timed_level(*args, **kw):
        levels_log.append({"assignments": 0, "assign_s": 0.0, "seeding_s": 0.0})
        t0 = time.perf_counter()
        out = original["balanced_kmeans"](*args, **kw)
        levels_log[-1]["level_s"] = time.perf_counter() - t0
        return out

    def timed_assign(*args, **kw):
        t0 = time.perf_counter()
        out = original["balanced_assign"](*args, **kw)
        levels_log[-1]["assign_s"] += time.perf_counter() - t0
        levels_log[-1]["assignments"] += 1
        return out

    def timed_seed(*args, **kw):
        t0 = time.perf_counter()
        out = original["_seed_centroids"](*args, **kw)
        levels_log[-1]["seeding_s"] += time.perf_counter() - t0
        return out

    rq_kmeans.balanced_kmeans = timed_level
    rq_kmeans.balanced_assign = timed_assign
    rq_kmeans._seed_centroids = timed_seed
    started = time.perf_counter()
    codes_NL, books = rq_kmeans.residual_kmeans(x_ND, levels, k, iters, KMEANS_SEED, device, **kwargs)
    total_s = time.perf_counter() - started
    errors = relative_errors(x_ND, codes_NL, books)
    for level, entry in enumerate(levels_log):
        sizes_K = torch.bincount(codes_NL[:, level], minlength=k)
        entry.update(
            balance=float(sizes_K.max()) / float(sizes_K.min()),
            min_size=int(sizes_K.min()),
            max_size=int(sizes_K.max()),
            relative_error=errors[level],
        )
    import resource

    return {
        "case": case, "n": n, "d": d, "levels": levels, "k": k, "iters": iters, "mode": mode, "device": device,
        "data_s": data_s, "total_s": total_s, "per_level": levels_log,
        "self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def spawn(case: str, iters: int, device: str, mode: str, threads: int) -> dict:
    """Run one case in a fresh process under /usr/bin/time -v; add its peak RSS."""
    cmd = [sys.executable, __file__, "--worker", case, "--iters", str(iters), "--device", device, "--mode", mode]
    time_bin = Path("/usr/bin/time")
    if time_bin.exists():
        cmd = [str(time_bin), "-v", *cmd]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), ONEREC_NO_PROGRESS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} ({mode}) failed with exit {proc.returncode}:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    result["peak_rss_mb"] = int(match.group(1)) / 1024 if match else result["self_maxrss_mb"]
    result["peak_rss_source"] = "/usr/bin/time -v" if match else "getrusage(RUSAGE_SELF)"
    return result


def seconds_per_assignment(result: dict) -> float:
    levels = result["per_level"]
    return sum(e["assign_s"] for e in levels) / sum(e["assignments"] for e in levels)


def growth(scale: list[dict]) -> list[str]:
    """How the cost per balanced assignment grows with N at a fixed D, L and K."""
    lines = []
    by_shape: dict[tuple, list[dict]] = {}
    for r in scale:
        by_shape.setdefault((r["d"], r["levels"], r["k"]), []).append(r)
    for (d, levels, k), rows in by_shape.items():
        rows = sorted(rows, key=lambda r: r["n"])
        for small, large in zip(rows, rows[1:]):
            per = [seconds_per_assignment(r) for r in (small, large)]
            lines.append(
                f"- D={d}, {levels} x {k}: N x{large['n'] / small['n']:.1f} ({small['n']:,} -> {large['n']:,}) "
                f"costs x{per[1] / per[0]:.2f} per assignment ({per[0]:.1f} s -> {per[1]:.1f} s) and "
                f"x{large['peak_rss_mb'] / small['peak_rss_mb']:.2f} peak RSS"
            )
    return lines


def markdown(results: list[dict]) -> str:
    runs = {}
    for r in results:  # one line per invocation that contributed rows
        runs.setdefault(r["command"], r)
    lines = [f"# Balanced residual k-means at scale: {results[0]['processor']}", ""]
    for command, r in runs.items():
        lines += [
            f"- `{command}`: {r['date']}, torch {r['torch']}, {r['threads']} thread(s) (OMP_NUM_THREADS), "
            f"device {r['device']}, kmeans_iters={r['iters']} (at most that many Lloyd iterations per level; "
            f"a level stops early when the assignment stops changing), seed {KMEANS_SEED}, data seed {DATA_SEED}"
        ]
    lines += [
        "",
        "Data: a Gaussian mixture (max(64, N/100) topics of Zipf sizes, spreads 0.3..1). Peak RSS is the whole "
        "process (Python, torch, the data and every level), from /usr/bin/time -v. The machine's 2 cores were "
        "shared with other jobs while these ran, so times are upper bounds.",
        "",
    ]
    scale = [r for r in results if r["mode"] == "default"]
    if scale:
        lines += [
            "## Scale (the tokenize stage's call, default settings: 256 MB score chunks)",
            "",
            "| N | D | L x K | iters | level | seconds | assignments | s / assignment | seeding s "
            "| max/min size | rel. error | peak RSS | total |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
        ]
        for r in scale:
            for level, e in enumerate(r["per_level"]):
                totals = f" {r['peak_rss_mb'] / 1024:.2f} GB | {r['total_s'] / 60:.1f} min |" if level == 0 else " | |"
                lines.append(
                    f"| {r['n']:,} | {r['d']} | {r['levels']} x {r['k']} | {r['iters']} | {level} | {e['level_s']:.1f} | "
                    f"{e['assignments']} | {e['assign_s'] / max(e['assignments'], 1):.2f} | {e['seeding_s']:.1f} | "
                    f"{e['max_size']}/{e['min_size']} = {e['balance']:.3f} | {e['relative_error']:.4f} |" + totals
                )
        lines += ["", *growth(scale), ""]
    compare = [r for r in results if r["mode"] in ("reference", "chunked")]
    if compare:
        lines += [
            "## The scalable path against the pre-change algorithm, where both run",
            "",
            "reference = the whole [N, K] score matrix and sequential k-means++ over all items (the previous "
            "implementation's algorithm, bit-identical codes); chunked = 8 MB score chunks and on-device seeding "
            "on a sample, forced at these sizes.",
            "",
            "| N | D | L x K | path | seconds | peak RSS | rel. error per level | max/min size per level |",
            "|---:|---:|---|---|---:|---:|---|---|",
        ]
        for r in compare:
            errors = " / ".join(f"{e['relative_error']:.4f}" for e in r["per_level"])
            sizes = " / ".join(f"{e['max_size']}/{e['min_size']}" for e in r["per_level"])
            lines.append(
                f"| {r['n']:,} | {r['d']} | {r['levels']} x {r['k']} | {r['mode']} | {r['total_s']:.1f} | "
                f"{r['peak_rss_mb'] / 1024:.2f} GB | {errors} | {sizes} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=None, help="N:D:L:K, e.g. 1000000:64:3:8192")
    parser.add_argument("--iters", type=int, default=5, help="kmeans_iters (the config default is 25)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--compare", action="store_true", help="reference vs chunked at sizes where both run")
    parser.add_argument("--out", default=None, help="results stem (default bench/results/kmeans_scale_<device>)")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="default", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_case(args.worker, args.iters, args.device, args.mode)), flush=True)
        return

    device = torch.device(args.device)
    name = accelerator_name(device.type == "cuda")
    stem = Path(args.out) if args.out else RESULTS / f"kmeans_scale_{device_slug(device, name)}"
    meta = {
        "processor": name, "torch": torch.__version__, "threads": args.threads,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "bench/kmeans_scale.py", *sys.argv[1:]]),
    }
    jobs = [(case, "default") for case in (args.cases or DEFAULT_CASES)]
    if args.compare:
        jobs = [(case, mode) for case in (args.cases or COMPARE_CASES) for mode in ("reference", "chunked")]
    # The results file collects every invocation's rows (the scale runs and --compare); a
    # rerun of the same case, mode, iters and device replaces its row.
    json_path = stem.with_suffix(".json")
    results = json.loads(json_path.read_text())["results"] if json_path.exists() else []
    if args.render:
        stem.with_suffix(".md").write_text(markdown(results) + "\n")
        return
    for case, mode in jobs:
        print(f"running {case} ({mode}) ...", file=sys.stderr, flush=True)
        result = {**spawn(case, args.iters, args.device, mode, args.threads), **meta}
        key = (case, mode, args.iters, args.device)
        results = [r for r in results if (r["case"], r["mode"], r["iters"], r["device"]) != key] + [result]
        stem.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"results": results}, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(results) + "\n")
    save_figure({"results": results}, json_path)
    print(markdown(results), flush=True)


if __name__ == "__main__":
    main()
