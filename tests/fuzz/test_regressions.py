"""One focused test per bug the fuzzer found, each with the smallest input that showed it.
Before the fix, each of these was a traceback (exit 1), a multi-line message, a valid input
refused with a message that named neither the file nor the key, or a value silently ignored."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fuzz_helpers import assert_success, assert_user_error, run_cli
from onerec.config import DataConfig
from onerec.data.build import build_tables, natural_order
from onerec.data.errors import BadRows, DataError
from onerec.data.readers import read_parquet
from onerec.data.sources import load_raw

LONG_NUMBER = "9" * 200_000  # more digits than int() converts (4,300)


def build(cfg: DataConfig, policy: str = "error"):
    cfg.on_bad_rows = policy
    bad = BadRows(policy)
    return build_tables(load_raw(cfg, bad), cfg, bad)


# --------------------------------------------------------------------------- raw data
def test_numeric_ids_of_any_length_sort_numerically():
    # was: ValueError "Exceeds the limit (4300 digits) for integer string conversion"
    assert natural_order(sorted(["10", LONG_NUMBER, "9", "007", "7"])) == ["007", "7", "9", "10", LONG_NUMBER]
    assert natural_order(["١٢", "3"]) == ["3", "١٢"]  # Arabic-Indic digits count by value, as int() reads them


def test_an_id_of_digit_signs_that_are_no_number_is_ordered_as_text():
    # was: ValueError "invalid literal for int() with base 10: '²'" ("²".isdigit() is True)
    assert natural_order(["2", "²", "10"]) == ["10", "2", "²"]


def test_a_200_kb_numeric_user_id_is_a_user(tmp_path):
    (tmp_path / "sequences.txt").write_text(f"1 1 2 3\n{LONG_NUMBER} 3 2 1\n")
    (tmp_path / "items.jsonl").write_text("".join(json.dumps({"item_id": i, "title": f"t{i}"}) + "\n" for i in (1, 2, 3)))
    tables = build(DataConfig(format="amazon2014", root=str(tmp_path)))
    assert tables.users["raw_id"] == ["1", LONG_NUMBER]


def test_amazon2014_item_id_past_the_int_digit_limit_is_a_bad_row(tmp_path):
    # was: the ValueError escaped json.loads' handler: unlocated, and not skippable
    (tmp_path / "sequences.txt").write_text("1 1 2 3\n2 3 2 1\n")
    records = [json.dumps({"item_id": i, "title": f"t{i}"}) for i in (1, 2, 3)] + ['{"item_id": ' + "9" * 5000 + "}"]
    (tmp_path / "items.jsonl").write_text("\n".join(records) + "\n")
    cfg = DataConfig(format="amazon2014", root=str(tmp_path))
    with pytest.raises(DataError, match=r"items\.jsonl:4: field 'item_id': expected a JSON object with item_id"):
        build(cfg)
    assert build(cfg, "skip").meta["bad_rows"] == {"malformed line": 1}


def test_amazon2018_number_past_the_int_digit_limit_names_the_file(tmp_path):
    (tmp_path / "Toys.inter.json").write_text('{"0": [0, 1, ' + "9" * 5000 + "]}")
    (tmp_path / "Toys.item.json").write_text(json.dumps({str(i): {"title": f"t{i}"} for i in range(3)}))
    with pytest.raises(DataError, match=r"Toys\.inter\.json: field '\*': unreadable JSON"):
        build(DataConfig(format="amazon2018", root=str(tmp_path)))


def _parquet_bytes() -> bytes:
    out = io.BytesIO()
    pq.write_table(pa.table({"u": ["a", "a", "a"], "i": ["x", "y", "é"], "t": [1, 2, 3], "click": [1.0, 0.0, 1.0]}), out)
    return out.getvalue()


def test_every_flipped_byte_of_a_parquet_file_reads_or_is_a_data_error(tmp_path):
    # was: OSError "Couldn't deserialize thrift" (a traceback), multi-line messages, and
    # UnicodeDecodeError from strings that are not UTF-8 (unlocated)
    original = _parquet_bytes()
    path = tmp_path / "log.parquet"
    refused = 0
    # the top bit of every byte (UTF-8 in strings, varints in the metadata), every bit of the footer
    flips = [(at, 0x80) for at in range(len(original))] + [(at, 0xFF) for at in range(len(original) - 200, len(original))]
    for at, mask in flips:
        damaged = bytearray(original)
        damaged[at] ^= mask
        path.write_bytes(bytes(damaged))
        try:
            table = read_parquet(path)
        except DataError as err:
            refused += 1
            assert str(err).startswith("log.parquet: field '*': not a readable Parquet file (")
            assert "\n" not in str(err)
            continue
        for column in table.columns:
            column.to_pylist()  # what the reader does next: no error left for later
    assert refused > len(flips) // 2  # most damage is seen


def test_a_damaged_parquet_file_is_exit_2_with_its_name(tmp_path):
    (tmp_path / "raw").mkdir()
    damaged = bytearray(_parquet_bytes())
    damaged[len(damaged) - 20] ^= 0xFF  # inside the footer's metadata
    (tmp_path / "raw" / "log.parquet").write_bytes(bytes(damaged))
    outcome = run_cli(["data", "data.format=parquet", f"data.root={tmp_path / 'raw'}", f"run.out_dir={tmp_path / 'run'}",
                       "data.interactions_file=log.parquet", "data.user_column=u", "data.item_column=i",
                       "data.time_column=t", "data.feedback_columns=[click]"])
    assert_user_error(outcome, "log.parquet")


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("where", ["override", "file"])
def test_an_int_too_large_for_a_float_field_is_a_message(tmp_path, where):
    # was: OverflowError "int too large to convert to float" (a traceback)
    outcome = _config(tmp_path, where, "train", "lr", "1" + "0" * 400)
    assert_user_error(outcome, "a number too large for its field")


@pytest.mark.parametrize("where", ["override", "file"])
def test_a_number_past_the_int_digit_limit_is_a_message_naming_where(tmp_path, where):
    # was: "Exceeds the limit (4300 digits) ...; use sys.set_int_max_str_digits()", naming nothing
    outcome = _config(tmp_path, where, "model", "d_model", "9" * 5000)
    assert_user_error(outcome, "more digits than Python reads", "config.yaml" if where == "file" else "model.d_model")


@pytest.mark.parametrize("where", ["override", "file"])
def test_yaml_nested_hundreds_deep_is_a_message(tmp_path, where):
    # was: RecursionError (a traceback) from the YAML composer
    outcome = _config(tmp_path, where, "model", "d_model", "[" * 2000 + "]" * 2000)
    assert_user_error(outcome)
    assert "nested too deeply" in outcome.message or "nesting depth" in outcome.message


@pytest.mark.parametrize("where", ["override", "file"])
def test_a_mapping_where_a_list_belongs_names_the_key(tmp_path, where):
    # was: TypeError "Cannot merge incompatible container types" (a traceback)
    outcome = _config(tmp_path, where, "eval", "ks", "{a: 1}")
    assert_user_error(outcome, "eval.ks: expected a list, got a mapping")


def test_a_value_of_the_wrong_type_is_one_line_naming_the_key(tmp_path):
    # was: four lines (OmegaConf's full_key / reference_type / object_type)
    outcome = _config(tmp_path, "file", "model", "d_model", "abc")
    assert_user_error(outcome, "model.d_model: Value 'abc' of type 'str' could not be converted to Integer")


@pytest.mark.parametrize("where", ["override", "file"])
def test_a_control_character_in_yaml_is_one_line(tmp_path, where):
    # was: "unacceptable character #x0011: ...\n  in "<unicode string>", position 4"
    outcome = _config(tmp_path, where, "data", "time_column", "a\x11b")
    assert_user_error(outcome, "unacceptable character #x0011")
    if where == "file":
        assert "line 2, column 17" in outcome.message  # "  time_column: a" is 16 characters


@pytest.mark.parametrize("where", ["override", "file"])
def test_a_missing_value_mark_is_refused_not_skipped(tmp_path, where):
    # was: exit 0 with train.lr left at its default (OmegaConf's merge skips "???" values)
    outcome = _config(tmp_path, where, "train", "lr", "???")
    assert_user_error(outcome, "train.lr=???: give a value")


def _config(tmp_path: Path, where: str, section: str, key: str, text: str):
    if where == "override":
        return run_cli(["config", f"{section}.{key}={text}"])
    path = tmp_path / "config.yaml"
    path.write_text(f"{section}:\n  {key}: {text}\n")
    return run_cli(["config", "--config", str(path)])


def test_numbers_that_fit_still_resolve(tmp_path):
    """Values in range still resolve after the fixes above (long numbers, nested lists)."""
    outcome = run_cli(["config", "train.lr=1e-300", "model.d_model=" + str(2**62), "model.num_heads=2", "eval.ks=[1,2]"])
    assert_success(outcome)
