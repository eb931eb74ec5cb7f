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
    assert run.logged == [  # the step goes in as <stage>/step, W&B's own step is left to W&B
        ({"pretrain/expert_load": ("image", (50, 100, 3), "uint8"), "pretrain/step": 7}, None),  # drawn by Agg as RGB
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


# ---------------------------------------------------------------- W&B runs across stages


def _offline_env(monkeypatch):
    # conftest sets WANDB_MODE=disabled: logging.wandb=offline must win over it.
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_RUN_GROUP", "WANDB_JOB_TYPE"):
        monkeypatch.delenv(name, raising=False)


def _finished_records(run_dir, wandb_id):
    """Every record of the offline runs of `wandb_id` under run_dir/wandb, once each is complete."""
    dirs = sorted((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}*"))
    assert dirs, sorted(p.name for p in (run_dir / "wandb").iterdir())
    records = []
    for directory in dirs:
        (event_file,) = directory.glob("run-*.wandb")
        deadline = time.monotonic() + 60  # wandb-core may still be flushing after finish()
        while not any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(event_file)):
            assert time.monotonic() < deadline, f"{event_file} never received its exit record"
            time.sleep(0.2)
        records += list(_wandb_records(event_file))
    return records


def test_wandb_settings_explicit_config_then_environment_then_default():
    from onerec.errors import ConfigError
    from onerec.logging import resolve_wandb

    env = {"WANDB_MODE": "offline", "WANDB_PROJECT": "from-env", "WANDB_ENTITY": "team"}
    assert resolve_wandb(LoggingConfig(), {}) == ("disabled", "onerec", None)
    assert resolve_wandb(LoggingConfig(), env) == ("offline", "from-env", "team")
    explicit = LoggingConfig(wandb="online", project="mine", entity="me")
    assert resolve_wandb(explicit, env) == ("online", "mine", "me")
    assert resolve_wandb(LoggingConfig(wandb="disabled"), env)[0] == "disabled"
    assert resolve_wandb(LoggingConfig(), {"WANDB_MODE": "dryrun"})[0] == "offline"  # W&B's alias
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes'"):
        resolve_wandb(LoggingConfig(), {"WANDB_MODE": "sometimes"})


def test_git_info_is_empty_outside_a_checkout_or_without_git(tmp_path, monkeypatch):
    from onerec.logging import code_version, git_info

    assert code_version()["version"]
    package = tmp_path / "onerec"
    package.mkdir()
    assert git_info(package) == {}  # not a git checkout: no commit, no failure
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable at all
    assert git_info() == {}


def test_stages_of_one_run_directory_are_wandb_runs_of_one_group(tmp_path, monkeypatch):
    from onerec.logging import code_version, read_wandb_state
    from onerec.run_dir import open_run_dir

    _offline_env(monkeypatch)
    run_dir = tmp_path / "my-run"
    run_id = open_run_dir(str(run_dir))
    cfg = LoggingConfig(wandb="offline", project="onerec-test")
    opened = {}
    for stage in ("tokenize", "pretrain"):
        logger = RunLogger(cfg, run_dir, stage, {"run": {"out_dir": str(run_dir)}}, rank=0)
        run = logger._wandb_run
        opened[stage] = run.id
        assert (run.group, run.job_type, run.name) == (run_id, stage, f"my-run/{stage}")
        meta = run.config["onerec"]
        assert meta["run_id"] == run_id and meta["stage"] == stage
        assert meta.get("git_commit") == code_version().get("git_commit")  # attached when a checkout
        logger.log({"loss": 1.0}, step=1)
        logger.close()
        assert read_wandb_state(run_dir, stage)["wandb_id"] == run.id
    assert opened["tokenize"] != opened["pretrain"]
    for stage, wandb_id in opened.items():  # what `wandb sync` would upload says the same
        (run_record,) = [r.run for r in _finished_records(run_dir, wandb_id) if r.WhichOneof("record_type") == "run"]
        assert (run_record.run_id, run_record.run_group, run_record.job_type) == (wandb_id, run_id, stage)


def test_a_restarted_stage_resumes_its_wandb_run_and_a_fresh_training_run_opens_a_new_one(tmp_path, monkeypatch):
    from onerec.logging import read_wandb_state

    _offline_env(monkeypatch)
    cfg = LoggingConfig(wandb="offline", project="onerec-test")
    first_training, second_training = "a" * 32, "b" * 32

    logger = RunLogger(cfg, tmp_path, "pretrain", {}, rank=0)
    first = logger.wandb_id
    logger.set_training_run(first_training)  # a W&B run of no training run yet: adopted, not reopened
    assert logger.wandb_id == first
    logger.log({"loss": 2.0}, step=5)
    logger.close()
    assert read_wandb_state(tmp_path, "pretrain")["training_run_id"] == first_training

    restarted = RunLogger(cfg, tmp_path, "pretrain", {}, rank=0)  # requeued: same stage again
    assert restarted.wandb_id == first
    restarted.set_training_run(first_training)  # the trainer resumed its checkpoint
    assert restarted.wandb_id == first
    restarted.set_training_run(second_training)  # no checkpoint: training started from scratch
    second = restarted.wandb_id
    assert second not in (None, first)
    restarted.log({"loss": 1.0}, step=1)
    restarted.close()
    state = read_wandb_state(tmp_path, "pretrain")
    assert (state["wandb_id"], state["training_run_id"]) == (second, second_training)

    # A caller that knows the training run up front opens its W&B run directly.
    again = RunLogger(cfg, tmp_path, "pretrain", {}, rank=0, training_run_id=second_training)
    assert again.wandb_id == second
    again.close()
    resumed = _finished_records(tmp_path, first)
    assert [r.run.run_id for r in resumed if r.WhichOneof("record_type") == "run"] == [first, first]
    steps = [item.value_json for r in resumed if r.WhichOneof("record_type") == "history"
             for item in r.history.item if (item.key or "/".join(item.nested_key)) == "pretrain/step"]
    assert steps == ["5"]


def test_evaluate_summary_and_table_hold_metrics_json(tmp_path, monkeypatch):
    from onerec.stages.evaluate import log_metrics

    _offline_env(monkeypatch)
    metrics = {
        "model": "pretrain/export",
        "valid": {"recall@10": 0.25, "ndcg@10": 0.125},
        "test": {"recall@10": 0.5, "ndcg@10": 0.25},
        "baselines": {"popularity": {"valid": {"recall@10": 0.0625, "ndcg@10": 0.03125},
                                     "test": {"recall@10": 0.0625, "ndcg@10": 0.03125}},
                      "sasrec": {"valid": {"recall@10": 0.2, "ndcg@10": 0.1}, "test": {"recall@10": 0.3, "ndcg@10": 0.15}}},
        "data": {"users": 10, "items": 20, "interactions": 300},
        "semantic_ids": {"levels": 3, "codebook_sizes": [8, 8, 2]},
        "wall_seconds": 1.5,
    }
    logger = RunLogger(LoggingConfig(wandb="offline", project="onerec-test"), tmp_path, "evaluate", {}, rank=0)
    wandb_id = logger.wandb_id
    log_metrics(logger, metrics)
    logger.close()

    summary, tables = {}, []
    for record in _finished_records(tmp_path, wandb_id):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            summary |= {item.key: json.loads(item.value_json) for item in record.summary.update if item.key}
        elif kind == "history":  # a wandb.Table is a file beside the run, named in the history
            tables += [json.loads(item.value_json) for item in record.history.item
                       if list(item.nested_key) == ["evaluate/metrics", "path"]]
    expected = {
        "test/recall@10": 0.5, "valid/ndcg@10": 0.125, "baselines/popularity/test/recall@10": 0.0625,
        "baselines/sasrec/valid/ndcg@10": 0.1, "data/users": 10, "semantic_ids/levels": 3, "model": "pretrain/export",
    }
    assert {k: summary.get(k) for k in expected} == expected
    assert "semantic_ids/codebook_sizes" not in summary  # lists stay in metrics.json
    (table_path,) = tables
    (table_file,) = (tmp_path / "wandb").glob(f"offline-run-*-{wandb_id}/files/{table_path}")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["split", "model", "recall@10", "ndcg@10"]
    assert table["data"] == [  # the report's table: the model beside every baseline, per split
        ["valid", "OneRec (pretrained)", 0.25, 0.125], ["valid", "popularity baseline", 0.0625, 0.03125],
        ["valid", "sasrec baseline", 0.2, 0.1], ["test", "OneRec (pretrained)", 0.5, 0.25],
        ["test", "popularity baseline", 0.0625, 0.03125], ["test", "sasrec baseline", 0.3, 0.15],
    ]


def test_the_evaluate_summary_sets_every_baseline_that_ran_beside_popularity(tmp_path):
    from onerec.report.tables import metrics_table
    from onerec.stages.evaluate import with_baselines

    metrics = {"model": "pretrain/export", "valid": {"ndcg@10": 0.05}, "test": {"ndcg@10": 0.04},
               "baselines": {"popularity": {"valid": {"ndcg@10": 0.02}, "test": {"ndcg@10": 0.01}}}}
    assert with_baselines(metrics, tmp_path / "baselines") is metrics  # none ran
    for name, ndcg in (("sasrec", 0.05), ("hstu", 0.07)):
        (tmp_path / "baselines" / name).mkdir(parents=True)
        (tmp_path / "baselines" / name / "metrics.json").write_text(
            json.dumps({"valid": {"ndcg@10": ndcg + 0.5}, "test": {"ndcg@10": ndcg}, "best_epoch": 3}))
    logged = with_baselines(metrics, tmp_path / "baselines")
    assert list(logged["baselines"]) == ["popularity", "sasrec", "hstu"]  # config.BASELINE_MODELS order
    assert logged["baselines"]["sasrec"] == {"valid": {"ndcg@10": 0.55}, "test": {"ndcg@10": 0.05}}
    assert "sasrec" not in metrics["baselines"]  # metrics.json itself is left as evaluate computed it
    _, rows = metrics_table(logged)
    assert ["test", "sasrec baseline", 0.05] in rows and ["test", "hstu baseline", 0.07] in rows


def test_console_lines_name_the_rank_when_no_launcher_prefixes_them():
    from onerec.logging import _CONSOLE_FORMAT, console_format

    assert console_format({}) == _CONSOLE_FORMAT
    assert "[rank 3]" in console_format({"WORLD_SIZE": "4", "RANK": "3"})
    # torchrun (launch/common.sh) already starts each worker line with its rank
    assert console_format({"WORLD_SIZE": "4", "RANK": "3", "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[${rank}]: "}) == _CONSOLE_FORMAT
