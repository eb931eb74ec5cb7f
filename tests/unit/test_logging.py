import json

from onerec.config import LoggingConfig
from onerec.logging import RunLogger, write_json_atomic


def test_metrics_jsonl_records_every_log_call_on_rank_zero(tmp_path):
    logger = RunLogger(LoggingConfig(wandb="disabled"), tmp_path, "pretrain", {"run": {}}, rank=0)
    logger.log({"loss": 1.5}, step=1)
    logger.log({"loss": 1.25, "lr": 0.1}, step=2)
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [
        {"stage": "pretrain", "step": 1, "loss": 1.5},
        {"stage": "pretrain", "step": 2, "loss": 1.25, "lr": 0.1},
    ]


def test_other_ranks_write_nothing(tmp_path):
    logger = RunLogger(LoggingConfig(wandb="offline"), tmp_path, "pretrain", {}, rank=1)
    logger.log({"loss": 1.0}, step=1)
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_wandb_offline_run_works_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = {"run": {"out_dir": str(tmp_path)}, "train": {"lr": 0.1}}
    logger = RunLogger(LoggingConfig(wandb="offline", project="onerec-test"), tmp_path, "pretrain", config, rank=0)
    logger.log({"loss": 2.0}, step=1)
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    assert any(runs[0].glob("*.wandb")), "offline run has no event file to `wandb sync` later"


def test_write_json_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "m.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"b": 2})
    assert json.loads(path.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
