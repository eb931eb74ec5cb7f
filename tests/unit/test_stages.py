"""The stage table drives the CLI, `onerec pipeline` and launch/pipeline.sh alike; commands
that read a config check their inputs before any heavy import or distributed start-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from onerec import __version__
from onerec.cli import build_parser, main as cli_main
from onerec.config import load_config
from onerec.stages import BY_NAME, STAGES, pipeline_stages

REPO = Path(__file__).resolve().parents[2]


def _names(overrides: list[str]) -> list[str]:
    return [stage.name for stage in pipeline_stages(load_config(None, overrides))]


def test_pipeline_order_follows_the_config():
    assert _names([]) == ["data", "tokenize", "pretrain", "evaluate"]
    assert _names(["reward.enabled=true", "align.enabled=true"]) == [
        "data", "tokenize", "pretrain", "reward", "dpo", "evaluate"
    ]
    sasrec = ["tokenizer.collaborative_weight=0.5", "tokenizer.collaborative_source=cooccurrence+sasrec"]
    assert _names(sasrec) == ["data", "baseline", "tokenize", "pretrain", "evaluate"]
    with pytest.raises(ValueError, match="reward.enabled"):
        _names(["align.enabled=true"])


def test_every_command_has_a_module_with_main_and_the_cli_offers_exactly_the_table():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps no public accessor
    assert list(commands) == [stage.name for stage in STAGES]
    for stage in STAGES:
        module = stage.load()
        assert callable(module.main), stage.name
        assert stage.takes_config == (not hasattr(module, "add_arguments")), stage.name


def test_version_and_python_dash_m():
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--version"])
    assert done.value.code == 0
    proc = subprocess.run([sys.executable, "-m", "onerec", "--version"], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == f"onerec {__version__}"


def test_config_command_prints_the_resolved_config(capsys):
    assert cli_main(["config", "--config", str(REPO / "configs" / "demo.yaml"), "train.lr=0.00042"]) == 0
    printed = capsys.readouterr().out
    assert "lr: 0.00042" in printed and "out_dir:" in printed
    assert cli_main(["config", "train.lrr=1"]) == 2  # a misspelt key is an error, not a default


def test_plan_lists_the_pipeline_and_saves_the_resolved_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["plan", f"run.out_dir={out}", "reward.enabled=true"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [line[0] for line in lines] == ["data", "tokenize", "pretrain", "reward", "evaluate"]
    assert [line[1] for line in lines] == ["0", "1", "1", "1", "0"]  # distributed: tokenize, pretrain, reward
    assert [line[2] for line in lines] == ["1"] * 5  # nothing has run: every stage runs
    assert (out / "config.yaml").is_file()


def test_a_missing_earlier_stage_is_named_before_torch_or_deepspeed_load(tmp_path):
    """`onerec pretrain` without `onerec data` says so at once: the check runs before the stage
    module (and with it torch, DeepSpeed and the process group) is imported."""
    script = (
        "import sys\n"
        "from onerec.cli import main\n"
        f"code = main(['pretrain', 'run.out_dir={tmp_path / 'run'}'])\n"
        "print('exit', code, 'deepspeed' in sys.modules, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "exit 2 False False" in proc.stdout, proc.stdout + proc.stderr
    assert "run `onerec data`" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_every_stage_input_names_a_stage_that_runs_before_it():
    cfg = load_config(None, ["reward.enabled=true", "align.enabled=true",
                             "tokenizer.collaborative_weight=0.5", "tokenizer.collaborative_source=sasrec"])
    order = [stage.name for stage in pipeline_stages(cfg)]
    for position, name in enumerate(order):
        for _, producer in BY_NAME[name].inputs(cfg):
            assert producer in order[:position], (name, producer)


def test_a_stage_whose_lock_another_live_process_holds_stops_with_its_pid(tmp_path):
    import json
    import os
    import socket

    from onerec.errors import ResourceError
    from onerec.locks import lock_path
    from onerec.stages import run_stage

    run = tmp_path / "run"
    lock = lock_path(run, "data")
    lock.parent.mkdir(parents=True)
    holder = os.getppid()  # alive for as long as this test runs
    lock.write_text(json.dumps({"pid": holder, "host": socket.gethostname(), "started": "now"}))
    with pytest.raises(ResourceError, match=f"pid {holder}"):
        run_stage(BY_NAME["data"], load_config(None, ["data.format=movielens", f"run.out_dir={run}"]))
    assert not (run / "data").exists()


def test_plan_runs_dpo_on_every_rank(tmp_path, capsys):
    """IPA samples sharded over the ranks and trains through the Trainer: launch/pipeline.sh and
    the Slurm script start `onerec dpo` under their launcher, as they start pretrain."""
    out = tmp_path / "run"
    assert cli_main(["plan", f"run.out_dir={out}", "reward.enabled=true", "align.enabled=true"]) == 0
    distributed = dict(line.split("\t")[:2] for line in capsys.readouterr().out.strip().splitlines())
    assert distributed["dpo"] == "1" and distributed["evaluate"] == "0"
