"""Config validation: every numeric field has a declared range, checked in one place, and a value
out of it (or a YAML file that is not a mapping, or not YAML at all) is a ConfigError that names
the key, the value and the allowed range (or the file, line and column), never a traceback."""

from __future__ import annotations

import math
import re
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

import pytest

from onerec.config import (
    INT64_MAX,
    ConfigError,
    EvalConfig,
    ModelConfig,
    Range,
    RootConfig,
    SignalConfig,
    load_config,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


# ----------------------------------------------------------------------------- every field has a range
def _sections(cls=RootConfig, prefix: str = ""):
    """(key prefix, dataclass) for RootConfig and every dataclass inside it, lists included
    (reward.signals holds SignalConfig rows: their keys read reward.signals[])."""
    yield prefix, cls
    hints = typing.get_type_hints(cls)
    for spec in fields(cls):
        hint = hints[spec.name]
        inner = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if is_dataclass(hint):
            yield from _sections(hint, f"{prefix}{spec.name}.")
        elif inner is not None and is_dataclass(inner):
            yield from _sections(inner, f"{prefix}{spec.name}[].")


def _numeric_fields():
    """(key, dataclass, field, is_list) for every int/float field and list of them."""
    for prefix, cls in _sections():
        hints = typing.get_type_hints(cls)
        for spec in fields(cls):
            hint = hints[spec.name]
            if hint in (int, float):
                yield f"{prefix}{spec.name}", cls, spec, False
            elif typing.get_origin(hint) is list and typing.get_args(hint)[0] in (int, float):
                yield f"{prefix}{spec.name}", cls, spec, True


NUMERIC = list(_numeric_fields())


def test_the_walk_finds_the_numeric_fields_of_every_section():
    keys = {key for key, *_ in NUMERIC}
    assert {"model.num_heads", "model.moe.top_k", "tokenizer.rq_vae.lr", "eval.ks", "reward.signals[].weight",
            "parallel.expert_parallel_size", "run.seed"} <= keys
    assert len(keys) > 80


@pytest.mark.parametrize("key, cls, spec, is_list", NUMERIC, ids=[key for key, *_ in NUMERIC])
def test_every_numeric_field_declares_its_range_and_its_default_is_in_it(key, cls, spec, is_list):
    allowed = spec.metadata.get("range")
    assert isinstance(allowed, Range), (
        f"{key} has no declared range: declare it with ranged(default, min=/max=/above=/below=) in onerec/config.py"
    )
    default = spec.default if spec.default is not MISSING else spec.default_factory()
    for value in default if is_list else [default]:
        assert allowed.contains(value), f"{key}: default {value!r} is outside its own range {allowed.describe()}"


def _outside(allowed: Range, is_int: bool) -> list:
    """Values just outside `allowed` on each bounded side, plus the ones refused everywhere."""
    step = 1 if is_int else 1e-6
    values = []
    if allowed.min is not None:
        values.append(allowed.min - step)
    if allowed.above is not None:
        values.append(allowed.above)
    if allowed.max is not None:
        values.append(allowed.max + step)
    if allowed.below is not None:
        values.append(allowed.below)
    values += [INT64_MAX + 1] if is_int else [math.nan, math.inf]
    return [int(v) if is_int else float(v) for v in values]


@pytest.mark.parametrize("key, cls, spec, is_list", NUMERIC, ids=[key for key, *_ in NUMERIC])
def test_every_value_outside_a_range_is_refused_with_key_value_and_range(key, cls, spec, is_list):
    allowed: Range = spec.metadata["range"]
    is_int = typing.get_type_hints(cls)[spec.name] is int or (
        is_list and typing.get_args(typing.get_type_hints(cls)[spec.name])[0] is int
    )
    for bad in _outside(allowed, is_int):
        value = [bad] if is_list else bad
        shown = f"{key}[0]" if is_list else key
        with pytest.raises(ConfigError) as raised:
            cls(**{spec.name: value})
        message = str(raised.value)
        assert message.startswith(f"{shown}={bad!r}: expected"), message
        if allowed.has_low or allowed.has_high:
            assert allowed.describe() in message, message


# ----------------------------------------------------------------------------- the known holes
@pytest.mark.parametrize(
    "override, message",
    [
        ("model.num_heads=0", "model.num_heads=0: expected an integer >= 1"),  # was ZeroDivisionError
        ("model.d_model=0", "model.d_model=0: expected an integer >= 1"),
        ("model.d_model=-8", "model.d_model=-8: expected an integer >= 1"),
        ("model.d_ff=0", "model.d_ff=0: expected an integer >= 1"),  # was an AssertionError in the model
        ("model.d_ff=-4", "model.d_ff=-4: expected an integer >= 1"),
        ("train.max_epochs=0", "train.max_epochs=0: expected an integer >= 1"),  # was accepted
        ("train.max_epochs=-2", "train.max_epochs=-2: expected an integer >= 1"),
        ("model.encoder_layers=-1", "model.encoder_layers=-1: expected an integer >= 0"),  # was accepted
        ("train.warmup_steps=-5", "train.warmup_steps=-5: expected an integer >= 0"),  # was accepted
        ("eval.ks=[]", "eval.ks=[]: expected at least 1 value(s), each >= 1"),  # was "max() arg is an empty sequence"
        ("eval.ks=[0,10]", "eval.ks[0]=0: expected an integer >= 1"),
        ("train.lr=nan", "train.lr=nan: expected a finite number > 0"),
        ("model.dropout=1.0", "model.dropout=1.0: expected a finite number in [0, 1)"),
        ("run.seed=-1", "run.seed=-1: expected an integer in [0, 4294967295]"),
        ("train.zero_stage=3", "train.zero_stage=3: expected an integer in [0, 2]"),
    ],
)
def test_out_of_range_override_names_key_value_and_range(override, message):
    with pytest.raises(ConfigError) as raised:
        load_config(None, [override])
    assert str(raised.value).startswith(message), str(raised.value)


def test_d_model_not_divisible_by_num_heads_names_both_and_why():
    reason = "each attention head gets d_model / num_heads dimensions"
    with pytest.raises(ConfigError, match=rf"model\.d_model=130 is not divisible by model\.num_heads=4: {reason}"):
        load_config(None, ["model.d_model=130"])
    with pytest.raises(ConfigError, match=r"sasrec\.d_model=10 is not divisible by sasrec\.num_heads=3"):
        load_config(None, ["sasrec.d_model=10", "sasrec.num_heads=3"])
    # 128 % -4 == 0: a negative head count passed the divisibility rule and failed in the model.
    for section in ("model", "sasrec", "sasrec_pp", "reward"):
        with pytest.raises(ConfigError, match=rf"{section}\.num_heads=-4: expected an integer >= 1"):
            load_config(None, [f"{section}.num_heads=-4"])


def test_ranges_are_checked_before_the_rules_across_fields():
    """num_heads=0 must be a range message, not a division by zero in the divisibility rule;
    ks=[] a range message, not max() of nothing in the beam-width rule."""
    with pytest.raises(ConfigError, match="num_heads=0: expected"):
        ModelConfig(num_heads=0)
    with pytest.raises(ConfigError, match=r"eval\.ks=\[\]"):
        EvalConfig(ks=[])


def test_a_signal_row_is_range_checked_too():
    with pytest.raises(ConfigError, match=r"reward\.signals\[\]\.weight=inf: expected a finite number"):
        load_config(None, ["reward.signals=[{name: like, column: rating, weight: .inf}]"])
    assert SignalConfig(name="a", column="b", weight=-2.0).weight == -2.0  # a penalty is allowed


def test_values_on_the_boundary_are_accepted():
    cfg = load_config(None, ["model.encoder_layers=0", "train.warmup_steps=0", "train.max_steps=0",
                             "eval.ks=[1]", "eval.beam_width=1", "tokenizer.collaborative_weight=1.0",
                             "run.seed=4294967295", "train.zero_stage=2"])
    assert cfg.model.encoder_layers == 0 and cfg.eval.ks == [1] and cfg.run.seed == 2**32 - 1


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_shipped_config_fits_the_ranges(path):
    assert isinstance(load_config(path), RootConfig)


# ----------------------------------------------------------------------------- YAML files
def _write(tmp_path: Path, text: str | bytes, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_a_yaml_list_is_refused_naming_the_file(tmp_path):
    path = _write(tmp_path, "- train\n- model\n")
    with pytest.raises(ConfigError) as raised:  # was TypeError: Cannot merge incompatible container types
        load_config(path)
    assert str(raised.value) == (
        f"config file {path}, line 1, column 1: expected a mapping of sections (run:, data:, model:, ...), "
        "found a list"
    )


def test_a_yaml_scalar_is_refused_naming_the_file(tmp_path):
    path = _write(tmp_path, "hello\n")
    with pytest.raises(ConfigError, match=r"line 1, column 1: expected a mapping .* found the single value 'hello'"):
        load_config(path)  # was "unknown config key: Key 'hello' not in 'RootConfig'"


@pytest.mark.parametrize(
    "text, where, problem",
    [
        ("train:\n  lr: [1e-3\n", "line 3, column 1", r"expected ',' or '\]'.*flow sequence at line 2, column 7"),
        ("train:\n\tlr: 1\n", "line 2, column 1", "found character '\\\\t' that cannot start any token"),
        ("train: {lr: 1}\ntrain: {lr: 2}\n", "line 2, column 1", "found duplicate key train"),
        ("train:\n  lr: 1\n  : 2\n", "line 3, column 3", "expected <block end>, but found ':'"),
    ],
    ids=["unclosed-bracket", "tab", "duplicate-key", "mixed-block"],
)
def test_a_yaml_syntax_error_names_file_line_and_column(tmp_path, text, where, problem):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^config file {re.escape(str(path))}, {where}: .*{problem}"):
        load_config(path)  # was a yaml ScannerError / ParserError traceback


def test_a_non_utf8_file_names_its_line(tmp_path):
    path = _write(tmp_path, b"train:\n  lr: 1\n  # caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(path))}, line 3: not UTF-8 text \(byte 0xe9\)"):
        load_config(path)


def test_an_empty_file_or_a_byte_order_mark_is_fine(tmp_path):
    assert load_config(_write(tmp_path, "# only a comment\n")) == RootConfig()
    assert load_config(_write(tmp_path, "\ufefftrain:\n  lr: 0.5\n", "bom.yaml")).train.lr == 0.5


def test_an_override_that_is_not_yaml_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'train\.lr=\[1': .*flow sequence"):
        load_config(None, ["train.lr=[1"])
