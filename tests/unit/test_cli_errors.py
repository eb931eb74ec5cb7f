"""Errors meant for users reach them as a message and exit code 2, never a traceback: bad config
files and values, misread command lines (--resume followed by an override, recommend's --top-k
and --beam-width), a GPU asked for where there is none, and a beam search that would not fit in
memory (refused before it allocates anything)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from onerec import cli
from onerec.config import ModelConfig, MoEConfig
from onerec.errors import ResourceError
from onerec.inference import beam_search
from onerec.inference.beam_search import (
    check_beam_search_memory,
    constrained_beam_search,
    estimate_beam_search_bytes,
    generate_sessions,
)
from onerec.inference.evaluate import evaluate_examples
from onerec.model.onerec import OneRecModel
from onerec.tokenizer.trie import build_trie

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def messages(caplog):
    """What the CLI logs to the user (the `onerec` logger does not propagate to caplog's root)."""
    logger = logging.getLogger("onerec")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def _run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onerec", *argv], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


# ----------------------------------------------------------------------------- config errors
def test_out_of_range_value_exits_2_with_the_message(messages):
    assert cli.main(["config", "model.num_heads=0"]) == 2
    assert "model.num_heads=0: expected an integer >= 1" in messages.text


def test_empty_ks_exits_2_with_the_message(messages):
    assert cli.main(["config", "eval.ks=[]"]) == 2
    assert "eval.ks=[]: expected at least 1 value(s)" in messages.text


def test_yaml_list_and_syntax_error_exit_2_naming_the_file(tmp_path, messages):
    listed = tmp_path / "list.yaml"
    listed.write_text("- train\n- model\n")
    assert cli.main(["config", "--config", str(listed)]) == 2
    assert f"config file {listed}, line 1, column 1: expected a mapping" in messages.text
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  lr: [1e-3\n")
    assert cli.main(["config", "--config", str(broken)]) == 2
    assert f"config file {broken}, line 3, column 1:" in messages.text


def test_no_traceback_from_a_real_process(tmp_path):
    """`python -m onerec`: exit code 2 and a one-line message on stderr, no traceback."""
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n")
    for argv, expected in (
        (["config", "model.num_heads=0"], "model.num_heads=0: expected an integer >= 1"),
        (["config", "--config", str(listed)], "expected a mapping of sections"),
    ):
        proc = _run_cli(argv)
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr
        assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- --resume
@pytest.fixture
def captured_config(monkeypatch):
    """Replace the stage call: record the config the CLI built instead of training."""
    seen = {}

    def fake_run_stage(stage, cfg, **kwargs):
        seen["stage"], seen["cfg"] = stage.name, cfg

    monkeypatch.setattr(cli, "run_stage", fake_run_stage)
    return seen


def test_resume_followed_by_an_override_resumes_auto_with_the_override(captured_config):
    # It used to read the override as a checkpoint directory: train.resume="train.lr=1e-4".
    assert cli.main(["pretrain", "--resume", "train.lr=1e-4"]) == 0
    assert captured_config["cfg"].train.resume == "auto"
    assert captured_config["cfg"].train.lr == 1e-4


@pytest.mark.parametrize(
    "argv, resume, lr, batch",
    [
        (["pretrain", "--resume"], "auto", None, None),
        (["pretrain", "--resume", "runs/x/pretrain/checkpoints/step_00000100"],
         "runs/x/pretrain/checkpoints/step_00000100", None, None),
        (["pretrain", "--resume", "runs/lr=3e-4/ckpt"], "runs/lr=3e-4/ckpt", None, None),  # a path, not a key
        (["pretrain", "train.lr=0.5", "--resume", "train.lr=0.25"], "auto", 0.25, None),  # the later one wins
        (["pretrain", "--resume", "train.lr=0.25", "train.batch_size=8"], "auto", 0.25, 8),
        (["pretrain", "train.lr=0.5", "--resume", "ckpt", "train.batch_size=8"], "ckpt", 0.5, 8),
        (["pipeline", "--resume", "train.batch_size=8"], "auto", None, 8),
    ],
)
def test_resume_forms(captured_config, argv, resume, lr, batch):
    assert cli.main(argv) == 0
    cfg = captured_config["cfg"]
    assert cfg.train.resume == resume
    assert lr is None or cfg.train.lr == lr
    assert batch is None or cfg.train.batch_size == batch


def test_resume_help_explains_the_override_rule():
    sub = cli.build_parser()._subparsers._group_actions[0].choices["pretrain"]
    assert "key=value right after --resume" in sub.format_help().replace("\n", " ").replace("  ", " ")


# ----------------------------------------------------------------------------- recommend
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top-k", "-5"], "argument --top-k: -5: expected an integer >= 1"),  # returned 20 items
        (["--top-k", "0"], "argument --top-k: 0: expected an integer >= 1"),
        (["--beam-width", "0"], "argument --beam-width: 0: expected an integer >= 1"),
        (["--top-k", "30"], "--beam-width 20 is below --top-k 30"),
        (["--top-k", "10", "--beam-width", "5"], "--beam-width 5 is below --top-k 10"),
    ],
)
def test_recommend_arguments_are_argparse_errors(tmp_path, capsys, extra, message):
    # The model path does not exist: an argument error must come before anything is loaded.
    with pytest.raises(SystemExit) as done:
        cli.main(["recommend", "--model", str(tmp_path / "absent"), "--history", "1 2", *extra])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: onerec recommend" in err


# ----------------------------------------------------------------------------- a GPU that is not there
@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cuda_without_a_gpu_is_a_resource_error(no_cuda):
    from onerec.device import resolve_device
    from onerec.distributed.deepspeed import init_distributed

    with pytest.raises(ResourceError, match=r"run\.device=cuda but CUDA cannot be used here: .*run\.device=cpu"):
        resolve_device("cuda")  # was a RuntimeError (traceback)
    with pytest.raises(ResourceError, match=r"run\.device=cuda"):
        init_distributed("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    # ...and before any process group is made: checked in a fresh process, since other tests
    # in this one may have made a group already.
    script = (
        "import torch\n"
        "from onerec.distributed.deepspeed import init_distributed\n"
        "try:\n    init_distributed('cuda')\nexcept Exception as err:\n    print(type(err).__name__)\n"
        "print('group', torch.distributed.is_initialized())\n"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120).stdout
    assert out.split() == ["ResourceError", "group", "False"], out


def test_a_local_rank_without_its_gpu_is_a_resource_error(monkeypatch):
    from onerec.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(ResourceError, match=r"LOCAL_RANK=3 but only 2 CUDA device\(s\)"):
        resolve_device("auto")


def test_recommend_on_cuda_without_a_gpu_exits_2(tmp_path, no_cuda, messages):
    argv = ["recommend", "--model", str(tmp_path / "absent"), "--history", "1", "--device", "cuda"]
    assert cli.main(argv) == 2
    assert "--device=cuda but CUDA cannot be used here" in messages.text


# ----------------------------------------------------------------------------- memory before decoding
SIZES = [16, 8, 4]


def _model(moe: bool = True) -> OneRecModel:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, num_heads=2, encoder_layers=1, decoder_layers=1, d_ff=48, dropout=0.0,
                      moe=MoEConfig(enabled=moe, num_experts=3, top_k=2))
    return OneRecModel(cfg, SIZES, max_history=6, session_len=2).eval()


def _catalogue(num_items: int = 40):
    g = torch.Generator().manual_seed(1)
    all_codes = torch.cartesian_prod(*[torch.arange(s) for s in SIZES])
    codes = all_codes[torch.randperm(len(all_codes), generator=g)[:num_items]]
    return codes, build_trie(codes, SIZES)


class _NoEncode(Exception):
    pass


def test_a_beam_search_that_would_not_fit_is_refused_before_it_allocates(monkeypatch):
    """eval.beam_width=100000 on a big batch: a ResourceError with the estimate, what is
    available and the settings to lower, raised before the encoder runs (it tried 36 GB)."""
    model = _model()
    codes, trie = _catalogue(num_items=300)
    monkeypatch.setattr(beam_search, "available_memory", lambda device: 64 * 2**20)  # 64 MiB left
    monkeypatch.setattr(model, "encode", lambda *a, **k: (_ for _ in ()).throw(_NoEncode()))
    history = torch.randint(0, len(codes), (64, 6))
    with pytest.raises(ResourceError) as raised:
        evaluate_examples(model, history, torch.zeros(64, dtype=torch.long), None, codes, trie,
                          beam_width=100000, ks=[10], batch_size=64, device="cpu")
    message = str(raised.value)
    assert "64 request(s) x 300 beams" in message  # one beam per item at most
    assert "but only 64 MiB is available" in message
    assert "lower eval.batch_size (64) or eval.beam_width (100000)" in message
    needed = estimate_beam_search_bytes(model, 64, 300, 6, trie, cached=True)  # evaluation decodes with the cache
    assert needed > 64 * 2**20 and f"needs about {needed / 2**20:.0f} MiB of CPU memory" in message


def test_the_memory_check_passes_what_fits_and_scales_with_batch_and_beam(monkeypatch):
    model = _model()
    codes, trie = _catalogue()
    small = estimate_beam_search_bytes(model, 4, 10, 6, trie)
    assert estimate_beam_search_bytes(model, 8, 10, 6, trie) == pytest.approx(2 * small, abs=2)
    assert estimate_beam_search_bytes(model, 4, 20, 6, trie) > 1.8 * small  # the encoder's share stays
    assert estimate_beam_search_bytes(model, 4, 10, 6, trie, session_len=2) > small
    # The KV cache keeps the memory one row per request: less per beam than repeating it.
    cached = estimate_beam_search_bytes(model, 4, 10, 6, trie, cached=True)
    assert cached < small and estimate_beam_search_bytes(model, 8, 10, 6, trie, cached=True) > 1.8 * cached
    check_beam_search_memory(model, 4, 10, 6, trie, torch.device("cpu"))  # the real machine: fits
    monkeypatch.setattr(beam_search, "available_memory", lambda device: small - 1)
    with pytest.raises(ResourceError, match="lower the number of requests per call"):
        check_beam_search_memory(model, 4, 10, 6, trie, torch.device("cpu"))
    monkeypatch.setattr(beam_search, "available_memory", lambda device: None)  # unknown: no refusal
    check_beam_search_memory(model, 4, 10, 6, trie, torch.device("cpu"))


def test_sessions_are_checked_too(monkeypatch):
    model = _model()
    codes, trie = _catalogue()
    monkeypatch.setattr(beam_search, "available_memory", lambda device: 1024)
    with pytest.raises(ResourceError, match="align.batch_size"):
        generate_sessions(model, codes[torch.zeros(2, 6, dtype=torch.long)], trie, 16, 2,
                          settings="align.batch_size or align.num_samples")


def test_a_beam_wider_than_the_catalogue_runs_one_beam_per_item_with_the_same_result():
    """The extra beams could only be dead: the search runs with the catalogue's width (less
    memory) and pads the output back, so the answer is exactly the full-width one."""
    model = _model(moe=False)
    codes, trie = _catalogue(num_items=40)
    history = codes[torch.randint(0, 40, (3, 6), generator=torch.Generator().manual_seed(2))]
    exact = constrained_beam_search(model, history, trie, beam_width=40)
    wide = constrained_beam_search(model, history, trie, beam_width=100000)
    assert wide.items_BW.shape == (3, 100000) and wide.codes_BWL.shape == (3, 100000, 3)
    assert torch.equal(wide.items_BW[:, :40], exact.items_BW)
    assert torch.equal(wide.scores_BW[:, :40], exact.scores_BW)
    assert (wide.items_BW[:, 40:] == -1).all() and torch.isneginf(wide.scores_BW[:, 40:]).all()
    assert sorted(exact.items_BW[0].tolist()) == list(range(40))  # every item, once


def test_evaluation_with_a_beam_wider_than_the_catalogue_warns_once(messages):
    model = _model()
    codes, trie = _catalogue(num_items=30)
    history = torch.randint(0, 30, (4, 6))
    kwargs = dict(beam_width=5000, ks=[5], batch_size=4, device="cpu")
    wide = evaluate_examples(model, history, torch.arange(4), None, codes, trie, **kwargs)
    evaluate_examples(model, history, torch.arange(4), None, codes, trie, **kwargs)
    assert messages.text.count("eval.beam_width=5000 is more than the 30 items of the catalogue") == 1
    kwargs["beam_width"] = 30
    assert evaluate_examples(model, history, torch.arange(4), None, codes, trie, **kwargs) == wide
