"""Kernel benchmarks: trie-constrained decoding and the MoE layer, ours vs the usual baselines.

    python bench/kernels.py                  # CPU: fp32 MoE at T=1024, 1 warmup + 3 repeats (~3 min)
    python bench/kernels.py --device cuda    # GPU: bf16 MoE at T=16384, 3 warmup + 20 repeats
    (B=64, W=50; catalogues of 10k and 1M items)

Writes bench/results/kernels_<device>.{json,md,png} (<device> = cpu, h100, ...) and prints the
markdown tables.

(a) Constrained decoding, one full decode = L + 1 steps (L = 3 code levels of 256 codes and a
    dedup level) for B requests x W beams over a random catalogue of N items. The model is
    left out: every method gets the same precomputed logits per step, so only the search is
    timed.
      ours      onerec.kernels.constrained_beam.constrained_beam_step, backend "auto"
                (the Triton kernel on CUDA, the PyTorch reference on CPU), plus the prefix
                reorder that beam search does after each step; as the beam search, the
                first step reads one row per request (the root) and fans out to W beams
      hf-style  what `generate(..., prefix_allowed_tokens_fn=...)` does in Hugging Face
                transformers: a Python callback per beam returns the allowed tokens of its
                prefix (a dict lookup), a -inf mask row is built per beam, then log-softmax +
                mask + beam score and a top-2W over W x C per request (HF keeps 2W for EOS).
(b) MoE FFN forward + backward: T tokens, E = 24 experts, top-2, D = 512, F = 2048.
      ours      onerec.model.moe.MoEFeedForward (router + routing kernels + grouped expert GEMM)
      deepspeed deepspeed.moe.layer.MoE: TopKGate, einsum dispatch/combine with capacity
                factor 1.0 (its default), the same expert FFN shape (no bias, GELU)
      megatron  megatron-core's unfused topk_routing_with_score_function / permute / unpermute
                around our experts (the same expert math as ours)
    plus routing alone (router, top-k, permute, combine; no expert math) as a share of the layer,
    and on CUDA a dense bf16 matmul's TFLOP/s for scale.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devices import accelerator_name, device_slug  # noqa: E402  (same folder)
from figures import save_figure  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------
# device, timing
# ---------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds per call. GPU: CUDA events (launches, kernels and host waits). CPU: the
    process's CPU time (time.process_time, run with one torch thread), because a shared
    machine's wall clock mostly measures the other jobs; on an idle core the two agree."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.process_time()
            fn()
            times.append(time.process_time() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# (a) constrained decoding
# ---------------------------------------------------------------------------------------------


def random_catalogue(num_items: int, codebook: int, levels: int, seed: int):
    """Random semantic IDs plus the dedup level: (codes_N(L+1), codebook sizes)."""
    from onerec.tokenizer.semantic_ids import add_dedup_level

    g = torch.Generator().manual_seed(seed)
    codes_NL = torch.randint(0, codebook, (num_items, levels), generator=g)
    codes, dedup_size = add_dedup_level(codes_NL)
    return codes, [codebook] * levels + [dedup_size]


def step_logits(steps: int, N: int, sizes: list[int], device, seed: int) -> torch.Tensor:
    """[steps, N, C] fp32 logits, -inf beyond each level's codebook (as the model emits them)."""
    g = torch.Generator().manual_seed(seed)
    C = max(sizes)
    logits = torch.randn(steps, N, C, generator=g) * 2
    for t, size in enumerate(sizes):
        logits[t, :, size:] = NEG_INF
    return logits.to(device)


def our_decode(logits_LNC, trie, B: int, W: int):
    """As onerec.inference.beam_search: the first step reads each request's root row only
    (row b * W of the shared logits) and fans out to W beams."""
    from onerec.kernels.constrained_beam import constrained_beam_step

    device = logits_LNC.device
    scores_N = torch.zeros(B, device=device)
    states_N = torch.zeros(B, dtype=torch.long, device=device)
    generated_NT = torch.zeros(B, 0, dtype=torch.long, device=device)
    for depth, logits_NC in enumerate(logits_LNC):
        rows = 1 if depth == 0 else W
        local_states_N, child_tokens, child_nodes = trie.step_tables(depth, states_N)
        tokens_N, parents_N, scores_N, states_N = constrained_beam_step(
            logits_NC[::W] if rows == 1 else logits_NC, scores_N, local_states_N, child_tokens, child_nodes, W,
            rows_per_request=rows,
        )
        generated_NT = torch.cat([generated_NT[parents_N], tokens_N.unsqueeze(1)], dim=1)
    return generated_NT, scores_N


def prefix_table(codes) -> dict:
    """prefix tuple -> sorted allowed next codes: what a prefix_allowed_tokens_fn looks up."""
    table: dict = {}
    for row in codes.tolist():
        for level in range(len(row)):
            table.setdefault(tuple(row[:level]), set()).add(row[level])
    return {prefix: sorted(tokens) for prefix, tokens in table.items()}


def hf_style_decode(logits_LNC, table: dict, B: int, W: int):
    """transformers' beam search with PrefixConstrainedLogitsProcessor, minus the model."""
    N, C = logits_LNC.shape[1:]
    device = logits_LNC.device

    def prefix_allowed_tokens_fn(batch_id, sent):  # the user callback HF calls once per beam
        return table.get(tuple(sent.tolist()), [])

    input_ids = torch.zeros(N, 0, dtype=torch.long, device=device)
    beam_scores = torch.zeros(B, W, device=device)
    beam_scores[:, 1:] = -1e9  # HF's start: only beam 0 of each request counts
    beam_scores = beam_scores.view(-1)
    rows_B1 = torch.arange(B, device=device).unsqueeze(1) * W
    for logits_NC in logits_LNC:
        next_scores = torch.log_softmax(logits_NC.float(), dim=-1)
        mask = torch.full_like(next_scores, NEG_INF)  # PrefixConstrainedLogitsProcessor.__call__
        for batch_id in range(B):
            for beam_id in range(W):
                sent = input_ids[batch_id * W + beam_id]
                mask[batch_id * W + beam_id, prefix_allowed_tokens_fn(batch_id, sent)] = 0
        next_scores = next_scores + mask + beam_scores[:, None]
        top_scores, top_idx = torch.topk(next_scores.view(B, W * C), 2 * W, dim=1, largest=True, sorted=True)
        top_scores, top_idx = top_scores[:, :W], top_idx[:, :W]  # no EOS here: the first W survive
        beam_idx = (top_idx // C + rows_B1).view(-1)
        input_ids = torch.cat([input_ids[beam_idx], (top_idx % C).reshape(-1, 1)], dim=1)
        beam_scores = top_scores.reshape(-1)
    return input_ids, beam_scores


def bench_decode(args, device) -> list[dict]:
    from onerec.tokenizer.trie import build_trie

    rows = []
    B, W = args.requests, args.beam
    for num_items in args.catalogues:
        t0 = time.perf_counter()
        codes, sizes = random_catalogue(num_items, args.codebook, args.levels, seed=num_items)
        trie = build_trie(codes, sizes).to(device)
        table = prefix_table(codes)
        build_s = time.perf_counter() - t0
        steps = len(sizes)
        logits = step_logits(steps, B * W, sizes, device, seed=1)

        ours_codes, _ = our_decode(logits, trie, B, W)
        hf_codes, _ = hf_style_decode(logits, table, B, W)
        same = (ours_codes.view(B, W, -1) == hf_codes.view(B, W, -1)).all(dim=2).all(dim=1).float().mean().item()

        ours_s = time_it(lambda: our_decode(logits, trie, B, W), device, args.warmup, args.repeats)
        hf_s = time_it(lambda: hf_style_decode(logits, table, B, W), device, 1, args.baseline_repeats)
        row = dict(
            items=num_items,
            trie_nodes=trie.num_nodes,
            max_children=trie.max_children,
            B=B,
            W=W,
            steps=steps,
            ours_ms_per_decode=ours_s * 1e3,
            ours_ms_per_step=ours_s * 1e3 / steps,
            hf_style_ms_per_decode=hf_s * 1e3,
            hf_style_ms_per_step=hf_s * 1e3 / steps,
            speedup=hf_s / ours_s,
            same_ranked_beams=same,
            build_s=build_s,
        )
        if device.type == "cuda":
            row["ours_us_per_step_at_BW"] = ours_s * 1e6 / steps
        rows.append(row)
        print(f"decode N={num_items}: ours {row['ours_ms_per_step']:.3f} ms/step, "
              f"hf-style {row['hf_style_ms_per_step']:.1f} ms/step, same beams {same:.0%}", file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------------------------
# (b) MoE layer
# ---------------------------------------------------------------------------------------------


def init_single_process_group(device) -> None:
    """DeepSpeed's MoE asks torch.distributed for its expert groups, even for one process."""
    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def moe_flops(T: int, D: int, F: int, E: int, K: int) -> float:
    """Forward + backward FLOPs of the expert GEMMs and the router (backward = 2x forward)."""
    return 3 * (2 * T * K * (D * F + F * D) + 2 * T * D * E)


def bench_moe(args, device) -> tuple[list[dict], dict]:
    from onerec.model.moe import MoEFeedForward

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.moe_dtype]
    T, D, F, E, K = args.moe_tokens, 512, 2048, 24, 2
    torch.manual_seed(0)
    x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(T, D, device=device, dtype=dtype)
    flops = moe_flops(T, D, F, E, K)
    results: dict[str, dict] = {}

    def record(name, layer_fn, routing_fn=None, note=""):
        try:
            layer_s = time_it(layer_fn, device, args.warmup, args.repeats)
        except Exception as exc:  # a baseline that cannot run here is reported, not fatal
            results[name] = dict(error=f"{type(exc).__name__}: {exc}")
            print(f"moe {name}: {results[name]['error']}", file=sys.stderr)
            return
        row = dict(layer_ms=layer_s * 1e3, tflops=flops / layer_s / 1e12, note=note)
        if routing_fn is not None:
            routing_s = time_it(routing_fn, device, args.warmup, args.repeats)
            row.update(routing_ms=routing_s * 1e3, routing_share=routing_s / layer_s)
        results[name] = row
        print(f"moe {name}: {row['layer_ms']:.1f} ms fwd+bwd", file=sys.stderr)

    # ours
    ours = MoEFeedForward(D, F, E, K, dropout=0.0).to(device=device, dtype=dtype)

    def ours_layer():
        y, _ = ours(x)
        y.backward(grad_y)

    def ours_routing():
        routed = ours.router(x)
        x_perm, _, handle = ours.dispatcher.dispatch(x, routed.indices_TK)
        ours.dispatcher.combine(x_perm, routed.weights_TK.to(dtype), handle).backward(grad_y)

    record("ours", ours_layer, ours_routing, "onerec MoEFeedForward (kernels backend auto)")

    # megatron-core's unfused routing around the same experts
    try:
        from megatron.core.transformer.moe import moe_utils
    except Exception as exc:
        results["megatron"] = dict(error=f"megatron-core not importable: {exc}")
    else:

        def megatron_routing_ops(x_perm_fn):
            logits = ours.router.gate(x).float()
            probs, routing_map = moe_utils.topk_routing_with_score_function(logits, K, use_pre_softmax=False)
            x_perm, _, sorted_indices = moe_utils.permute(x, routing_map)
            y_perm = x_perm_fn(x_perm, routing_map.sum(dim=0))
            y = moe_utils.unpermute(y_perm, sorted_indices, x.shape, probs=probs.to(dtype), routing_map=routing_map)
            y.backward(grad_y)

        record(
            "megatron",
            lambda: megatron_routing_ops(ours.experts),
            lambda: megatron_routing_ops(lambda x_perm, counts: x_perm),
            "megatron-core unfused permute/unpermute + our experts",
        )

    # DeepSpeed MoE (TopKGate + einsum dispatch)
    try:
        import deepspeed  # noqa: F401
        from deepspeed.moe.layer import MoE

        init_single_process_group(device)
        nn = torch.nn
        expert = nn.Sequential(nn.Linear(D, F, bias=False), nn.GELU(), nn.Linear(F, D, bias=False))
        ds = MoE(hidden_size=D, expert=expert, num_experts=E, ep_size=1, k=K, capacity_factor=1.0,
                 top2_2nd_expert_sampling=False).to(device=device, dtype=dtype)
        ds.set_deepspeed_parallelism()
    except Exception as exc:
        results["deepspeed"] = dict(error=f"{type(exc).__name__}: {exc}")
    else:

        def ds_layer():
            y, _, _ = ds(x)
            y.backward(grad_y)

        record("deepspeed", ds_layer, None, "deepspeed.moe.layer.MoE, capacity factor 1.0, drop tokens")

    dense = {}
    if device.type == "cuda":
        n = 8192
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        mm_s = time_it(lambda: a @ b, device, 3, 10)
        dense = dict(shape=f"{n}x{n}x{n}", tflops=2 * n**3 / mm_s / 1e12)
        for row in results.values():
            if "tflops" in row:
                row["share_of_dense"] = row["tflops"] / dense["tflops"]
    config = dict(T=T, D=D, F=F, E=E, K=K, dtype=args.moe_dtype, flops_fwd_bwd=flops, dense_matmul=dense)
    return [dict(name=name, **row) for name, row in results.items()], config


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = [
        f"# Kernel benchmarks: {report['device']}",
        "",
        f"{report['date']}, torch {report['torch']}, {report['threads']} thread(s), timed by {report['clock']}, "
        f"`{report['command']}`",
        "",
    ]
    if report.get("decode"):
        d0 = report["decode"][0]
        lines += [
            f"## Constrained decoding (B={d0['B']}, W={d0['W']}, {d0['steps']} steps per decode, codebook "
            f"{report['args']['codebook']}; model excluded)",
            "",
            "| items | trie nodes | ours ms/step | hf-style ms/step | ours ms/decode | hf-style ms/decode | speedup | same beams |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report["decode"]:
            lines.append(
                f"| {r['items']:,} | {r['trie_nodes']:,} | {r['ours_ms_per_step']:.3f} | {r['hf_style_ms_per_step']:.1f} "
                f"| {r['ours_ms_per_decode']:.2f} | {r['hf_style_ms_per_decode']:.1f} | {r['speedup']:.0f}x "
                f"| {r['same_ranked_beams']:.0%} |"
            )
        if "ours_us_per_step_at_BW" in d0:
            lines += ["", "Ours, microseconds per step at B*W = "
                      + ", ".join(f"{r['B'] * r['W']} ({r['items']:,} items): {r['ours_us_per_step_at_BW']:.0f}"
                                  for r in report["decode"])]
        lines.append("")
    if report.get("moe"):
        c = report["moe_config"]
        lines += [
            f"## MoE FFN forward + backward (T={c['T']}, E={c['E']}, top-{c['K']}, D={c['D']}, F={c['F']}, {c['dtype']})",
            "",
            "| implementation | layer ms | TFLOP/s | routing ms | routing share | note |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for r in report["moe"]:
            if "error" in r:
                lines.append(f"| {r['name']} | - | - | - | - | not run: {r['error'][:120]} |")
                continue
            routing = f"{r['routing_ms']:.1f} | {r['routing_share']:.0%}" if "routing_ms" in r else "- | -"
            lines.append(f"| {r['name']} | {r['layer_ms']:.1f} | {r['tflops']:.3f} | {routing} | {r['note']} |")
        if c["dense_matmul"]:
            dm = c["dense_matmul"]
            shares = ", ".join(f"{r['name']} {r['share_of_dense']:.0%}" for r in report["moe"] if "share_of_dense" in r)
            lines += ["", f"Dense {c['dtype']} matmul {dm['shape']}: {dm['tflops']:.0f} TFLOP/s. "
                      f"MoE layer throughput as a share of it: {shares}."]
        lines.append("")
    lines += [f"- {note}" for note in report.get("notes", [])]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--catalogues", default=None, help="comma-separated item counts (default 10000,1000000)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--beam", type=int, default=50)
    p.add_argument("--codebook", type=int, default=256)
    p.add_argument("--levels", type=int, default=3, help="code levels before the dedup level")
    p.add_argument("--moe-tokens", type=int, default=None, help="CPU: 1024; GPU: 16384")
    p.add_argument("--moe-dtype", choices=["fp32", "bf16"], default=None, help="CPU: fp32; GPU: bf16")
    p.add_argument("--warmup", type=int, default=None, help="CPU: 1; GPU: 3")
    p.add_argument("--repeats", type=int, default=None, help="CPU: 3; GPU: 20")
    p.add_argument("--baseline-repeats", type=int, default=2, help="repeats of the (slow) hf-style decode")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-moe", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU timings are CPU time)")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.catalogues = [int(n) for n in (args.catalogues or "10000,1000000").split(",")]
    args.moe_tokens = args.moe_tokens or (16384 if gpu else 1024)
    args.moe_dtype = args.moe_dtype or ("bf16" if gpu else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.repeats = args.repeats or (20 if gpu else 3)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    # megatron-core warns once at import that Transformer Engine and Apex are absent: expected here
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    name = accelerator_name(device.type == "cuda")
    report = dict(
        device=name,
        device_slug=device_slug(device, name),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=shlex.join([Path(sys.executable).name, *sys.argv]),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        clock="CUDA events" if device.type == "cuda" else "process CPU time (time.process_time)",
        load_average_at_start=os.getloadavg() if hasattr(os, "getloadavg") else None,
        args=vars(args),
        notes=[
            "Decoding: the same precomputed logits for every method (the model is not timed); "
            "'same beams' = share of requests whose W ranked beams are identical between ours and hf-style.",
            "MoE: ours and megatron run the same experts module (one torch._grouped_mm per projection "
            "where torch supports it, else a loop over experts); deepspeed runs its own E expert copies "
            "on capacity-padded slots.",
            "TFLOP/s counts the useful FLOPs of T*K routed copies (fwd + bwd = 3x fwd) for every implementation.",
        ],
    )
    stem = Path(args.out_dir) / f"kernels_{report['device_slug']}"
    stem.parent.mkdir(parents=True, exist_ok=True)

    def write() -> str:  # after each part, so a long run that is stopped keeps what it measured
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        text = markdown(report)
        stem.with_suffix(".md").write_text(text)
        return text

    if not args.skip_decode:
        with torch.inference_mode():
            report["decode"] = bench_decode(args, device)
        write()
    if not args.skip_moe:
        report["moe"], report["moe_config"] = bench_moe(args, device)
    print(write())
    save_figure(report, stem.with_suffix(".json"))
    return report


if __name__ == "__main__":
    main()
