"""A checkpoint written by N ranks resumes on M ranks (real gloo processes through DeepSpeed,
CPU accelerator).

Three launches of this file as a worker script:

    A  2 ranks  ZeRO-2, ep=2, trained uninterrupted for 9 steps (3 epochs of 3 global batches of
                16), checkpoints at steps 4, 8, 9: the reference, and the checkpoint to resume;
                the same under ZeRO 0 (rank 0 saves the dense state, each rank its experts')
    B  1 rank   A's step-4 checkpoints resumed on one rank (ZeRO-2 / ZeRO 0, ep=1: ep must divide
                the ranks), with train.batch_size=8 as the same command would pass; and a 1-rank
                ZeRO-1 run trained uninterrupted (the reference of C's second job)
    C  2 ranks  A's step-4 checkpoint resumed on 2 ranks (the same layout), and B's 1-rank ZeRO-1
                step-4 checkpoint resumed on 2 ranks with ep=2 (train.batch_size=16, which on 2
                ranks would be 32 per step)

What is compared, step by step over the continued steps 5..9:
- the data: the examples of each step over all ranks, in rank order, are the uninterrupted
  run's global batch, and every epoch takes each example once (the data-position rule);
- the global loss: sum over ranks of (rank loss x rank examples) / examples, since the
  continuing job splits each global batch differently from the reference; the LR;
- the weights after the last step;
- the optimizer state right after the restore, assembled from the resumed ranks, against the
  one assembled from the checkpoint's files: equal bit for bit (resharding copies, never
  computes).

Tolerance. On the same number of ranks (A -> C) everything is bit for bit. On another number
the weights, optimizer state, LR and batches are identical at the resume, but the gradient is
now the mean of one (or two) per-rank gradients reduced in another order, through another
ZeRO partitioning and another expert layout: float rounding, a few 1e-7 relative on the first
continued step, which Adam's normalised updates carry along. Dropout is off and the loss is a
mean over examples (cross-entropy over every example's 6 target codes plus the router z-loss,
the same per example; the MoE balance loss, computed over a rank's own tokens, is left out),
so nothing else differs. The losses must then agree to 1e-5 relative and the weights to 1e-4.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

NUM_EXAMPLES = 40  # global batches of 16: 16, 16, 8 per epoch
GLOBAL_BATCH = 16
EPOCHS = 3
STEPS = 9
RESUME_AT = 4  # mid-epoch (epoch 1's second batch); the continued steps cross into epoch 2
STEPS_PER_EPOCH = 3


def _checkpoint(work: Path, job: str, step: int) -> Path:
    return work / job / "checkpoints" / f"step_{step:08d}"


# ------------------------------------------------------------------------------ worker side
def _job(work: Path, name: str, *, zero_stage: int, ep: int, batch_size: int, resume: str) -> dict:
    """Train (or resume) the tiny MoE model with the real Trainer; what each step saw."""
    from onerec.config import LoggingConfig, ModelConfig, MoEConfig, TrainConfig
    from onerec.distributed.deepspeed import init_distributed
    from onerec.distributed.expert_parallel import apply_expert_parallel
    from onerec.distributed.optimizer_state import optimizer_fragments
    from onerec.logging import RunLogger
    from onerec.model.onerec import OneRecModel
    from onerec.train.trainer import Trainer

    info = init_distributed("cpu")
    codebook_sizes, history_len, session_len = [16, 16, 4], 6, 2
    data = torch.Generator().manual_seed(1234)
    history = torch.stack([torch.randint(0, c, (NUM_EXAMPLES, history_len), generator=data) for c in codebook_sizes], -1)
    history[:, :2] = -1  # some left padding, as real histories have
    target = torch.stack([torch.randint(0, c, (NUM_EXAMPLES, session_len), generator=data) for c in codebook_sizes], -1)

    torch.manual_seed(0)  # every rank builds all experts from the seed, then keeps its slice
    model = OneRecModel(
        ModelConfig(d_model=32, num_heads=2, encoder_layers=1, decoder_layers=2, d_ff=48, dropout=0.0,
                    moe=MoEConfig(num_experts=4, top_k=2)),
        codebook_sizes, history_len, session_len,
    )
    apply_expert_parallel(model, ep)
    steps: dict[int, dict] = {}
    holder: list[Trainer] = []

    def step_fn(engine, indices):
        output = engine(history[indices], target[indices])
        logits = output.logits_BMLC
        ntp = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target[indices].reshape(-1))
        loss = ntp + 0.001 * output.z_loss
        steps[holder[0].state.step + 1] = {"indices": indices.clone(), "loss": loss.item()}
        return loss, {}

    def after_step(step):
        steps[step]["lr"] = holder[0].scheduler.get_last_lr()[0]

    cfg = TrainConfig(
        batch_size=batch_size, max_epochs=EPOCHS, max_steps=0, lr=3e-3, warmup_steps=2, grad_clip=1.0,
        eval_every=1000, checkpoint_every=RESUME_AT, keep_checkpoints=3, log_every=1, resume=resume,
        patience=0, zero_stage=zero_stage,
    )
    stage_dir = work / name
    logger = RunLogger(LoggingConfig(), stage_dir, "resume", {}, rank=info.rank)
    trainer = Trainer(cfg, model, NUM_EXAMPLES, step_fn, stage_dir, info, logger, {}, seed=7, after_step=after_step)
    holder.append(trainer)
    restored = None
    if resume != "none":
        trainer._restore(Path(resume))  # fit() restores again; this rank's state as loaded, to compare
        restored = optimizer_fragments(model, trainer.optimizer, trainer.zero_optimizer)
        restored = {"format": restored["format"], "params": {
            name: {"shape": entry["shape"], "fragments": [
                {**fragment, "state": {k: v.clone() for k, v in fragment["state"].items()}}
                for fragment in entry["fragments"]]}
            for name, entry in restored["params"].items()}}
    try:
        result = trainer.fit()
    finally:
        logger.close()
    return {"steps": steps, "result_steps": result.steps, "restored": restored,
            "global_batch": trainer.sampler.global_batch, "total_steps": trainer.total_steps}


def _worker(out_dir: Path) -> None:
    torch.set_num_threads(1)
    work, launch = Path(os.environ["RESUME_WORK"]), os.environ["RESUME_LAUNCH"]
    rank = int(os.environ["RANK"])
    results = {}
    if launch == "A":
        results["zero2_ep2"] = _job(work, "zero2_ep2", zero_stage=2, ep=2, batch_size=8, resume="none")
        results["zero0_ep2"] = _job(work, "zero0_ep2", zero_stage=0, ep=2, batch_size=8, resume="none")
    elif launch == "B":
        results["zero2_on1"] = _job(work, "zero2_on1", zero_stage=2, ep=1, batch_size=8,
                                    resume=str(_checkpoint(work, "zero2_ep2", RESUME_AT)))
        results["zero0_on1"] = _job(work, "zero0_on1", zero_stage=0, ep=1, batch_size=8,
                                    resume=str(_checkpoint(work, "zero0_ep2", RESUME_AT)))
        results["zero1_1rank"] = _job(work, "zero1_1rank", zero_stage=1, ep=1, batch_size=16, resume="none")
    else:
        results["zero2_on2"] = _job(work, "zero2_on2", zero_stage=2, ep=2, batch_size=8,
                                    resume=str(_checkpoint(work, "zero2_ep2", RESUME_AT)))
        results["zero1_on2"] = _job(work, "zero1_on2", zero_stage=1, ep=2, batch_size=16,
                                    resume=str(_checkpoint(work, "zero1_1rank", RESUME_AT)))
    torch.save(results, out_dir / f"rank{rank}.pt")


# ------------------------------------------------------------------------------ test side
def _launch(tmp: Path, work: Path, launch: str, world: int) -> list[dict]:
    from distributed_helpers import free_port, run_ranks  # the test side only, not the workers

    out_dir = tmp / f"launch_{launch}"
    out_dir.mkdir()
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "TRITON_INTERPRET": "1",
        "OMP_NUM_THREADS": "1",
        "ONEREC_NO_PROGRESS": "1",
        "WANDB_MODE": "disabled",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "RESUME_WORK": str(work),
        "RESUME_LAUNCH": launch,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    # Seconds on idle cores; the generous limit only catches a hang (a collective mismatch).
    return run_ranks(Path(__file__), out_dir, world, env, timeout=600, what=f"resume launch {launch}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume_world_size")
    work = tmp / "work"
    launches = {"A": _launch(tmp, work, "A", 2), "B": _launch(tmp, work, "B", 1)}
    launches["C"] = _launch(tmp, work, "C", 2)
    jobs = {}
    for ranks in launches.values():
        for name in ranks[0]:
            jobs[name] = [rank_results[name] for rank_results in ranks]
    return work, jobs


def _global_steps(job: list[dict]) -> dict[int, dict]:
    """Per step: the examples over all ranks in rank order, the example-weighted mean loss, the LR."""
    out = {}
    for step in job[0]["steps"]:
        per_rank = [rank["steps"][step] for rank in job]
        counts = [len(s["indices"]) for s in per_rank]
        out[step] = {
            "indices": torch.cat([s["indices"] for s in per_rank]),
            "loss": sum(s["loss"] * n for s, n in zip(per_rank, counts)) / sum(counts),
            "lr": per_rank[0]["lr"],
        }
    return out


def _full_state(sources: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    """Whole per-parameter optimizer state from fragments (each element must come exactly once)."""
    full: dict[str, dict[str, torch.Tensor]] = {}
    filled: dict[str, torch.Tensor] = {}
    for source in sources:
        for name, entry in source["params"].items():
            numel = int(torch.Size(entry["shape"]).numel())
            seen = filled.setdefault(name, torch.zeros(numel, dtype=torch.int32))
            for fragment in entry["fragments"]:
                span = slice(fragment["start"], fragment["start"] + fragment["numel"])
                seen[span] += 1
                for key, value in fragment["state"].items():
                    if value.dim() == 0:
                        full.setdefault(name, {})[key] = value.clone()
                    else:
                        full.setdefault(name, {}).setdefault(key, torch.zeros(numel, dtype=value.dtype))[span] = value
    for name, seen in filled.items():
        assert bool((seen == 1).all()), f"{name}: fragments do not tile the parameter exactly once"
    return full


def _saved_state(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    from onerec.checkpoint import read_rank_states

    return _full_state([rank_state["optimizer"] for rank_state in read_rank_states(checkpoint)])


def _final_weights(work: Path, job: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(_checkpoint(work, job, STEPS) / "model.safetensors")


def _check_continuation(work, jobs, reference: str, resumed: str, exact: bool):
    ref, got = _global_steps(jobs[reference]), _global_steps(jobs[resumed])
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert sorted(got) == list(range(RESUME_AT + 1, STEPS + 1))  # no step repeated, none skipped
    assert all(rank["global_batch"] == GLOBAL_BATCH and rank["total_steps"] == STEPS for rank in jobs[resumed])
    for step, expected in got.items():
        # The data position: step s is the reference's global batch s, whatever the ranks.
        assert torch.equal(expected["indices"], ref[step]["indices"]), step
        assert expected["lr"] == ref[step]["lr"], step  # the schedule is a function of the step
        if exact:
            assert expected["loss"] == ref[step]["loss"], step
        else:
            assert expected["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step
    # Within each epoch every example exactly once, across the resume.
    taken = {s: ref[s]["indices"] for s in range(1, RESUME_AT + 1)} | {s: got[s]["indices"] for s in got}
    for epoch in range(EPOCHS):
        epoch_steps = range(epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH + 1)
        assert sorted(torch.cat([taken[s] for s in epoch_steps]).tolist()) == list(range(NUM_EXAMPLES))
    expected_weights, got_weights = _final_weights(work, reference), _final_weights(work, resumed)
    assert expected_weights.keys() == got_weights.keys()
    for name, value in expected_weights.items():
        tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-4, "atol": 1e-6}
        torch.testing.assert_close(got_weights[name], value, **tolerance, msg=lambda m: f"{name}: {m}")
    # The optimizer state as loaded on the new ranks is the saved one, bit for bit.
    checkpoint = _checkpoint(work, reference, RESUME_AT)
    saved, restored = _saved_state(checkpoint), _full_state([rank["restored"] for rank in jobs[resumed]])
    assert saved.keys() == restored.keys() and saved
    for name in saved:
        assert saved[name].keys() == restored[name].keys() == {"step", "exp_avg", "exp_avg_sq"}, name
        for key in saved[name]:
            assert torch.equal(restored[name][key], saved[name][key]), (name, key)
    return ref, got


def test_two_rank_zero2_ep2_checkpoint_resumes_on_two_ranks_bit_for_bit(runs):
    work, jobs = runs
    _check_continuation(work, jobs, "zero2_ep2", "zero2_on2", exact=True)
    # Each rank saved its own ZeRO-2 partition and experts.
    names = sorted(p.name for p in _checkpoint(work, "zero2_ep2", RESUME_AT).glob("optimizer_rank*.pt"))
    assert names == ["optimizer_rank00000.pt", "optimizer_rank00001.pt"]


def test_two_rank_zero2_ep2_checkpoint_resumes_on_one_rank(runs):
    work, jobs = runs
    ref, got = _check_continuation(work, jobs, "zero2_ep2", "zero2_on1", exact=False)
    assert len(jobs["zero2_on1"]) == 1 and all(len(s["indices"]) in (16, 8) for s in got.values())
    # The one rank wrote a checkpoint of its own (ZeRO-2: one optimizer file) that resumes as usual.
    assert sorted(p.name for p in _checkpoint(work, "zero2_on1", STEPS).glob("optimizer_rank*.pt")) == [
        "optimizer_rank00000.pt"
    ]


def test_two_rank_zero0_ep2_checkpoint_resumes_on_one_rank(runs):
    work, jobs = runs
    _check_continuation(work, jobs, "zero0_ep2", "zero0_on1", exact=False)


def test_one_rank_zero1_checkpoint_resumes_on_two_ranks_with_sharded_experts(runs):
    work, jobs = runs
    _check_continuation(work, jobs, "zero1_1rank", "zero1_on2", exact=False)
    assert all(len(rank["steps"][RESUME_AT + 1]["indices"]) == GLOBAL_BATCH // 2 for rank in jobs["zero1_on2"])


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
