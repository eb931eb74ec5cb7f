"""Recommendation quality, end to end: ours vs our SASRec vs popularity vs the published rows.

    python bench/quality.py --config configs/beauty/pipeline.yaml --name beauty \
        [--published bench/published/amazon2014_beauty.json] [--tokenizer-report] [key=value ...]

Runs `onerec pipeline` (data -> tokenize -> pretrain -> evaluate) and the baseline stage on
the same data and split: SASRec, and SASRec++ and HSTU beside it with `sasrec_pp.enabled=true`
and `hstu.enabled=true` (when the pipeline runs the baseline stage itself, because the config
builds its semantic IDs from SASRec's item vectors or enables another baseline, its results
are reused), then writes
bench/results/quality_<name>.{json,md} and prints the table. Hyperparameters come from the
config, which is chosen on validation only; the test split is scored once, by the evaluate
stage and by the baseline, at the end. The figure (bench/results/quality_<name>.png) has error
bars of one standard error over the test users (bench/figures.py).
--tokenizer-report also quantises the same item embeddings with both tokenizers
(rq_kmeans and rq_vae) and reports per-level utilization, entropy and collision rate.
--seeds N runs all of it N times (run.seed = seed, seed + 1, ...; each run in
<run.out_dir>-seed<N>) and reports each model's mean ± standard deviation over the seeds, and
in the json the standard error of the mean and every seed's numbers: a difference smaller
than the seed-to-seed spread is not a win.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from onerec.config import load_config, to_dict
from onerec.logging import setup_console, write_json_atomic
from onerec.paths import RunPaths
from onerec.stages.baseline import LABELS as BASELINE_NAMES  # SASRec, SASRec++, HSTU by config section

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devices import accelerator_name, processor_name  # noqa: E402  (same folder)
from figures import save_figure  # noqa: E402

METRICS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
# Baseline models (config section = key in the result) and their rows in the table.
BASELINE_ROWS = {
    "sasrec": "SASRec (ours, CE)",
    "sasrec_pp": "SASRec++ (ours, CE + crop/shuffle)",
    "hstu": "HSTU (ours, CE)",
}
RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    if device != "cpu" and torch.cuda.is_available():
        return accelerator_name(cuda=True)
    return f"CPU: {processor_name()}, {os.cpu_count()} cores"


def bench_parser(doc: str, config_help: str, name_example: str) -> argparse.ArgumentParser:
    """The arguments every bench script shares: --config, --name, --results-dir, key=value overrides."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--name", required=True, help=f"data set name for the result files, e.g. {name_example}")
    parser.add_argument("--results-dir", default=str(RESULTS), help="where the result files go")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def run_record(script: str, name: str, argv: list[str] | None, cfg) -> dict:
    """The fields every bench result starts with: what ran (the command), when, where, with which config."""
    return {
        "name": name,
        "command": " ".join(["python", f"bench/{script}", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.date.today().isoformat(),
        "device": device_name(str(cfg.run.device)),
        "config": to_dict(cfg),
    }


def tokenizer_report(config: str, overrides: list[str], methods=("rq_kmeans", "rq_vae")) -> dict:
    """Quantise the run's item embeddings with each method; per-level statistics for each."""
    from onerec.tokenizer.semantic_ids import CACHE_DIR, SemanticIds
    from onerec.stages.tokenize import main as tokenize_main

    paths = RunPaths.of(load_config(config, overrides).run.out_dir)
    report = {}
    for method in methods:
        root = paths.root / "tokenizers" / method
        cfg = load_config(config, [*overrides, f"run.out_dir={root}", f"tokenizer.method={method}"])
        root.mkdir(parents=True, exist_ok=True)
        if not (root / "data").exists():
            (root / "data").symlink_to(paths.data.resolve())
        if cfg.tokenizer.needs_sasrec and not (root / "baselines").exists():  # the same SASRec item vectors
            (root / "baselines").symlink_to(paths.baselines.resolve())
        cache = paths.semantic_ids / CACHE_DIR
        if cache.is_dir():  # same texts, same encoder: the embeddings (and their fingerprint) carry over
            shutil.copytree(cache, root / "semantic_ids" / CACHE_DIR, dirs_exist_ok=True)
        started = time.perf_counter()
        stats = SemanticIds.load(tokenize_main(cfg)).stats
        report[method] = {
            "utilization": [lvl["utilization"] for lvl in stats["per_level"]],
            "entropy_bits": [lvl["entropy"] for lvl in stats["per_level"]],
            "max_entropy_bits": stats["max_entropy_bits"],
            "collision_rate_before_dedup": stats["collision_rate_before_dedup"],
            "max_items_per_tuple": stats["max_items_per_tuple"],
            "seconds": time.perf_counter() - started,
        }
    return report


def markdown(result: dict) -> str:
    head = "| model | " + " | ".join(m.replace("recall", "R").replace("ndcg", "N") for m in METRICS) + " | source |"
    lines = [head, "|---" * (len(METRICS) + 2) + "|"]

    def row(name: str, values: dict, source: str, spread: dict | None = None) -> None:
        cells = [f"{values[m]:.4f}" + (f" ± {spread[m]:.4f}" if spread else "") for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {source} |")

    sources = result.get("published_sources", {})
    for name, values in result["published"].items():
        row(name, values, sources.get(name, "published"))
    if result.get("target"):
        row(f"target ({result['target_label']})", result["target"], "published x factor")
    seeds = result.get("seeds", [])
    measured = f"measured, mean ± std of {len(seeds)} seeds" if len(seeds) > 1 else "measured"
    row("popularity (ours)", result["popularity"]["test"], "measured")
    baselines = [(key, label) for key, label in BASELINE_ROWS.items() if key in result]
    for key, label in baselines:
        row(label, result[key]["test"], measured, result[key].get("test_std"))
    row("OneRec (ours)", result["ours"]["test"], measured, result["ours"].get("test_std"))
    baseline_minutes = "".join(
        f", {BASELINE_NAMES[key]} {result['seconds'][key] / 60:.1f} min" for key, _ in baselines
    )
    out = [
        f"## Quality on {result['name']} (test split)",
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}; device: {result['device']}; wall time: pipeline "
        f"{result['seconds']['pipeline'] / 60:.1f} min{baseline_minutes}"
        + timing_note(result, bool(baselines)),
        "",
        *lines,
        "",
        "Validation (selection split): OneRec "
        + ", ".join(f"{m} {result['ours']['valid'][m]:.4f}" for m in METRICS)
        + "".join(
            f"; {BASELINE_NAMES[key]} " + ", ".join(f"{m} {result[key]['valid'][m]:.4f}" for m in METRICS)
            for key, _ in baselines
        ),
    ]
    if len(seeds) > 1:
        out += ["", f"Seeds (run.seed): {', '.join(map(str, seeds))}; ± is the standard deviation over seeds. "
                "Standard error of the mean (std / sqrt(seeds)), test: "
                + "; ".join(f"{BASELINE_NAMES.get(key, 'OneRec')} " + ", ".join(
                    f"{m} {result[key]['test_se'][m]:.4f}" for m in METRICS) for key in ("ours", *dict(baselines)))]
    if result.get("target_met") is not None:
        out += ["", "Target met: " + ", ".join(f"{m} {'yes' if ok else 'no'}" for m, ok in result["target_met"].items())]
    if result.get("tokenizers"):
        out += ["", "| tokenizer | utilization per level | entropy bits per level (max) | collision rate before dedup |", "|---|---|---|---|"]
        for method, t in result["tokenizers"].items():
            out.append(
                f"| {method} | {', '.join(f'{u:.3f}' for u in t['utilization'])} | "
                f"{', '.join(f'{e:.2f}' for e in t['entropy_bits'])} ({t['max_entropy_bits'][0]:.0f}) | "
                f"{t['collision_rate_before_dedup']:.4f} |"
            )
    return "\n".join(out) + "\n"


def timing_note(result: dict, has_baselines: bool) -> str:
    """How the wall times above were measured, ending their sentence."""
    if result.get("read_back"):
        return ". Every model was read back from a finished run (--skip-pipeline): each time is that run's own."
    return " (part of the pipeline's time)." if has_baselines and result.get("sasrec_in_pipeline") else "."


def write_results(results_dir: Path, stem: str, result: dict, table: str) -> None:
    """<stem>.json (everything), <stem>.md (the table), <stem>.png (its figure, drawn from the
    json's dict), and the table on stdout."""
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results_dir / f"{stem}.json", result)
    (results_dir / f"{stem}.md").write_text(table, encoding="utf-8")
    save_figure(result, results_dir / f"{stem}.json")
    print(table)


def count_test_users(cfg) -> int:
    """How many users the test split scores (one target each): the n of the figure's error bars."""
    from onerec.data.prepared import load_prepared
    from onerec.data.splits import make_splits

    return len(make_splits(load_prepared(RunPaths.of(cfg.run.out_dir).data).sequences, cfg.data)["test"])


def pipeline_metrics(cfg, skip_pipeline: bool) -> dict:
    """The metrics.json of `cfg`'s run: read back from a finished run (skip_pipeline), else
    what `onerec pipeline` returns after running it."""
    if skip_pipeline:
        return json.loads(RunPaths.of(cfg.run.out_dir).metrics.read_text())
    from onerec.stages.pipeline import main as pipeline_main

    return pipeline_main(cfg)


def run_seed(cfg, args, argv: list[str] | None, pipeline_seconds: float | None = None) -> dict:
    """One run of the pipeline and the baselines for `cfg` (one seed): the result dict.
    pipeline_seconds: the measured wall time of a run made earlier (--skip-pipeline)."""
    paths = RunPaths.of(cfg.run.out_dir)

    from onerec.stages import BY_NAME
    from onerec.stages.baseline import main as baseline_main

    started = time.perf_counter()
    metrics = pipeline_metrics(cfg, args.skip_pipeline)
    pipeline_seconds = pipeline_seconds or metrics.get("wall_seconds", time.perf_counter() - started)
    baseline_files = {name: paths.baselines / name / "metrics.json" for name in cfg.enabled_baselines}
    sasrec_in_pipeline = bool(
        baseline_files and BY_NAME["baseline"].in_pipeline(cfg) and all(f.is_file() for f in baseline_files.values())
    )
    if sasrec_in_pipeline:
        # The pipeline ran the baseline stage (before tokenize, which may read SASRec's item vectors).
        baselines = {name: finished_baseline(cfg, name, f) for name, f in baseline_files.items()}
    else:
        baselines = baseline_main(cfg) if baseline_files else {}
    return {
        **run_record("quality.py", args.name, argv, cfg),
        "ours": {"valid": metrics["valid"], "test": metrics["test"]},
        **{name: {k: b[k] for k in ("valid", "test", "best_epoch", "epochs_run")} for name, b in baselines.items()},
        "popularity": metrics["baselines"]["popularity"],
        "test_users": count_test_users(cfg),
        "seconds": {"pipeline": pipeline_seconds, **{name: b["wall_seconds"] for name, b in baselines.items()}},
        "sasrec_in_pipeline": sasrec_in_pipeline,
        "read_back": bool(args.skip_pipeline),
        "semantic_ids": metrics.get("semantic_ids", {}),
    }


def finished_baseline(cfg, name: str, path: Path) -> dict:
    """A finished baseline's metrics.json, refused (ValueError naming the file and the keys)
    unless it was trained with `cfg`'s section `name` and run.seed: a table must never show
    a model trained with other settings than its command line says."""
    result = json.loads(path.read_text())
    wanted = to_dict(getattr(cfg, name))
    trained = result.get("config", {})
    differ = sorted(k for k in wanted.keys() | trained.keys() if wanted.get(k) != trained.get(k))
    if differ:
        raise ValueError(
            f"{path}: trained with other {name} settings than the config asks: "
            + ", ".join(f"{name}.{k}={trained.get(k)!r} (config: {wanted.get(k)!r})" for k in differ)
        )
    if "seed" in result and result["seed"] != cfg.run.seed:  # older files do not record it
        raise ValueError(f"{path}: trained with run.seed={result['seed']}, the config asks for {cfg.run.seed}")
    return result


def seed_overrides(cfg, seeds: int) -> list[list[str]]:
    """The extra overrides of each seed's run: none for one seed (the run as configured); for
    several, run.seed = the configured seed + i, each run in its own directory beside the
    configured one (<run.out_dir>-seed<seed>), so their outputs never mix."""
    if seeds == 1:
        return [[]]
    base = cfg.run.seed
    return [[f"run.seed={base + i}", f"run.out_dir={cfg.run.out_dir}-seed{base + i}"] for i in range(seeds)]


def aggregate(results: list[dict], seeds: list[int]) -> dict:
    """One result from the runs of several seeds: each model's metrics are the mean over seeds,
    with the sample standard deviation (`<split>_std`) and the standard error of the mean
    (`<split>_se`, std / sqrt(seeds)) beside them, each seed's own numbers under `per_seed`,
    and the wall times summed."""
    import statistics

    first = results[0]
    combined = {**first, "seeds": seeds, "per_seed": [], "seconds": {}}
    models = [key for key in ("ours", *BASELINE_ROWS) if key in first]
    for key in models:
        combined[key] = {"best_epoch": [r[key].get("best_epoch") for r in results]} if key != "ours" else {}
        for split in ("valid", "test"):
            values = {m: [r[key][split][m] for r in results] for m in first[key][split]}
            combined[key][split] = {m: statistics.fmean(v) for m, v in values.items()}
            combined[key][f"{split}_std"] = {m: statistics.stdev(v) for m, v in values.items()}
            combined[key][f"{split}_se"] = {m: statistics.stdev(v) / len(v) ** 0.5 for m, v in values.items()}
    for seed, result in zip(seeds, results):
        combined["per_seed"].append({"seed": seed, **{key: {s: result[key][s] for s in ("valid", "test")} for key in models}})
    for result in results:
        for part, seconds in result["seconds"].items():
            combined["seconds"][part] = combined["seconds"].get(part, 0.0) + seconds
    return combined


def main(argv: list[str] | None = None) -> dict:
    parser = bench_parser(__doc__, "pipeline YAML (only differences from the defaults)", "beauty")
    parser.add_argument("--published", help="json with published rows (and an optional target)")
    parser.add_argument("--tokenizer-report", action="store_true")
    parser.add_argument("--skip-pipeline", action="store_true", help="reuse <out>/metrics.json from a finished run")
    parser.add_argument(
        "--pipeline-seconds",
        help="with --skip-pipeline: the measured wall time of each seed's run (comma-separated, one per seed)\n"
             "when it was done in pieces or its metrics.json holds only the evaluate stage's time",
    )
    parser.add_argument(
        "--seeds", type=int, default=1,
        help="runs with run.seed = seed, seed + 1, ... (each in <run.out_dir>-seed<N>); the table gives the\n"
             "mean ± std over them and the json also the standard error and each seed's numbers",
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: expected 1 or more")
    try:
        seconds = [float(v) for v in args.pipeline_seconds.split(",")] if args.pipeline_seconds else [None] * args.seeds
    except ValueError:
        parser.error(f"--pipeline-seconds {args.pipeline_seconds}: expected numbers, comma-separated")
    if len(seconds) != args.seeds:
        parser.error(f"--pipeline-seconds: {len(seconds)} values for {args.seeds} seeds; give one per seed")
    setup_console()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_config(args.config, args.overrides)
    runs = [load_config(args.config, [*args.overrides, *extra]) for extra in seed_overrides(cfg, args.seeds)]
    results = [run_seed(run_cfg, args, argv, secs) for run_cfg, secs in zip(runs, seconds)]
    result = results[0] if len(results) == 1 else aggregate(results, [run_cfg.run.seed for run_cfg in runs])

    published, sources, target, target_label = {}, {}, None, None
    if args.published:
        spec = json.loads(Path(args.published).read_text())
        published, sources = spec["rows"], spec.get("sources", {})
        if "target" in spec:
            target_label = f"{spec['target']['row']} x {spec['target']['factor']}"
            target = {m: published[spec["target"]["row"]][m] * spec["target"]["factor"] for m in METRICS}
    result["published"], result["published_sources"] = published, sources
    if target is not None:
        result["target"], result["target_label"] = target, target_label
        result["target_met"] = {m: result["ours"]["test"][m] >= target[m] for m in METRICS}
    if args.tokenizer_report:
        result["tokenizers"] = tokenizer_report(args.config, args.overrides)
    write_results(Path(args.results_dir), f"quality_{args.name}", result, markdown(result))
    return result

if __name__ == "__main__":
    main()
