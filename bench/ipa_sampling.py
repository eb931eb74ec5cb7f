"""IPA sampling throughput: sessions per second of one round's sampling, on 1 rank and on several.

    python bench/ipa_sampling.py                       # CPU: 1 and 2 gloo ranks; GPU: 1 and every visible GPU
    python bench/ipa_sampling.py --users 16 --num-samples 128 --ranks 1 2

What is timed is what `onerec dpo` runs for a round's sampled users (onerec/align/sampling.py
and pairs.py): each rank takes its strided share of the users and, batch by batch
(align.sample_batch_size users), generates N sessions per user by trie-constrained beam
search, scores them with the session reward model, picks the chosen / rejected pair and
computes the reference model's log-probs of both; then the pair rows are all-gathered on
every rank. sessions/s = users x N / wall time of all that (the slowest rank's, barrier to
barrier), after one untimed warm-up batch.

Model and data are synthetic, the shapes of configs/kuairand/pipeline.yaml: the OneRec model
with d_model 64, 2 + 2 layers, d_ff 256, 4 experts top-2 (0.9M parameters), semantic IDs of
3 levels x 32 codes plus a dedup level over 7,583 items, histories of 20 items, sessions of
3 items; the reward model of reward.* defaults with 5 signals. Weights are random (seeded):
throughput does not depend on what the weights say, except through dead beams, which a
random model over a full catalogue does not produce. Under expert parallelism (--ep 2) each
rank holds half the experts and the forward is a collective.

On CPU every rank runs one thread (OMP_NUM_THREADS=1), so 2 ranks use 2 cores; on GPU one
rank per GPU (nccl), fp32 generation and bf16 autocast for the reference log-probs, as
`onerec dpo` with train.precision=auto does.
Results: bench/results/ipa_sampling_<device>.{json,md,png}, <device> = cpu, h100, h200, ...
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devices import accelerator_name, device_slug  # noqa: E402  (same folder)
from local_ranks import job_env  # noqa: E402
from quality import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# configs/kuairand/pipeline.yaml's shapes (its model, its semantic IDs, its sessions)
MODEL = dict(d_model=64, num_heads=4, encoder_layers=2, decoder_layers=2, d_ff=256, num_experts=4, top_k=2)
NUM_ITEMS, LEVELS, CODES, DEDUP = 7583, 3, 32, 26
HISTORY, SESSION, SIGNALS = 20, 3, 5


# ----------------------------------------------------------------------------- worker
def _catalogue(generator: torch.Generator) -> torch.Tensor:
    """[N, L + 1] distinct code tuples: L random levels, then a dedup code numbering the items
    that share them (as the tokenizer's dedup level does)."""
    codes = torch.randint(0, CODES, (NUM_ITEMS, LEVELS), generator=generator)
    seen: dict[tuple, int] = {}
    dedup = []
    for row in map(tuple, codes.tolist()):
        dedup.append(seen.get(row, 0))
        seen[row] = dedup[-1] + 1
    assert max(dedup) < DEDUP
    return torch.cat([codes, torch.tensor(dedup).unsqueeze(1)], 1)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from onerec.align.pairs import gather_rows, shard_rows
    from onerec.align.reward_model import SessionRewardModel
    from onerec.align.reward_scorer import RewardScorer
    from onerec.align.sampling import sample_pairs
    from onerec.config import ModelConfig, MoEConfig, SignalConfig
    from onerec.device import autocast_dtype
    from onerec.distributed.deepspeed import init_distributed
    from onerec.distributed.expert_parallel import apply_expert_parallel
    from onerec.model.onerec import OneRecModel
    from onerec.tokenizer.trie import build_trie

    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    info = init_distributed("auto")
    device, rank, world = info.device, info.rank, info.world_size
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    codes_NL = _catalogue(g)
    sizes = [CODES] * LEVELS + [DEDUP]
    trie = build_trie(codes_NL, sizes)
    torch.manual_seed(0)  # every rank builds the same weights (then keeps its experts under ep > 1)
    cfg = ModelConfig(
        d_model=MODEL["d_model"], num_heads=MODEL["num_heads"], encoder_layers=MODEL["encoder_layers"],
        decoder_layers=MODEL["decoder_layers"], d_ff=MODEL["d_ff"], dropout=0.0, item_id_embedding=True,
        moe=MoEConfig(num_experts=MODEL["num_experts"], top_k=MODEL["top_k"]),
    )
    model = OneRecModel(cfg, sizes, HISTORY, SESSION, num_items=len(codes_NL)).to(device).eval()
    ep = args.ep[0]  # a worker runs one layout
    apply_expert_parallel(model, ep)
    reward = SessionRewardModel(len(codes_NL), sizes, SIGNALS, HISTORY, dropout=0.0).to(device)
    signals = [SignalConfig(name=f"s{k}", column=f"s{k}") for k in range(SIGNALS)]
    scorer = RewardScorer(reward, signals, [0.0] * SIGNALS, [1.0] * SIGNALS, codes_NL.to(device))
    users = args.users + args.sample_batch_size  # the first batch's worth warms up, untimed
    history_US = torch.randint(0, len(codes_NL), (users, HISTORY), generator=g)
    history_US[:, : HISTORY // 4] = -1  # some left padding, as real histories have
    target_UM = torch.randint(0, len(codes_NL), (users, SESSION), generator=g)
    user_U = torch.arange(users)
    autocast = autocast_dtype("auto", device)

    def run(rows: torch.Tensor, row_ids: torch.Tensor):
        picked = rows.clamp(min=0)
        local = sample_pairs(
            model, scorer, history_US[picked], user_U[picked], target_UM[picked], row_ids, codes_NL, trie,
            args.num_samples, SESSION, args.sample_batch_size, device, autocast,
        )
        return gather_rows(local, world, device)

    warm = torch.arange(args.sample_batch_size)  # every rank warms up on the same batch alone
    run(warm, warm)
    rows = shard_rows(args.users, rank, world)
    timed = torch.where(rows >= 0, rows + args.sample_batch_size, rows)
    sync()
    dist.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    table = run(timed, rows)
    sync()
    dist.barrier()
    seconds = time.perf_counter() - start
    cpu = torch.tensor(time.process_time() - cpu_start, dtype=torch.float64)
    dist.all_reduce(cpu)
    sessions = args.users * args.num_samples
    if rank == 0:
        Path(args.out).write_text(json.dumps({
            "ranks": world, "ep": ep, "users": args.users, "num_samples": args.num_samples,
            "sample_batch_size": args.sample_batch_size, "users_per_rank": len(rows), "seconds": seconds,
            "sessions": sessions, "sessions_per_s": sessions / seconds, "users_per_s": args.users / seconds,
            "cpu_seconds": cpu.item(), "sessions_per_cpu_s": sessions / cpu.item(),
            "pairs": int(table.usable_R.sum()), "gathered_rows": len(table),
            "params": sum(p.numel() for p in model.parameters()),  # this rank's (a share of the experts under ep > 1)
        }))
    dist.barrier()
    dist.destroy_process_group()  # gloo's threads stopped before exit: no abort at interpreter shutdown


# ----------------------------------------------------------------------------- launcher
def launch(args: argparse.Namespace, world: int, ep: int) -> dict:
    out = Path(args.results_dir) / f".ipa_sampling_worker-{os.getpid()}-{world}-{ep}.json"
    env = job_env(world)
    cmd = [sys.executable, __file__, "--worker", "--out", str(out), "--users", str(args.users),
           "--num-samples", str(args.num_samples), "--sample-batch-size", str(args.sample_batch_size), "--ep", str(ep)]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"bench workers ({world} ranks, ep={ep}) failed with exit codes {codes}")
    row = json.loads(out.read_text())
    out.unlink()
    return row


def markdown(report: dict) -> str:
    load = report["load_average_1min"]
    lines = [
        f"## IPA sampling throughput, {report['device']}",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}; torch {report['torch']}; {report['backend']}, "
        + (f"{report['threads_per_rank']} thread per rank; " if report["threads_per_rank"] else "")
        + f"machine load (1-min average) {load['before']:.1f} before, {load['after']:.1f} after, on {load['cpus']} CPUs.",
        "",
        f"One round's sampling as `onerec dpo` runs it: {report['users']} users, {report['num_samples']} sessions each "
        f"by trie-constrained beam search, reward-model scores, chosen / rejected pick and the reference log-probs of "
        f"both, {report['sample_batch_size']} users per beam-search call, then the pairs all-gathered. "
        f"{report['model']}",
        "",
        "| ranks | ep | users per rank | seconds | sessions/s | users/s | speed-up | sessions per CPU-s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = next((r for r in report["rows"] if r["ranks"] == 1), report["rows"][0])
    for r in report["rows"]:
        lines.append(
            f"| {r['ranks']} | {r['ep']} | {r['users_per_rank']} | {r['seconds']:.1f} | {r['sessions_per_s']:,.0f} "
            f"| {r['users_per_s']:.2f} | {r['sessions_per_s'] / base['sessions_per_s']:.2f}x "
            f"| {r['sessions_per_cpu_s']:,.0f} |"
        )
    if report.get("note"):
        lines += ["", report["note"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=32, help="users of the round (timed)")
    parser.add_argument("--num-samples", type=int, default=128, help="sessions per user (OneRec: 128)")
    parser.add_argument("--sample-batch-size", type=int, default=4, help="users per beam-search call")
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="world sizes (default: 1 and all)")
    parser.add_argument("--ep", type=int, nargs="+", default=[1], help="expert-parallel sizes to run at each world size")
    parser.add_argument("--results-dir", default=str(RESULTS), help="where the result files go")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    cuda = torch.cuda.is_available()
    ranks = args.ranks or sorted({1, torch.cuda.device_count() if cuda else 2})
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    rows = [launch(args, world, ep) for world in ranks for ep in args.ep if world % ep == 0]
    load_after = os.getloadavg()
    name = accelerator_name(cuda)
    params = rows[0]["params"]
    report = {
        "device": name,
        "device_type": "gpu" if cuda else "cpu",
        "device_slug": device_slug(torch.device("cuda" if cuda else "cpu"), name),
        "backend": "nccl" if cuda else "gloo",
        "threads_per_rank": None if cuda else 1,
        "date": dt.date.today().isoformat(),
        "command": "python " + shlex.join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "torch": torch.__version__,
        "load_average_1min": {"before": load_before[0], "after": load_after[0], "cpus": os.cpu_count()},
        "users": args.users, "num_samples": args.num_samples, "sample_batch_size": args.sample_batch_size,
        "model": (
            f"Small synthetic model with configs/kuairand/pipeline.yaml's shapes ({params / 1e6:.2f}M parameters: "
            f"d_model {MODEL['d_model']}, {MODEL['encoder_layers']}+{MODEL['decoder_layers']} layers, "
            f"{MODEL['num_experts']} experts top-{MODEL['top_k']}; {NUM_ITEMS:,} items, {LEVELS} levels x {CODES} codes "
            f"+ dedup; history {HISTORY}, sessions of {SESSION}; reward model with {SIGNALS} signals), random weights."
        ),
        "note": "" if cuda else (
            "On CPU the ranks share the machine's cores with whatever else runs there (the load average above): "
            "wall-clock rates are lower bounds; sessions per CPU-second (process CPU time summed over ranks) is the "
            "steadier column."
        ),
        "rows": rows,
    }
    write_results(Path(args.results_dir), f"ipa_sampling_{report['device_slug']}", report, markdown(report))


if __name__ == "__main__":
    main()
