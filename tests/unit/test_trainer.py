"""The shared training loop through a real (one-process, gloo) DeepSpeed engine."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from toy_training import NUM_EXAMPLES, Toy

from onerec.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_rank_state,
    read_rank_states,
    resolve_resume,
    verify_checkpoint,
    write_manifest,
)
from onerec.config import ConfigError, LoggingConfig, TrainConfig
from onerec.distributed.deepspeed import init_distributed
from onerec.logging import RunLogger
from onerec.train.trainer import (
    NonFiniteLossError,
    Trainer,
    TrainState,
    config_changes,
    epoch_batches,
    resume_rng_seed,
    warmup_cosine,
)



def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_EXAMPLES, 8, generator=g)
    return x, x.sum(-1, keepdim=True)


def _train(stage_dir: Path, resume="none", crash_at=None, max_steps=12, poison=None, max_nonfinite_steps=20,
           seen=None, zero_stage=0, after_step=None, trainers=None, config=None):
    """`poison(call)` -> None | "loss" (a NaN loss) | "grad" (a finite loss with NaN gradients);
    `seen` collects a copy of the weights at each call."""
    dist_info = init_distributed("cpu")
    torch.manual_seed(0)
    model = Toy()
    x, y = _data()
    calls = {"n": 0}

    def step_fn(engine, idx):
        calls["n"] += 1
        if crash_at is not None and calls["n"] == crash_at:
            raise KeyboardInterrupt("simulated crash")
        if seen is not None:
            seen.append([p.detach().clone() for p in model.parameters()])
        loss = (engine(x[idx]) - y[idx]).pow(2).mean()
        kind = poison(calls["n"]) if poison else None
        if kind == "loss":
            loss = loss * float("nan")
        elif kind == "grad":
            # torch.where's unselected branch: the value stays finite, its gradient is 0 * NaN = NaN
            w = model.net[0].weight
            loss = loss + torch.where(torch.tensor(False), torch.sqrt(-w.abs() - 1).sum(), torch.tensor(0.0))
        return loss, {}

    def eval_fn():
        with torch.no_grad():
            return {"ndcg@10": -float((model(x) - y).pow(2).mean())}

    cfg = TrainConfig(
        batch_size=16, max_steps=max_steps, max_epochs=100, lr=1e-2, warmup_steps=2, eval_every=4,
        checkpoint_every=4, log_every=1, resume=resume, patience=0, max_nonfinite_steps=max_nonfinite_steps,
        zero_stage=zero_stage,
    )
    logger = RunLogger(LoggingConfig(), stage_dir, "test", {}, rank=0)
    trainer = Trainer(cfg, model, NUM_EXAMPLES, step_fn, stage_dir, dist_info, logger, config or {}, seed=3, eval_fn=eval_fn,
                      after_step=after_step)
    if trainers is not None:
        trainers.append(trainer)
    try:
        return trainer.fit(), model
    finally:
        logger.close()


def _losses(stage_dir: Path) -> dict[int, float]:
    out = {}
    for line in (stage_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]  # a resumed run overwrites the replayed steps
    return out


# ZeRO 1/2 keep a flat fp32 master copy of the weights inside the optimizer: a resume that
# loaded the weights without refreshing it would step from the initial weights again.
@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_resume_reproduces_the_uninterrupted_losses(tmp_path, zero_stage):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    result, full_model = _train(full_dir, zero_stage=zero_stage)
    assert result.steps == 12 and result.best_weights is not None
    with pytest.raises(KeyboardInterrupt):
        _train(cut_dir, crash_at=7, zero_stage=zero_stage)  # dies in step 7; the last checkpoint is step 4
    (checkpoint,) = list_checkpoints(cut_dir / "checkpoints")
    assert checkpoint.name == "step_00000004"
    # ZeRO partitions the optimizer state: each rank keeps its own file (one rank here).
    assert (checkpoint / "optimizer_rank00000.pt").is_file() == (zero_stage > 0)
    resumed, resumed_model = _train(cut_dir, resume="auto", zero_stage=zero_stage)
    assert resumed.steps == 12
    full, cut = _losses(full_dir), _losses(cut_dir)
    assert sorted(full) == sorted(cut) == list(range(1, 13))
    for step in range(1, 13):
        assert cut[step] == pytest.approx(full[step], rel=0, abs=1e-7), step
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_truncated_checkpoint_is_detected_and_the_previous_one_used(tmp_path, caplog):
    _train(tmp_path)
    checkpoints = list_checkpoints(tmp_path / "checkpoints")
    assert len(checkpoints) == 2  # keep_checkpoints default
    latest = checkpoints[-1] / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated") as err:
        verify_checkpoint(checkpoints[-1])
    assert str(latest) in str(err.value)  # the message names the damaged file
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        load_checkpoint(checkpoints[-1], Toy())
    with caplog.at_level("WARNING"):
        chosen = resolve_resume("auto", tmp_path / "checkpoints")
    assert chosen == checkpoints[-2]
    assert "skipping checkpoint" in caplog.text and str(latest) in caplog.text
    # A real resume picks the previous checkpoint, replays from there and ends at the same place.
    with caplog.at_level("INFO"):
        resumed, _ = _train(tmp_path, resume="auto")
    assert resumed.steps == 12
    assert f"resumed from {checkpoints[-2]} at step 8" in caplog.text
    verify_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])  # rewritten whole


def test_optimizer_state_is_saved_by_parameter_name_whole(tmp_path):
    _, model = _train(tmp_path, max_steps=4, zero_stage=1)
    (checkpoint,) = list_checkpoints(tmp_path / "checkpoints")
    (rank_state,) = read_rank_states(checkpoint)
    saved = rank_state["optimizer"]
    assert saved["format"] == "onerec.optimizer_fragments.v1"
    names = dict(model.named_parameters())
    assert sorted(saved["params"]) == sorted(names)
    for name, entry in saved["params"].items():
        # One rank holds every element: one fragment per parameter, the whole of it.
        (fragment,) = entry["fragments"]
        assert entry["shape"] == list(names[name].shape)
        assert (fragment["start"], fragment["numel"]) == (0, names[name].numel())
        assert fragment["state"]["exp_avg"].shape == fragment["state"]["exp_avg_sq"].shape == (names[name].numel(),)
        assert float(fragment["state"]["step"]) == 4
    state = load_checkpoint(checkpoint, Toy())
    assert (state["world_size"], state["global_batch_size"]) == (1, 16)


@pytest.mark.parametrize("saved_stage, resumed_stage", [(2, 0), (0, 1)])
def test_a_checkpoint_resumes_under_another_zero_stage(tmp_path, saved_stage, resumed_stage):
    """The optimizer layout changes (flat ZeRO partitions <-> per-parameter state) while the
    saved values do not: the continued run matches the uninterrupted one within float rounding
    (the ZeRO optimizer clips by a norm summed in another order)."""
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    _, full_model = _train(full_dir, zero_stage=saved_stage)
    with pytest.raises(KeyboardInterrupt):
        _train(cut_dir, crash_at=7, zero_stage=saved_stage)
    _, resumed_model = _train(cut_dir, resume="auto", zero_stage=resumed_stage)
    full, cut = _losses(full_dir), _losses(cut_dir)
    assert sorted(cut) == list(range(1, 13))
    for step in range(1, 13):
        assert cut[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_the_older_per_rank_format_still_resumes_exactly(tmp_path):
    """Per-rank files written before the optimizer was saved by name hold torch's state_dict of
    their rank: they still resume on the same number of ranks, and say so on another."""
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    _train(full_dir, zero_stage=1)
    trainers, legacy = [], {}

    def keep_torch_state(step):  # what an older onerec wrote at step 4
        if step == 4:
            legacy["optimizer"] = copy.deepcopy(trainers[0].optimizer.state_dict())

    with pytest.raises(KeyboardInterrupt):
        _train(cut_dir, crash_at=7, zero_stage=1, after_step=keep_torch_state, trainers=trainers)
    (checkpoint,) = list_checkpoints(cut_dir / "checkpoints")
    torch.save(legacy, checkpoint / "optimizer_rank00000.pt")
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    write_manifest(checkpoint / "manifest.json", checkpoint, manifest["files"],
                   **{k: v for k, v in manifest.items() if k not in ("files", "sizes")})
    verify_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match=r"sharded over 1 ranks in the per-rank format of an older onerec.* "
                                              r"this job has 2; resume with 1 processes"):
        load_rank_state(checkpoint, rank=0, world_size=2)
    _train(cut_dir, resume="auto", zero_stage=1)
    full, cut = _losses(full_dir), _losses(cut_dir)
    assert all(cut[step] == full[step] for step in range(1, 13))


def test_ranks_seed_their_rng_from_seed_rank_and_step_on_another_world_size():
    seeds = {resume_rng_seed(3, rank, 40) for rank in range(8)}
    assert len(seeds) == 8  # every rank draws its own dropout masks
    assert resume_rng_seed(3, 1, 40) == resume_rng_seed(3, 1, 40)  # a second resume draws the same
    assert resume_rng_seed(3, 1, 40) not in (resume_rng_seed(4, 1, 40), resume_rng_seed(3, 1, 41))
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_truncated_train_state_is_named_and_an_explicit_resume_refuses_it(tmp_path):
    _train(tmp_path, max_steps=4)
    (checkpoint,) = list_checkpoints(tmp_path / "checkpoints")
    state = checkpoint / "train_state.pt"
    state.write_bytes(state.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"{state}: truncated"):
        _train(tmp_path / "other", resume=str(checkpoint))
    assert resolve_resume("auto", tmp_path / "checkpoints") is None  # nothing valid left: start afresh


def _logged(stage_dir: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def test_nonfinite_loss_and_gradient_steps_are_skipped_counted_and_logged(tmp_path, caplog):
    seen = []
    kinds = {3: "loss", 6: "grad"}
    with caplog.at_level("WARNING"):
        result, model = _train(tmp_path, poison=kinds.get, seen=seen)
    assert result.steps == 12  # the run goes on, the poisoned batches are consumed
    for call in kinds:  # the weights after the poisoned step are the weights before it: no update
        for before, after in zip(seen[call - 1], seen[call]):
            torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert not torch.equal(seen[0][0], seen[1][0])  # ...while healthy steps do update them
    assert "step 3: non-finite loss (nan), update skipped (1 in a row, 1 in this run)" in caplog.text
    assert "step 6: non-finite gradient" in caplog.text
    assert _logged(tmp_path, "nonfinite_steps") == {s: (s >= 3) + (s >= 6) for s in range(1, 13)}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for checkpoint in list_checkpoints(tmp_path / "checkpoints"):
        verify_checkpoint(checkpoint)


def test_too_many_nonfinite_steps_in_a_row_stop_the_run_before_any_checkpoint_of_them(tmp_path):
    # Steps 2 and 3 are tolerated (max 2 in a row), 5-7 are one too many: the run stops in
    # step 7, after the healthy step-4 checkpoint and before a step-8 one could be written.
    bad = {2, 3, 5, 6, 7}
    with pytest.raises(NonFiniteLossError, match=r"3 steps in a row \(steps 5-7\).*max_nonfinite_steps=2"):
        _train(tmp_path, poison=lambda call: "loss" if call in bad else None, max_nonfinite_steps=2)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000004"]
    state = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[0], Toy())
    assert (state["nonfinite_in_a_row"], state["nonfinite_total"]) == (0, 2)
    with pytest.raises(NonFiniteLossError, match="steps 1-1"):  # 0: the first one stops the run
        _train(tmp_path / "strict", poison=lambda call: "loss", max_nonfinite_steps=0)
    with pytest.raises(ConfigError, match="max_nonfinite_steps"):
        TrainConfig(max_nonfinite_steps=-1)


def test_epoch_batches_cover_every_example_once_and_shard_by_rank():
    single = torch.cat(epoch_batches(50, 8, seed=1, epoch=2, rank=0, world_size=1))
    assert sorted(single.tolist()) == list(range(50))
    shards = [torch.cat(epoch_batches(50, 8, seed=1, epoch=2, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(torch.cat(shards).tolist()) == list(range(50))
    assert set(shards[0].tolist()).isdisjoint(shards[1].tolist())
    assert not torch.equal(single, torch.cat(epoch_batches(50, 8, seed=1, epoch=3, rank=0, world_size=1)))


def test_warmup_cosine_schedule_shape():
    f = warmup_cosine(total_steps=100, warmup_steps=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.1)


def test_train_state_round_trips_and_reads_checkpoints_written_before_a_counter_existed():
    state = TrainState(step=7, best_metric=0.25, best_step=4, evals_without_improvement=1,
                       nonfinite_in_a_row=2, nonfinite_total=3)
    assert TrainState.from_dict(state.to_dict()) == state
    older = {k: v for k, v in state.to_dict().items() if not k.startswith("nonfinite")}
    assert TrainState.from_dict(older) == TrainState(step=7, best_metric=0.25, best_step=4, evals_without_improvement=1)


def test_after_step_sees_every_finished_step_and_a_resume_restores_the_whole_train_state(tmp_path):
    steps, trainers = [], []
    _train(tmp_path, max_steps=8, after_step=steps.append, trainers=trainers)
    assert steps == list(range(1, 9))  # called once per step, after its checkpoint (4, 8)
    finished = trainers[0].state
    assert finished.step == 8 and finished.best_step in (4, 8)

    resumed_steps = []
    _train(tmp_path, resume=str(tmp_path / "checkpoints" / "step_00000004"), max_steps=8,
           after_step=resumed_steps.append, trainers=trainers)
    assert resumed_steps == [5, 6, 7, 8]  # the resumed run starts after the checkpoint's step
    assert trainers[1].state == finished  # same counters, best metric and best step at the end


def test_an_automatic_resume_continues_only_a_run_made_with_the_same_settings(tmp_path):
    """Every launcher passes train.resume=auto: a checkpoint trained with another learning
    rate is not continued (a fresh run starts and sets it aside); one that differs only in
    where and how often things are written is."""
    settings = {"train": {"lr": 0.01, "log_every": 1}, "model": {"d_model": 8, "moe": {"num_experts": 4}}}
    full_dir = tmp_path / "full"
    _train(full_dir, config=settings)
    for name, changed, resumes in [
        ("lr", {**settings, "train": {"lr": 0.02, "log_every": 1}}, False),
        ("experts", {**settings, "model": {"d_model": 8, "moe": {"num_experts": 8}}}, False),
        ("log_every", {**settings, "train": {"lr": 0.01, "log_every": 5}}, True),
    ]:
        cut_dir = tmp_path / name
        with pytest.raises(KeyboardInterrupt):
            _train(cut_dir, crash_at=7, config=settings)
        _train(cut_dir, resume="auto", config=changed)
        set_aside = list(cut_dir.glob("checkpoints.superseded-*"))
        assert bool(set_aside) is not resumes, name
        if resumes:
            assert _losses(cut_dir) == _losses(full_dir)
    assert config_changes({"train": {"lr": 0.01}, "logging": {"wandb": "offline"}},
                          {"train": {"lr": 0.01}, "logging": {"wandb": "disabled"}}) == []
    assert config_changes({"data": {"text_fields": ["title"]}}, {"data": {"text_fields": ("title",)}}) == []
    assert config_changes({"tokenizer": {"levels": 3}}, {"tokenizer": {"levels": 4}}) == ["tokenizer.levels"]
    # A baseline section added after the checkpoint, switched off, is no change; switched on, it is.
    off, on = {"enabled": False, "d_model": 64}, {"enabled": True, "d_model": 64}
    assert config_changes({"train": {"lr": 0.01}}, {"train": {"lr": 0.01}, "hstu": off}) == []
    assert config_changes({"hstu": {**off, "d_model": 32}}, {"hstu": off}) == []
    assert config_changes({"train": {"lr": 0.01}}, {"train": {"lr": 0.01}, "hstu": on}) == ["hstu.d_model", "hstu.enabled"]
