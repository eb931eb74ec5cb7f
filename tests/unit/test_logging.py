import json
import time

import pytest

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


def _wandb_records(path):
    """Records of a W&B .wandb event file (no reader ships with wandb, so a minimal one).

    Layout: a 7-byte header (":W&B", magic 0xBEE1, version), then LevelDB-log framing in
    32 KiB blocks: chunks of [crc32 u32][length u16][type u8] + payload, type 1 full,
    2 first, 3 middle, 4 last; a block tail shorter than a chunk header is padding. Each
    reassembled payload is a wandb_internal_pb2.Record.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B event file"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # zero padding at the end of a block or file
            continue
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_every_logged_metric_for_a_later_sync(tmp_path, monkeypatch):
    import torch

    from onerec.logging import codebook_scalars, expert_load_scalars

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = {"run": {"out_dir": str(tmp_path)}, "parallel": {"expert_parallel_size": 2}}
    logger = RunLogger(LoggingConfig(wandb="offline", project="onerec-test"), tmp_path, "pretrain", config, rank=0)
    train = {
        "loss": 2.5, "ntp_loss": 2.4, "aux_loss": 1.02, "z_loss": 3.1, "lr": 1e-3,
        "samples_per_s": 100.0, "tokens": 4096, "tokens_per_s": 2.5e4,
        **expert_load_scalars(torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]])),
    }
    logger.log(train, step=10)
    logger.log({"valid/ndcg@10": 0.05, "valid/recall@10": 0.09}, step=10)
    stats = {"per_level": [{"utilization": 0.9, "entropy": 5.5, "perplexity": 45.0}], "collision_rate_before_dedup": 0.01}
    logger.log(codebook_scalars(stats), step=11)
    logger.summary({"best_valid_ndcg@10": 0.05})
    logger.close()

    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    event_files = list(runs[0].glob("run-*.wandb"))
    assert len(event_files) == 1, "offline run has no event file for `wandb sync`"
    # wandb-core writes the file from its own process and can still be flushing after
    # finish() returns: wait (bounded) for the run's closing "exit" record.
    deadline = time.monotonic() + 60
    while not any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(event_files[0])):
        assert time.monotonic() < deadline, "the offline run file never received its exit record"
        time.sleep(0.5)
    history_keys, config_keys = set(), set()
    for record in _wandb_records(event_files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history_keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "run":  # the resolved config travels with the run record
            config_keys |= {item.key for item in record.run.config.update}
        elif kind == "config":
            config_keys |= {item.key for item in record.config.update}
    expected = {f"pretrain/{k}" for k in train} | {
        "pretrain/valid/ndcg@10",
        "pretrain/codebook/level0/utilization",
        "pretrain/codebook/collision_rate",
        "pretrain/moe/load/layer1/expert3",
        "pretrain/moe/load_max/layer0",
    }
    assert expected <= history_keys, sorted(expected - history_keys)
    assert {"run", "parallel"} <= config_keys


def test_metric_helpers_name_expert_load_and_codebook_scalars(tmp_path):
    from onerec.logging import codebook_scalars, expert_load_scalars

    load = expert_load_scalars([[0.5, 0.5, 0.0, 0.0]])
    assert load["moe/load/layer0/expert1"] == 0.5
    assert load["moe/load_max/layer0"] == 2.0  # max share x E: 1.0 would be balanced
    stats = {"per_level": [{"utilization": 1.0, "entropy": 6.0, "perplexity": 64.0}] * 2, "collision_rate_before_dedup": 0.0}
    assert codebook_scalars(stats)["codebook/level1/utilization"] == 1.0
    logger = RunLogger(LoggingConfig(wandb="disabled"), tmp_path, "tokenize", {}, rank=0)
    assert logger.wandb_payload({"codebook/collision_rate": 0.0}) == {"tokenize/codebook/collision_rate": 0.0}
    logger.close()


def test_rate_meter_counts_finished_steps_over_the_window():
    from onerec.logging import RateMeter

    meter = RateMeter(window=2)
    assert meter.update(100, now=0.0) == 0.0
    assert meter.update(100, now=1.0) == 100.0  # one finished step of 100 in 1 s
    assert meter.update(100, now=2.0) == 100.0
    assert meter.update(300, now=2.5) == 200 / 1.5  # the window keeps the last 2 finished steps
    meter.reset()
    assert meter.update(100, now=9.0) == 0.0


class _FakeWandbRun:
    def __init__(self):
        self.logged = []

    def log(self, payload, step=None):
        self.logged.append((payload, step))


def _fake_wandb(monkeypatch):
    """A stand-in `wandb` module recording what log_figures / log_table hand it."""
    import sys
    import types

    fake = types.ModuleType("wandb")
    fake.Image = lambda data: ("image", data.shape, data.dtype.name)
    fake.Table = lambda columns, data: ("table", columns, data)
    monkeypatch.setitem(sys.modules, "wandb", fake)


def test_log_figures_and_tables_go_to_wandb_under_the_stage(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    _fake_wandb(monkeypatch)
    logger = RunLogger(LoggingConfig(wandb="disabled"), tmp_path, "pretrain", {}, rank=0)
    assert not logger.uses_wandb
    run = logger._wandb_run = _FakeWandbRun()  # W&B "on" without starting it
    assert logger.uses_wandb
    figure = Figure(figsize=(2, 1), dpi=50)
    figure.subplots().plot([0, 1], [1, 0])
    logger.log_figures({"expert_load": figure}, step=7)
    logger.log_figures({"codebook_utilization": figure})
    logger.log_table("metrics", ["split", "recall@10"], [["test", 0.5]])
    assert run.logged == [
        ({"pretrain/expert_load": ("image", (50, 100, 3), "uint8")}, 7),  # drawn by Agg as RGB
        ({"pretrain/codebook_utilization": ("image", (50, 100, 3), "uint8")}, None),
        ({"pretrain/metrics": ("table", ["split", "recall@10"], [["test", 0.5]])}, None),
    ]
    with pytest.raises(ValueError, match="2 columns"):
        logger.log_table("metrics", ["split", "recall@10"], [["test"]])
    logger._wandb_run = None
    logger.close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""  # figures and tables stay out of the scalar log


def test_log_figures_and_tables_do_nothing_without_wandb(tmp_path):
    logger = RunLogger(LoggingConfig(wandb="disabled"), tmp_path, "pretrain", {}, rank=0)
    logger.log_figures({"x": object()})  # never drawn: no W&B to send it to
    logger.log_table("metrics", ["a"], [[1]])
    logger.close()
