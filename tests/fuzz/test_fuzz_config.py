"""`onerec config` on bad configs: YAML that is not a mapping, has syntax errors, tabs,
duplicate keys, anchors, tags, deep nesting or bytes that are not UTF-8; unknown keys; values
of the wrong type; numbers around and beyond every field's declared range, in the file and as
key=value overrides. Each either resolves (and then holds exactly the value given) or is a
one-line user error (exit 2); never a traceback, and the config file and the files beside it
are left as they were.

The oracle for numbers is written from the declared ranges (`ranged(...)` metadata in
onerec/config.py) and the few rules across fields (d_model a multiple of num_heads, top_k at
most num_experts, beam_width at least the largest K), against the defaults of the other fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Callable, Optional

import yaml
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from fuzz_helpers import (
    Long, assert_success, assert_success_or_user_error, assert_user_error, fuzz_settings, outside_unchanged,
    run_cli, workspace,
)
from onerec.config import INT64_MAX, Range, RootConfig

DEFAULTS = RootConfig()


# --------------------------------------------------------------------------- the schema's fields
@dataclass(frozen=True)
class NumericField:
    key: str  # dotted, e.g. model.moe.top_k
    kind: type  # int or float (of the field, or of each element of a list field)
    is_list: bool
    allowed: Range


def _fields(config: Any, prefix: str = "") -> list[tuple[str, Any, Optional[Range]]]:
    """(dotted key, default value, declared range) of every leaf field under `config`."""
    found = []
    for spec in fields(config):
        value = getattr(config, spec.name)
        key = f"{prefix}{spec.name}"
        if is_dataclass(value):
            found += _fields(value, f"{key}.")
        else:
            found.append((key, value, spec.metadata.get("range")))
    return found


LEAVES = _fields(DEFAULTS)
NUMERIC = [
    NumericField(key, type(default[0]) if isinstance(default, list) else type(default), isinstance(default, list), allowed)
    for key, default, allowed in LEAVES if allowed is not None
]
assert len(NUMERIC) > 50, "the schema walk found too few ranged fields"


def _other(key: str) -> Any:
    section, name = key.rsplit(".", 1)
    value = DEFAULTS
    for part in section.split("."):
        value = getattr(value, part)
    return getattr(value, name)


# Rules across fields, each given the new value of one field and the defaults of the rest.
CROSS_RULES: dict[str, Callable[[Any], bool]] = {
    "eval.beam_width": lambda v: v >= max(DEFAULTS.eval.ks),
    "eval.ks": lambda v: max(v) <= DEFAULTS.eval.beam_width,
    "model.moe.top_k": lambda v: v <= DEFAULTS.model.moe.num_experts,
    "model.moe.num_experts": lambda v: DEFAULTS.model.moe.top_k <= v,
}
for _section in ("model", "sasrec", "sasrec_pp", "reward"):
    CROSS_RULES[f"{_section}.d_model"] = lambda v, s=_section: v % _other(f"{s}.num_heads") == 0
    CROSS_RULES[f"{_section}.num_heads"] = lambda v, s=_section: _other(f"{s}.d_model") % v == 0


def accepted(spec: NumericField, value: Any) -> bool:
    """Whether the schema accepts `value` for `spec`: the right type (an int for an int field; an
    int or float for a float field, as a float), finite, within int64 and the declared range,
    and the rules across fields."""
    elements = value if spec.is_list else [value]
    if spec.is_list and (not isinstance(value, list) or len(value) < spec.allowed.min_length):
        return False
    for element in elements:
        if isinstance(element, bool) or not isinstance(element, (int, float)):
            return False
        if spec.kind is int:
            if not isinstance(element, int) or abs(element) > INT64_MAX:
                return False
        else:
            try:
                element = float(element)
            except OverflowError:
                return False
            if not math.isfinite(element):
                return False
        bound = spec.allowed
        if not ((bound.min is None or element >= bound.min) and (bound.above is None or element > bound.above)
                and (bound.max is None or element <= bound.max) and (bound.below is None or element < bound.below)):
            return False
    rule = CROSS_RULES.get(spec.key)
    return rule is None or rule(value)


# --------------------------------------------------------------------------- values and YAML text
def near(bound: float, kind: type) -> list:
    if kind is int:
        return [int(bound) - 1, int(bound), int(bound) + 1]
    return [bound, math.nextafter(bound, -math.inf), math.nextafter(bound, math.inf), bound - 1, bound + 1]


SPECIAL_NUMBERS = [0, -1, 1, 2, 3, INT64_MAX, INT64_MAX + 1, -INT64_MAX - 1, -INT64_MAX - 2, 2**64, 10**30,
                   0.0, -0.0, 0.5, 1.5, 4.0, 1e-300, 5e-324, 1e308, -1e308, float("nan"), float("inf"), float("-inf")]
# Numbers too long for a float (400 digits) or for int() (5,000 digits), given as their digits:
# never accepted (the oracle sees a string), whatever the field.
LONG_NUMBERS = [Long("1" + "0" * 400), Long("9" * 5000)]
# "???" is OmegaConf's mark for a missing value (a merge would skip it and keep the default)
WRONG_TYPES = [True, False, None, "abc", "", "1e3x", [1, 2], {"a": 1}, [], {}, "???", *LONG_NUMBERS]
# Interpolations, which may resolve to a valid value: exit 0 or a message, not the oracle's.
OMEGACONF_SYNTAX = ["${model.d_model}", "${nosuch.key}", "${oc.env:HOME}", "${oc.decode:'[1'}", "${model.moe}"]


@st.composite
def values_for(draw, spec: NumericField) -> Any:
    """Values around and beyond the field's bounds, special numbers, random numbers, wrong types."""
    bounds = [b for b in (spec.allowed.min, spec.allowed.max, spec.allowed.above, spec.allowed.below) if b is not None]
    scalar = st.sampled_from([v for b in bounds for v in near(b, spec.kind)] or [0]) | st.sampled_from(SPECIAL_NUMBERS)
    scalar = scalar | (st.integers() if spec.kind is int else st.floats()) | st.integers(-3, 70)
    if spec.is_list:
        return draw(st.lists(scalar, max_size=3) | st.sampled_from(WRONG_TYPES))
    return draw(scalar | st.sampled_from(WRONG_TYPES))


def yaml_scalar(value: Any) -> str:
    """`value` as YAML text that OmegaConf reads back as that value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(yaml_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_scalar(v)}" for k, v in value.items()) + "}"
    return f"'{value}'" if value in ("", "???") or value[:1] in "{" else value


def as_yaml_file(key: str, text: str) -> str:
    """`key: text` nested under its sections, e.g. model:\\n  moe:\\n    top_k: 3."""
    parts = key.split(".")
    lines = [f"{'  ' * depth}{part}:" for depth, part in enumerate(parts[:-1])]
    return "\n".join(lines + [f"{'  ' * (len(parts) - 1)}{parts[-1]}: {text}"]) + "\n"


def resolved(stdout: str, key: str) -> Any:
    """The value of `key` in what `onerec config` printed."""
    value = OmegaConf.to_container(OmegaConf.create(stdout))
    for part in key.split("."):
        value = value[part]
    return value


def run_config(space, argv: list[str]):
    with outside_unchanged(space.raw, space.sentinel):
        return run_cli(["config", *argv])


# --------------------------------------------------------------------------- the tests
@fuzz_settings(120)
@given(spec=st.sampled_from(NUMERIC), data=st.data(), where=st.sampled_from(["file", "override"]))
def test_numbers_in_range_resolve_and_all_others_are_a_message_naming_the_key(fuzz_dir, spec, data, where):
    """Every ranged number field, given values around and beyond its bounds, special and random
    numbers and values of other types, in a YAML file or as an override: exit 0 holding exactly
    that value when the schema allows it, else a one-line message naming the field."""
    value = data.draw(values_for(spec), label="value")
    text = yaml_scalar(value)
    with workspace(fuzz_dir) as space:
        if where == "file":
            config = space.raw / "config.yaml"
            config.write_text(as_yaml_file(spec.key, text))
            outcome = run_config(space, ["--config", str(config)])
        else:
            outcome = run_config(space, [f"{spec.key}={text}"])
    assert_success_or_user_error(outcome)
    name = spec.key.rsplit(".", 1)[-1]
    if accepted(spec, value):
        assert_success(outcome)
        got = resolved(outcome.stdout, spec.key)
        assert got == (float(value) if spec.kind is float and not spec.is_list else value), (outcome, got)
    else:
        assert_user_error(outcome)
        place = str(space.raw / "config.yaml") if where == "file" else spec.key
        assert name in outcome.message or place in outcome.message, f"{outcome}: names neither {name} nor {place}"


ALL_KEYS = [key for key, _, _ in LEAVES]
ANY_VALUE = (st.sampled_from(WRONG_TYPES + SPECIAL_NUMBERS + OMEGACONF_SYNTAX)
             | st.text(max_size=12) | st.integers() | st.floats()
             | st.lists(st.integers() | st.text(max_size=4), max_size=3)
             | st.dictionaries(st.from_regex(r"[a-z]{1,5}", fullmatch=True), st.integers(), max_size=2))
UNKNOWN_KEYS = ["model.dmodel", "train.learning_rate", "nosuch", "run.seed.x", "data.format.x", "eval.ks.x",
                "reward.signals.x", "model.moe.experts", "logging.wandb_mode", "tokenizer.rq_vae.depth"]


@fuzz_settings(60)
@given(key=st.sampled_from(ALL_KEYS + UNKNOWN_KEYS), value=ANY_VALUE, where=st.sampled_from(["file", "override"]))
def test_any_value_for_any_key_resolves_or_is_a_message(fuzz_dir, key, value, where):
    """Every key (numbers, strings, flags, lists, sections) and unknown keys, given values of
    every type: exit 0, or a one-line message; an unknown key is always refused."""
    text = yaml_scalar(value) if not isinstance(value, str) else yaml_scalar(value.replace("\n", " "))
    with workspace(fuzz_dir) as space:
        if where == "file":
            config = space.raw / "config.yaml"
            config.write_text(as_yaml_file(key, text))
            outcome = run_config(space, ["--config", str(config)])
        else:
            outcome = run_config(space, [f"{key}={text}"])
    assert_success_or_user_error(outcome)
    if key in UNKNOWN_KEYS:
        assert_user_error(outcome)


# YAML that is wrong as a whole, or in its syntax
YAML_PIECES = [
    "- train\n- model\n", "just a string\n", "42\n", "null\n", "~\n", "[1, 2\n", "{a: 1\n", "train:\n\tlr: 1\n",
    "train:\n  lr: 1\n  lr: 2\n", "train:\n  lr: 1\ntrain:\n  lr: 2\n", "model: 5\n", "model: [1, 2]\n",
    "model:\n  moe: 3\n", "? [a, b]\n: 1\n", "model: {d_model: *nope}\n", "a: &x 1\nb: *x\n",
    "model: !!python/object:os.system {}\n", "model: !custom 1\n", "train: {lr: !!binary aGVsbG8=}\n",
    "%YAML 1.1\n---\nmodel: {}\n", "---\nmodel: {}\n---\ntrain: {}\n", "model:\n  d_model: 64\n   num_heads: 2\n",
    "'unclosed: 1\n", "model: \"\\xZZ\"\n", "1: 2\n", "null: 1\n", "train:\n  - lr\n", "eval:\n  ks: {a: 1}\n",
    "reward:\n  signals: [{name: a}]\n", "reward:\n  signals: [1]\n", "run:\n  out_dir: [x]\n", "\ufeffmodel: {}\n",
    "model:\n  d_model: ${oc.env:HOME}\n", "model:\n  d_model: ${model.d_model}\n", "data:\n  root: ${oc.decode:'[1'}\n",
    "model:\n  d_model: " + "[" * 400 + "\n", "model:\n  d_model: " + "[" * 400 + "]" * 400 + "\n",
    "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 6)),
    "#only a comment\n", "", "   \n", "\x00\n", "model:\n  d_model: 0x40\n", "model:\n  d_model: 0o100\n",
    "train:\n  lr: 1e-3\n  max_steps: 1_000\n",
]
BAD_BYTES = [b"\xff", b"\xe9", b"\xed\xa0\x80", b"\x80", b"\xc3"]


@fuzz_settings(80)
@given(pieces=st.lists(st.sampled_from(YAML_PIECES) | st.text(max_size=30), min_size=1, max_size=3),
       bad_bytes=st.sampled_from([b""] * 4 + BAD_BYTES), at=st.floats(0, 1))
def test_broken_yaml_files_are_a_message_naming_the_file(fuzz_dir, pieces, bad_bytes, at):
    """YAML files that are lists or scalars, have syntax errors, tabs, duplicate keys, unknown
    tags, undefined or exponential aliases, nesting hundreds deep, interpolations that loop,
    several documents, NUL, random text, and bytes that are not UTF-8: exit 0 only for a
    mapping the schema accepts, else a one-line message."""
    body = "".join(pieces).encode("utf-8", "surrogatepass")
    cut = int(at * len(body))
    body = body[:cut] + bad_bytes + body[cut:]
    with workspace(fuzz_dir) as space:
        config = space.raw / "config.yaml"
        config.write_bytes(body)
        outcome = run_config(space, ["--config", str(config)])
    assert_success_or_user_error(outcome)
    if outcome.code == 0:
        document = yaml.safe_load(body.decode("utf-8-sig"))
        assert document is None or isinstance(document, dict), outcome
