"""The shared training loop through a real (one-process, gloo) DeepSpeed engine."""

import json
import math
from pathlib import Path

import pytest
import torch

from onerec.checkpoint import CheckpointError, list_checkpoints, resolve_resume, verify_checkpoint
from onerec.config import LoggingConfig, TrainConfig
from onerec.distributed.deepspeed import init_distributed
from onerec.logging import RunLogger
from onerec.train.trainer import Trainer, epoch_batches, warmup_cosine

NUM_EXAMPLES = 96


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_EXAMPLES, 8, generator=g)
    return x, x.sum(-1, keepdim=True)


def _train(stage_dir: Path, resume="none", crash_at=None, max_steps=12):
    dist_info = init_distributed("cpu")
    torch.manual_seed(0)
    model = Toy()
    x, y = _data()
    calls = {"n": 0}

    def step_fn(engine, idx):
        calls["n"] += 1
        if crash_at is not None and calls["n"] == crash_at:
            raise KeyboardInterrupt("simulated crash")
        loss = (engine(x[idx]) - y[idx]).pow(2).mean()
        return loss, {}

    def eval_fn():
        with torch.no_grad():
            return {"ndcg@10": -float((model(x) - y).pow(2).mean())}

    cfg = TrainConfig(
        batch_size=16, max_steps=max_steps, max_epochs=100, lr=1e-2, warmup_steps=2, eval_every=4,
        checkpoint_every=4, log_every=1, resume=resume, patience=0,
    )
    logger = RunLogger(LoggingConfig(), stage_dir, "test", {}, rank=0)
    trainer = Trainer(cfg, model, NUM_EXAMPLES, step_fn, stage_dir, dist_info, logger, {}, seed=3, eval_fn=eval_fn)
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


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    result, full_model = _train(full_dir)
    assert result.steps == 12 and result.best_weights is not None
    with pytest.raises(KeyboardInterrupt):
        _train(cut_dir, crash_at=7)  # dies in step 7; the last checkpoint is step 4
    assert [p.name for p in list_checkpoints(cut_dir / "checkpoints")] == ["step_00000004"]
    resumed, resumed_model = _train(cut_dir, resume="auto")
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
    with pytest.raises(CheckpointError, match="checksum"):
        verify_checkpoint(checkpoints[-1])
    with caplog.at_level("WARNING"):
        chosen = resolve_resume("auto", tmp_path / "checkpoints")
    assert chosen == checkpoints[-2]
    assert "skipping checkpoint" in caplog.text


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
