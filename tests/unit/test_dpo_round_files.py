"""What a restarted `onerec dpo` keeps of earlier rounds (onerec/align/round_files.py)."""

import json

from onerec.align.round_files import ROUNDS_FILE, prepare_rounds, read_round, round_dir, write_round


def _finished_round(dpo, k):
    write_round(dpo, k, {"values": {"round": k}})
    (round_dir(dpo, k) / "pairs.safetensors").write_bytes(b"pairs")


def test_rounds_of_the_same_inputs_are_kept_on_resume(tmp_path):
    dpo = tmp_path / "dpo"
    assert prepare_rounds(dpo, "fp1", resume=True) is False  # nothing to keep yet
    _finished_round(dpo, 1)
    assert prepare_rounds(dpo, "fp1", resume=True) is True
    assert read_round(dpo, 1) == {"values": {"round": 1}} and read_round(dpo, 2) is None
    assert json.loads((dpo / ROUNDS_FILE).read_text()) == {"fingerprint": "fp1"}


def test_other_inputs_or_a_fresh_start_move_rounds_aside_never_delete_them(tmp_path):
    dpo = tmp_path / "dpo"
    prepare_rounds(dpo, "fingerprint_one", resume=True)
    _finished_round(dpo, 1)
    assert prepare_rounds(dpo, "fingerprint_two", resume=True) is False  # the config or inputs changed
    assert read_round(dpo, 1) is None
    moved = dpo / "rounds.superseded-fingerprint_one"
    assert (moved / "round_1" / "pairs.safetensors").read_bytes() == b"pairs"
    _finished_round(dpo, 1)
    assert prepare_rounds(dpo, "fingerprint_two", resume=False) is False  # train.resume=none
    assert read_round(dpo, 1) is None
    assert (dpo / "rounds.superseded-fingerprint_two" / "round_1" / "round.json").is_file()
    assert json.loads((dpo / ROUNDS_FILE).read_text()) == {"fingerprint": "fingerprint_two"}
