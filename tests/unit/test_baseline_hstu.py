"""HSTU: causal pointwise attention, padding, the relative time bias, learning a planted order,
and the `hstu` model in `onerec baseline` (with the items' times read from the log)."""

import json

import numpy as np
import pytest
import torch

from onerec.baselines.hstu import HSTU
from onerec.model.hstu import RelativeBias
from onerec.baselines.sasrec import sequence_loss
from onerec.config import ConfigError, HSTUConfig, load_config

CFG = HSTUConfig(d_model=16, num_heads=2, layers=2, dropout=0.0, time_buckets=8)


def test_position_s_does_not_see_later_items_or_times():
    torch.manual_seed(0)
    model = HSTU(CFG, num_items=9, max_len=4).eval()
    times = torch.tensor([[0, 10, 20, 30]])
    a = model(torch.tensor([[5, 1, 2, 3]]), times)
    b = model(torch.tensor([[5, 1, 2, 7]]), times)
    c = model(torch.tensor([[5, 1, 2, 3]]), torch.tensor([[0, 10, 20, 5000]]))
    torch.testing.assert_close(a[:, :3], b[:, :3])
    torch.testing.assert_close(a[:, :3], c[:, :3])
    assert not torch.allclose(a[:, 3], b[:, 3]) and not torch.allclose(a[:, 3], c[:, 3])
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(1, 4))  # L2-normalised states


def test_left_padding_is_ignored_whatever_its_items_and_times():
    torch.manual_seed(0)
    model = HSTU(CFG, num_items=9, max_len=6).eval()
    short = model(torch.tensor([[1, 2, 3]]), torch.tensor([[3, 9, 40]]))
    padded = model(torch.tensor([[-1, -1, -1, 1, 2, 3]]), torch.tensor([[777, -5, 0, 3, 9, 40]]))
    torch.testing.assert_close(padded[:, -3:], short, rtol=0, atol=1e-5)


def test_time_gaps_fall_in_log2_buckets_and_only_count_with_a_time_table():
    bias = RelativeBias(max_len=3, time_buckets=4)
    with torch.no_grad():
        bias.position_w.zero_()
        bias.time_w.copy_(torch.arange(5.0))  # the bias equals the bucket number
    got = bias(3, torch.tensor([[1, 3, 1000]]), torch.device("cpu"))[0]
    # floor(log2(max(|t_i - t_j|, 1))): gap 0 -> 0, 2 -> 1, 997 and 999 -> 9, clamped to 4
    assert got.tolist() == [[0.0, 1.0, 4.0], [1.0, 0.0, 4.0], [4.0, 4.0, 0.0]]
    assert bias(3, None, torch.device("cpu")).shape == (1, 3, 3)  # positions only
    assert not HSTU(HSTUConfig(time_buckets=0), 5, 4).uses_time and HSTU(CFG, 5, 4).uses_time


def test_learns_a_deterministic_successor_rule():
    torch.manual_seed(0)
    num_items = 12
    starts = torch.randint(num_items, (256, 1))
    rows = (starts + torch.arange(5)) % num_items  # item i is always followed by i + 1
    times = torch.arange(5).expand(256, 5) * 60
    model = HSTU(CFG, num_items, max_len=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss = sequence_loss(model, rows, times)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first
    ranked = model.eval().top_k(torch.tensor([[3, 4, 5, 6], [-1, -1, 0, 1]]), 3, times_BS=times[:2, :4])
    assert ranked[:, 0].tolist() == [7, 2]


def test_hstu_section_defaults_and_checks():
    cfg = load_config(None, [])
    assert isinstance(cfg.hstu, HSTUConfig) and not cfg.hstu.enabled and "hstu" not in cfg.enabled_baselines
    assert (cfg.hstu.max_len, cfg.hstu.dropout, cfg.hstu.temperature) == (50, 0.5, 0.05)
    assert load_config(None, ["hstu.enabled=true"]).enabled_baselines == ("sasrec", "hstu")
    with pytest.raises(ConfigError, match=r"^hstu\.temperature=0\.0: expected"):
        load_config(None, ["hstu.temperature=0"])


def _timed_log(tmp_path) -> None:
    """A log whose next item depends on the time gap: after a short gap (60) the user stays on
    the item's neighbour i + 1, after a long gap (86,400) jumps to i + 7."""
    rng = np.random.default_rng(0)
    lines = ["user_id,item_id,timestamp"]
    for user in range(60):
        item, t = int(rng.integers(0, 20)), 0
        for _ in range(6 + user % 5):
            lines.append(f"u{user},i{item},{t}")
            long_gap = rng.random() < 0.5
            t += 86_400 if long_gap else 60
            item = (item + (7 if long_gap else 1)) % 20
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "log.csv").write_text("\n".join(lines) + "\n")


def test_onerec_baseline_trains_hstu_with_the_logs_times(tmp_path):
    from onerec.cli import main as cli_main
    from onerec.stages import BY_NAME, freshness

    _timed_log(tmp_path)
    overrides = [
        f"run.out_dir={tmp_path / 'run'}", "run.device=cpu", "data.format=csv", f"data.root={tmp_path / 'raw'}",
        "data.interactions_file=log.csv", "data.time_column=timestamp", "data.max_history=4",
        "sasrec.enabled=false", "hstu.enabled=true", "hstu.d_model=16", "hstu.max_len=8",
        "hstu.max_epochs=3", "hstu.patience=0", "hstu.lr=1e-2",
    ]
    assert cli_main(["data", *overrides]) == 0
    assert cli_main(["baseline", *overrides]) == 0
    run = tmp_path / "run"
    metrics = json.loads((run / "baselines/hstu/metrics.json").read_text())
    assert (run / "baselines/hstu/model.safetensors").is_file() and not (run / "baselines/sasrec").exists()
    assert metrics["model"] == "hstu" and metrics["uses_time"] and metrics["history_len"] == 8
    assert metrics["epochs_run"] == 3 and set(metrics["test"]) == {"recall@5", "ndcg@5", "recall@10", "ndcg@10"}
    stage = BY_NAME["baseline"]
    assert freshness(stage, load_config(None, overrides)) == (True, "up to date")
    fresh, reason = freshness(stage, load_config(None, [*overrides, "hstu.temperature=0.1"]))
    assert not fresh and "hstu.temperature" in reason


def test_history_times_are_aligned_with_the_histories():
    from onerec.config import DataConfig
    from onerec.data.splits import UserSequences, make_splits
    from onerec.stages.baseline import history_times

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 12, size=30)
    user = np.repeat(np.arange(30), lengths)
    order = np.concatenate([np.sort(rng.choice(10_000, size=n, replace=False)) for n in lengths])
    item = order % 97  # an item's number is determined by its time
    seqs = UserSequences.from_sorted(user, item, order, 30)
    for split in ("valid", "test"):
        examples = make_splits(seqs, DataConfig(max_history=6))[split]
        history, times = np.asarray(examples.history), history_times(seqs, examples)
        assert times.shape == history.shape
        real = history >= 0
        np.testing.assert_array_equal(times[real] % 97, history[real])


def test_quality_table_and_seed_aggregate_carry_the_hstu_row():
    import importlib.util
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "bench"
    spec = importlib.util.spec_from_file_location("quality", bench / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)

    def result(ndcg: float) -> dict:
        metrics = {"recall@5": 0.05, "ndcg@5": 0.03, "recall@10": 0.08, "ndcg@10": ndcg}
        return {
            "name": "tiny", "command": "python bench/quality.py --name tiny", "date": "2026-01-01", "device": "CPU",
            "ours": {"valid": metrics, "test": metrics}, "popularity": {"valid": metrics, "test": metrics},
            "hstu": {"valid": metrics, "test": metrics, "best_epoch": 3}, "published": {}, "published_sources": {},
            "seconds": {"pipeline": 60.0, "hstu": 120.0},
        }

    table = quality.markdown(result(0.04))
    assert "| HSTU (ours, CE) | 0.0500 | 0.0300 | 0.0800 | 0.0400 | measured |" in table and "HSTU 2.0 min" in table
    combined = quality.aggregate([result(0.04), result(0.06)], [0, 1])
    assert combined["hstu"]["test"]["ndcg@10"] == pytest.approx(0.05)
    assert combined["hstu"]["test_std"]["ndcg@10"] == pytest.approx(0.0141421, rel=1e-4)
