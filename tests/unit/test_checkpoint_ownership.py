"""Checkpoints and best weights belong to the training run that wrote them: a fresh run moves
another run's aside, retention and `resume=auto` follow write order within one run."""

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from toy_training import NUM_EXAMPLES, Toy

from onerec.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    list_checkpoints,
    resolve_resume,
    set_aside,
    verify_checkpoint,
    weights_manifest_path,
    weights_provenance,
    write_manifest,
)
from onerec.config import LoggingConfig, TrainConfig
from onerec.distributed.deepspeed import init_distributed
from onerec.logging import RunLogger
from onerec.train.trainer import BEST_WEIGHTS, Trainer, TrainState



def _train(stage_dir: Path, resume="none", max_steps=12, keep=2, checkpoint_every=4, nan_metric=False):
    """One run of the shared loop on a toy regression; returns (FitResult, the trainer)."""
    dist_info = init_distributed("cpu")
    torch.manual_seed(0)
    model = Toy()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_EXAMPLES, 8, generator=g)
    y = x.sum(-1, keepdim=True)

    def step_fn(engine, idx):
        return (engine(x[idx]) - y[idx]).pow(2).mean(), {}

    def eval_fn():
        with torch.no_grad():
            return {"ndcg@10": math.nan if nan_metric else -float((model(x) - y).pow(2).mean())}

    cfg = TrainConfig(
        batch_size=16, max_steps=max_steps, max_epochs=100, lr=1e-2, warmup_steps=2, eval_every=4,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep, log_every=1, resume=resume, patience=0,
    )
    logger = RunLogger(LoggingConfig(), stage_dir, "test", {}, rank=0)
    trainer = Trainer(cfg, model, NUM_EXAMPLES, step_fn, stage_dir, dist_info, logger, {}, seed=3, eval_fn=eval_fn)
    try:
        return trainer.fit(), trainer
    finally:
        logger.close()


def _manifest(checkpoint: Path) -> dict:
    return json.loads((checkpoint / MANIFEST_FILE).read_text())


def _names(directory: Path) -> list[str]:
    return [p.name for p in list_checkpoints(directory)]


def test_a_fresh_run_in_a_directory_with_another_runs_checkpoints_moves_them_aside(tmp_path, caplog):
    _, old = _train(tmp_path, max_steps=12)  # leaves step 8 and 12, and best/

    # The copied-run-directory case: a fresh run whose steps are lower than the old run's.
    with caplog.at_level("INFO"):
        result, new = _train(tmp_path, max_steps=8)
    checkpoints = tmp_path / "checkpoints"
    # Its own checkpoints survive (before, retention kept the old run's higher step names).
    assert _names(checkpoints) == ["step_00000004", "step_00000008"]
    old_id, new_id = old.state.run_id, new.state.run_id
    assert re.fullmatch(r"[0-9a-f]{32}", old_id) and re.fullmatch(r"[0-9a-f]{32}", new_id) and new_id != old_id
    manifests = [_manifest(p) for p in list_checkpoints(checkpoints)]
    assert [m["run_id"] for m in manifests] == [new_id, new_id]
    assert manifests[0]["seq"] < manifests[1]["seq"]
    # The old run is kept whole, out of the way, and the log says where.
    aside = tmp_path / f"checkpoints.superseded-{old_id}"
    assert _names(aside) == ["step_00000008", "step_00000012"]
    assert all(_manifest(p)["run_id"] == old_id for p in list_checkpoints(aside))
    for checkpoint in list_checkpoints(aside):
        verify_checkpoint(checkpoint)
    assert weights_provenance(aside / "best" / "model.safetensors")["run_id"] == old_id
    assert f"held 2 checkpoint(s) of another run ({old_id}: step_00000008, step_00000012)" in caplog.text
    assert str(aside) in caplog.text
    # Best weights are the new run's own.
    assert result.best_weights == tmp_path / BEST_WEIGHTS
    assert weights_provenance(result.best_weights)["run_id"] == new_id

    # A later resume continues the new run, not the old one.
    assert resolve_resume("auto", checkpoints) == checkpoints / "step_00000008"
    resumed, again = _train(tmp_path, resume="auto", max_steps=8)
    assert again.state.run_id == new_id and resumed.best_weights == tmp_path / BEST_WEIGHTS


def test_retention_keeps_the_newest_checkpoints_by_write_order_not_the_highest_steps(tmp_path):
    _, first = _train(tmp_path, max_steps=12)
    checkpoints = tmp_path / "checkpoints"
    assert _names(checkpoints) == ["step_00000008", "step_00000012"]
    # Go back to step 8 and end at step 10 this time, keeping one checkpoint: the one kept is
    # the one just written, although step 12 (same run, written earlier) is higher.
    _, resumed = _train(tmp_path, resume=str(checkpoints / "step_00000008"), max_steps=10, keep=1)
    assert _names(checkpoints) == ["step_00000010"]
    assert resolve_resume("auto", checkpoints) == checkpoints / "step_00000010"
    assert resumed.state.run_id == first.state.run_id


def test_auto_resume_continues_only_the_run_that_wrote_last(tmp_path, caplog):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    _, old = _train(here, max_steps=12)  # here: step 8 and 12 of the old run
    _, other = _train(elsewhere, max_steps=4)  # elsewhere: step 4 of another run
    # Continue the other run from its step 4, writing into `here`.
    _, continued = _train(here, resume=str(elsewhere / "checkpoints" / "step_00000004"), max_steps=8)
    checkpoints = here / "checkpoints"
    # The highest step is the old run's; the run that wrote last is the other one.
    with caplog.at_level("WARNING"):
        assert resolve_resume("auto", checkpoints) == checkpoints / "step_00000008"
    assert "not resuming step_00000012: written by an earlier run" in caplog.text
    assert continued.state.run_id == other.state.run_id
    # Its step 8 took the place of the old run's step 8, which was moved aside, not deleted;
    # the old run's step 12 is another run's, so this run's retention leaves it alone.
    assert _names(checkpoints) == ["step_00000008", "step_00000012"]
    assert _manifest(checkpoints / "step_00000008")["run_id"] == other.state.run_id
    assert _manifest(checkpoints / "step_00000012")["run_id"] == old.state.run_id
    assert _names(here / f"checkpoints.superseded-{old.state.run_id}") == ["step_00000008"]


def test_a_fresh_run_never_reports_a_previous_runs_best_weights(tmp_path):
    first, _ = _train(tmp_path, max_steps=8)
    assert first.best_weights == tmp_path / BEST_WEIGHTS
    # A run whose validation metric is never finite never writes best weights of its own.
    result, _ = _train(tmp_path, max_steps=8, nan_metric=True)
    assert result.best_weights is None
    assert not (tmp_path / BEST_WEIGHTS).exists()  # the previous run's, moved aside with its checkpoints
    (aside,) = tmp_path.glob("checkpoints.superseded-*")
    assert (aside / BEST_WEIGHTS).is_file()


def test_checkpoints_from_before_run_ids_resume_under_a_new_id_and_a_fresh_run_sets_them_aside(tmp_path, caplog):
    _, first = _train(tmp_path, max_steps=8)
    checkpoints = tmp_path / "checkpoints"
    for checkpoint in list_checkpoints(checkpoints):  # as an older onerec wrote them
        state = torch.load(checkpoint / STATE_FILE, weights_only=True)
        del state["run_id"]
        torch.save(state, checkpoint / STATE_FILE)
        manifest = _manifest(checkpoint)
        write_manifest(checkpoint / MANIFEST_FILE, checkpoint, list(manifest["files"]),
                       step=manifest["step"], rank_files=0, config={})
    weights_manifest_path(tmp_path / BEST_WEIGHTS).unlink()  # best weights without a manifest
    assert resolve_resume("auto", checkpoints) == checkpoints / "step_00000008"  # by step among them

    with caplog.at_level("INFO"):
        resumed, trainer = _train(tmp_path, resume="auto", max_steps=8)
    assert "the checkpoint predates run ids: continuing it as run" in caplog.text
    assert trainer.state.run_id not in ("", first.state.run_id)
    assert resumed.best_weights == tmp_path / BEST_WEIGHTS  # that run's best weights, still its own

    result, fresh = _train(tmp_path, max_steps=4)
    assert _names(tmp_path / "checkpoints.superseded-unknown") == ["step_00000004", "step_00000008"]
    assert _names(checkpoints) == ["step_00000004"]
    assert _manifest(checkpoints / "step_00000004")["run_id"] == fresh.state.run_id


def test_a_run_id_from_a_manifest_never_becomes_a_path_outside_the_stage(tmp_path):
    checkpoints = tmp_path / "stage" / "checkpoints"
    victim = checkpoints / "step_00000004"
    victim.mkdir(parents=True)
    moved = set_aside(victim, checkpoints, "../../elsewhere")
    assert moved == tmp_path / "stage" / "checkpoints.superseded-unknown" / "step_00000004"
    # The same name set aside twice lands in a second directory instead of replacing the first.
    victim.mkdir()
    assert set_aside(victim, checkpoints, "") == tmp_path / "stage" / "checkpoints.superseded-unknown.2" / victim.name


def test_train_state_carries_the_run_id():
    state = TrainState(step=3, run_id="ab" * 16)
    assert state.to_dict()["run_id"] == "ab" * 16
    assert TrainState.from_dict(state.to_dict()) == state
    assert TrainState.from_dict({"step": 3}).run_id == ""  # a checkpoint from before run ids


@pytest.fixture(autouse=True)
def _quiet_deepspeed():
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
