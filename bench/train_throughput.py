"""Training throughput of the OneRec model through the DeepSpeed engine, at ep=1 and ep=2.

    python bench/train_throughput.py                  # CPU: 2 gloo ranks; GPU: every visible GPU, bf16
    python bench/train_throughput.py --presets small --steps 5

For each model preset and expert-parallel size it runs real training steps (forward,
backward, AdamW step through build_engine, as pretraining does) on synthetic code tuples
and reports:

  tokens/s    positions computed per second over all ranks (encoder start + history, padding
              included, plus the decoder's M * (L + 1) inputs), and samples/s
  MFU         a rough model FLOPs utilisation: the 6 * active params * tokens rule, divided by
              the measured dense matmul FLOP/s of the same ranks (every rank multiplies square
              matrices at the same time, in the training dtype; the sum is the "peak"). Active
              params are the non-embedding parameters with top_k of E experts per MoE layer.
              In an encoder-decoder a position only passes through its own side, so the rule is
              applied per side: 6 x (encoder params x encoder positions + active decoder params
              x decoder positions + cross-attention K/V projections x encoder positions per
              decoder layer + tied head x target codes). A flat 6 x all active params x all
              tokens would overstate the work 2-3x here (most positions are history, which
              never enters the decoder). Attention scores are not counted.
  CPU time    on a shared machine wall-clock rates mostly measure how much CPU the ranks were
              given. The bench therefore also reports tokens per CPU-second (process CPU time
              summed over ranks) and an MFU against the matmul FLOPs per CPU-second, which
              stay meaningful under contention; they leave out time spent waiting (e.g. for
              the all-to-all partner), so compare them with the wall-clock columns.

On CPU both ep settings use the same 2 gloo ranks (ep=1: experts replicated, data parallel;
ep=2: each rank holds half of the experts, tokens exchanged by all-to-all), one thread each.
On GPU it runs one rank per visible GPU with nccl in bf16 autocast; ep=2 needs 2 GPUs (on one
GPU it is skipped, and the results say so).
Results: bench/results/train_throughput_<device>.{json,md,png}, <device> = cpu, h100, h200, ...
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
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

# No named model presets exist in configs/ (the YAMLs only override defaults), so the bench
# defines two: "small" is configs/demo.yaml's model, "base" a wider/deeper one with 8 experts.
PRESETS = {
    "small": dict(d_model=128, num_heads=4, encoder_layers=2, decoder_layers=2, d_ff=256, num_experts=4, top_k=2),
    "base": dict(d_model=256, num_heads=8, encoder_layers=4, decoder_layers=4, d_ff=1024, num_experts=8, top_k=2),
}
CODEBOOK_SIZES = [64, 64, 64, 32]  # 3 levels + dedup, as demo.yaml's tokenizer gives
HISTORY, SESSION = 20, 1


# ----------------------------------------------------------------------------- worker
def active_params(model: torch.nn.Module) -> tuple[int, int]:
    """(total params, params a token passes through): embeddings out, top_k / E of each expert set."""
    from onerec.model.moe import MoEFeedForward

    total = sum(p.numel() for p in model.parameters())
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    inactive = 0
    for layer in model.modules():
        if isinstance(layer, MoEFeedForward):
            e, k = layer.router.num_experts, layer.router.top_k
            expert_params = sum(p.numel() for p in layer.experts.parameters())
            inactive += expert_params * (e - k) // e
    return total, total - embeddings - inactive


def train_flops_per_sample(model: torch.nn.Module, levels: int) -> float:
    """6 x multiply-accumulates of one sample's forward, per side (see the module docstring)."""
    from onerec.model.moe import MoEFeedForward

    def active(module: torch.nn.Module) -> int:
        n = sum(p.numel() for p in module.parameters())
        for moe in (m for m in module.modules() if isinstance(m, MoEFeedForward)):
            e, k = moe.router.num_experts, moe.router.top_k
            n -= sum(p.numel() for p in moe.experts.parameters()) * (e - k) // e
        return n

    encoder = active(model.encoder_layers) + active(model.encoder_norm)
    cross_kv = sum(layer.cross_attn.kv_proj.weight.numel() for layer in model.decoder_layers)
    decoder = active(model.decoder_layers) + active(model.decoder_norm) - cross_kv
    head = model.c_max * model.code_emb.weight.shape[1]  # one level's table per target code
    enc_positions, dec_positions = HISTORY + 1, SESSION * (levels + 1)
    return 6.0 * (
        encoder * enc_positions + cross_kv * enc_positions + decoder * dec_positions + head * SESSION * levels
    )


def matmul_flops(device: torch.device, dtype: torch.dtype, size: int, seconds: float = 1.5) -> tuple[float, float]:
    """Dense square matmul FLOPs (2 * n^3 per product) of this rank per wall second and per CPU second."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    reps, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    sync()
    flops = 2 * size**3 * reps
    return flops / (time.perf_counter() - start), flops / max(time.process_time() - cpu_start, 1e-9)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from onerec.config import ModelConfig, MoEConfig, TrainConfig
    from onerec.distributed.deepspeed import build_engine, init_distributed
    from onerec.distributed.expert_parallel import apply_expert_parallel
    from onerec.model.onerec import OneRecModel
    from onerec.train.trainer import warmup_cosine

    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    info = init_distributed("auto")
    device, world = info.device, info.world_size
    dtype = torch.bfloat16 if device.type == "cuda" else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    # The "peak": all ranks multiply at once, as they train at once (they share the machine).
    dist.barrier()
    wall_flops, cpu_flops = matmul_flops(device, dtype or torch.float32, 4096 if device.type == "cuda" else 512)
    peak = torch.tensor(wall_flops, dtype=torch.float64)
    dist.all_reduce(peak)  # all ranks together, per wall second
    peak_cpu = torch.tensor(cpu_flops / world, dtype=torch.float64)
    dist.all_reduce(peak_cpu)  # one rank's mean, per CPU second

    generator = torch.Generator().manual_seed(info.rank)
    rows, skipped = [], []
    for preset in args.presets:
        shape = PRESETS[preset]
        for ep in args.ep:
            if world % ep or shape["num_experts"] % ep:
                # e.g. ep=2 on a single GPU: there is no second rank to hold half of the experts
                skipped.append(f"{preset} ep={ep}: needs a multiple of {ep} ranks and of {ep} experts "
                               f"(have {world} rank(s), {shape['num_experts']} experts)")
                continue
            torch.manual_seed(0)
            model_cfg = ModelConfig(
                d_model=shape["d_model"], num_heads=shape["num_heads"], encoder_layers=shape["encoder_layers"],
                decoder_layers=shape["decoder_layers"], d_ff=shape["d_ff"], dropout=0.1,
                moe=MoEConfig(num_experts=shape["num_experts"], top_k=shape["top_k"]),
            )
            model = OneRecModel(model_cfg, CODEBOOK_SIZES, HISTORY, SESSION).to(device)
            total, active = active_params(model)
            flops_per_sample = train_flops_per_sample(model, len(CODEBOOK_SIZES))
            apply_expert_parallel(model, ep)
            train_cfg = TrainConfig(lr=1e-3, zero_stage=0, grad_clip=1.0)
            optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, foreach=device.type == "cuda")
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(1000, 10, 0.1))
            engine = build_engine(model, optimizer, scheduler, train_cfg, args.batch_size, world)
            B = args.batch_size
            history = torch.stack(
                [torch.randint(0, c, (B, HISTORY), generator=generator) for c in CODEBOOK_SIZES], -1
            ).to(device)
            target = torch.stack([torch.randint(0, c, (B, SESSION), generator=generator) for c in CODEBOOK_SIZES], -1).to(device)

            def step() -> None:
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    output = engine(history, target)
                    logits = output.logits_BMLC.reshape(-1, output.logits_BMLC.shape[-1])
                    loss = torch.nn.functional.cross_entropy(logits.float(), target.reshape(-1)) + 0.01 * output.aux_loss
                engine.backward(loss)
                engine.step()

            for _ in range(args.warmup):
                step()
            sync()
            dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step()
            sync()
            cpu = torch.tensor(time.process_time() - cpu_start, dtype=torch.float64)
            dist.barrier()
            elapsed = time.perf_counter() - start
            dist.all_reduce(cpu)
            tokens_per_sample = HISTORY + 1 + SESSION * (len(CODEBOOK_SIZES) + 1)
            tokens = tokens_per_sample * B * world * args.steps
            model_flops = flops_per_sample * B * world * args.steps / elapsed
            rows.append({
                "preset": preset, "ep": ep, "world_size": world, **shape,
                "params_total": total, "params_active": active, "train_flops_per_sample": flops_per_sample,
                "batch_per_rank": B, "tokens_per_sample": tokens_per_sample, "steps": args.steps,
                "seconds": elapsed, "tokens_per_s": tokens / elapsed, "samples_per_s": B * world * args.steps / elapsed,
                "model_flops_per_s": model_flops, "mfu": model_flops / peak.item(),
                "cpu_seconds": cpu.item(), "tokens_per_cpu_s": tokens / cpu.item(),
                "mfu_cpu_time": flops_per_sample * B * world * args.steps / cpu.item() / peak_cpu.item(),
            })
            del engine, model, optimizer
    if info.rank == 0:
        Path(args.out).write_text(json.dumps({
            "matmul_flops_per_s": peak.item(), "matmul_flops_per_cpu_s_per_rank": peak_cpu.item(), "rows": rows,
            "skipped": skipped,
        }))
    dist.barrier()


# ----------------------------------------------------------------------------- launcher
def launch(args: argparse.Namespace) -> dict:
    cuda = torch.cuda.is_available()
    world = torch.cuda.device_count() if cuda else 2
    out = Path(args.results_dir) / f".train_throughput_worker-{os.getpid()}.json"
    env = job_env(world)
    cmd = [sys.executable, __file__, "--worker", "--out", str(out), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
           "--presets", *args.presets, "--ep", *map(str, args.ep)]
    load_before = os.getloadavg()
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]
    codes = [p.wait() for p in procs]
    load_after = os.getloadavg()
    if any(codes):
        raise SystemExit(f"bench workers failed with exit codes {codes}")
    result = json.loads(out.read_text())
    out.unlink()
    name = accelerator_name(cuda)
    return {
        "device": name,
        "device_type": "gpu" if cuda else "cpu",
        "device_slug": device_slug(torch.device("cuda" if cuda else "cpu"), name),
        "ranks": world,
        "threads_per_rank": None if cuda else 1,
        "precision": "bf16 autocast" if cuda else "fp32",
        "backend": "nccl" if cuda else "gloo",
        "date": dt.date.today().isoformat(),
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "torch": torch.__version__,
        # Other work on the machine skews the numbers: the 1-minute load average around the run.
        "load_average_1min": {"before": load_before[0], "after": load_after[0], "cpus": os.cpu_count()},
        **result,
    }


def markdown(report: dict) -> str:
    lines = [
        f"Training throughput, {report['device']} ({report['ranks']} {report['backend']} ranks"
        + (f", {report['threads_per_rank']} thread each" if report["threads_per_rank"] else "")
        + f", {report['precision']}), {report['date']}",
        "",
        f"Machine load (1-min average) {report['load_average_1min']['before']:.1f} before, "
        f"{report['load_average_1min']['after']:.1f} after, on {report['load_average_1min']['cpus']} CPUs.",
        "",
        f"`{report['command']}`; peak = measured dense matmul {report['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s "
        f"(all ranks at once; {report['matmul_flops_per_cpu_s_per_rank'] / 1e9:.1f} GFLOP per CPU-second per rank); "
        "MFU = model FLOP/s / peak, model FLOPs = 6 x active params x positions, "
        "counted per side (encoder params x history positions, decoder params x decoder positions; "
        "see the script's docstring). The CPU-time columns divide by process CPU time instead of wall time.",
        "",
        "| preset | ep | params (active) | batch/rank | tokens/s | samples/s | model GFLOP/s | MFU "
        "| tokens/CPU-s | MFU (CPU time) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['preset']} | {r['ep']} | {r['params_total'] / 1e6:.2f}M ({r['params_active'] / 1e6:.2f}M) "
            f"| {r['batch_per_rank']} | {r['tokens_per_s']:,.0f} | {r['samples_per_s']:,.1f} "
            f"| {r['model_flops_per_s'] / 1e9:.2f} | {r['mfu']:.1%} "
            f"| {r['tokens_per_cpu_s']:,.0f} | {r['mfu_cpu_time']:.1%} |"
        )
    if report.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(report["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--ep", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="samples per rank per step")
    parser.add_argument("--results-dir", default=str(RESULTS), help="where the result files go")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)  # the workers write their rows there too
    report = launch(args)
    write_results(Path(args.results_dir), f"train_throughput_{report['device_slug']}", report, markdown(report))


if __name__ == "__main__":
    main()
