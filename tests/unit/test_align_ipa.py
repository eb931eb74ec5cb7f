"""Session generation and one IPA round on a tiny problem with a planted reward."""

import math

import numpy as np
import pytest
import torch

from onerec.align.ipa import Prompts, evaluate_alignment, latest_training_prompts, round_users
from onerec.config import AlignConfig, ModelConfig, MoEConfig
from onerec.inference.beam_search import constrained_beam_search, generate_sessions
from onerec.model.onerec import OneRecModel, lookup_codes
from onerec.tokenizer.trie import build_trie

SIZES = [4, 4]
NUM_ITEMS = 16  # every (c1, c2) pair is one item: item = 4 * c1 + c2
CODES = torch.stack([torch.arange(NUM_ITEMS) // 4, torch.arange(NUM_ITEMS) % 4], 1)
GOOD = torch.arange(NUM_ITEMS) % 4 == 3  # the planted preference: items whose last code is 3


def tiny_model(session_len: int, seed: int = 0) -> OneRecModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, num_heads=2, encoder_layers=1, decoder_layers=1, d_ff=64, dropout=0.0,
                      moe=MoEConfig(num_experts=2, top_k=1))
    return OneRecModel(cfg, SIZES, max_history=4, session_len=session_len)


class PlantedReward:
    """Reward = share of the session's items in GOOD; one binary signal."""

    names = ["good"]

    def score_sessions(self, history_BS, sessions_BNM):
        good = GOOD[sessions_BNM.clamp(min=0)] & (sessions_BNM >= 0)
        share = good.float().mean(-1)
        return share, share.unsqueeze(-1)


def test_generated_sessions_are_real_distinct_and_extend_item_search():
    model = tiny_model(session_len=2).eval()
    trie = build_trie(CODES, SIZES)
    history = torch.tensor([[1, 5, 9, 2], [-1, -1, 3, 4]])
    out = generate_sessions(model, lookup_codes(history, CODES), trie, num_sessions=6, session_len=2,
                            history_items_BS=history)
    assert out.items_BWM.shape == (2, 6, 2) and out.codes_BWML.shape == (2, 6, 2, 2)
    assert (out.items_BWM >= 0).all()
    torch.testing.assert_close(out.codes_BWML, CODES[out.items_BWM])  # codes and items agree
    for b in range(2):
        assert len({tuple(s) for s in out.items_BWM[b].tolist()}) == 6  # distinct sessions
        assert (out.scores_BW[b][:-1] >= out.scores_BW[b][1:]).all()
    one = generate_sessions(model, lookup_codes(history, CODES), trie, 5, 1, history_items_BS=history)
    items = constrained_beam_search(model, lookup_codes(history, CODES), trie, 5, history_items_BS=history)
    torch.testing.assert_close(one.items_BWM[..., 0], items.items_BW)
    torch.testing.assert_close(one.scores_BW, items.scores_BW)


def test_latest_training_prompts_take_each_users_last_prefix():
    user = np.array([0, 0, 1, 2, 2, 2])
    history = np.arange(6)[:, None].repeat(2, 1)
    prompts = latest_training_prompts(user, history, history[:, :1])
    np.testing.assert_array_equal(prompts.user, [0, 1, 2])
    np.testing.assert_array_equal(prompts.history[:, 0], [1, 2, 5])


def _old_latest_training_prompts(user, history, target) -> Prompts:
    """The implementation before it read the CSR offsets (the oracle): scans every example's user."""
    last = np.flatnonzero(np.r_[user[1:] != user[:-1], True]) if len(user) else np.zeros(0, dtype=np.int64)
    return Prompts(user[last], history[last], target[last])


@pytest.mark.parametrize("split", ["leave_one_out", "time"])
def test_latest_training_prompts_of_a_split_read_only_each_users_last_row(split, monkeypatch):
    from onerec.config import DataConfig
    from onerec.data.splits import Examples, UserSequences, make_splits

    g = np.random.default_rng(3)
    lengths = g.integers(0, 12, size=40)  # empty, short (no training example) and longer users
    lengths[-1] = 0  # a trailing user without examples
    user_index = np.repeat(np.arange(40), lengths)
    orders = np.sort(g.integers(0, 10_000, size=len(user_index)))  # global time, increasing per user
    seqs = UserSequences.from_sorted(user_index, g.integers(0, 30, size=len(user_index)), orders, num_users=40)
    cfg = DataConfig(split=split, max_history=5, session_len=3, valid_fraction=0.2, test_fraction=0.2)
    train = make_splits(seqs, cfg)["train"]
    expected = _old_latest_training_prompts(train.user, train.history, train.target)
    gathered = []
    column = Examples.column
    monkeypatch.setattr(Examples, "column", lambda self, name, rows: gathered.append(len(rows)) or column(self, name, rows))
    prompts = latest_training_prompts(train.user, train.history, train.target)
    assert len(prompts) == len(expected) > 0
    for got, want in ((prompts.user, expected.user), (prompts.history, expected.history), (prompts.target, expected.target)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert len(train) > 2 * len(prompts) and max(gathered) == len(prompts)  # one row per user, never all rows
    empty = Examples(train.offsets, train.items, np.zeros(40, dtype=np.int64), 1, np.zeros(40, dtype=np.int64), 5, 3)
    none = latest_training_prompts(empty.user, empty.history, empty.target)
    assert len(none) == 0 and none.history.shape == (0, 5) and none.target.shape == (0, 3)


def _sample(model, scorer, prompts, num_samples=8, batch_size=16, rows=None):
    from onerec.align.sampling import sample_pairs

    rows = torch.arange(len(prompts)) if rows is None else rows
    picked = rows.clamp(min=0).numpy()
    return sample_pairs(
        model, scorer, torch.as_tensor(prompts.history[picked]), torch.as_tensor(prompts.user[picked]),
        torch.as_tensor(prompts.target[picked]), rows, CODES, build_trie(CODES, SIZES), num_samples, 2, batch_size,
        torch.device("cpu"),
    )


def test_one_ipa_round_through_the_trainer_raises_the_reward_of_generations(tmp_path):
    """Sample pairs with the model, then DPO + NTP on them through the shared Trainer (a
    one-process gloo group), as `onerec dpo` runs a round."""
    from onerec.align.dpo_training import round_statistics, round_train_config, train_on_pairs
    from onerec.config import LoggingConfig, TrainConfig
    from onerec.distributed.deepspeed import init_distributed
    from onerec.logging import RunLogger

    dist_info = init_distributed("cpu")
    model = tiny_model(session_len=2, seed=1)
    trie = build_trie(CODES, SIZES)
    g = torch.Generator().manual_seed(0)
    users = 64
    history = torch.randint(0, NUM_ITEMS, (users, 4), generator=g).numpy()
    target = torch.randint(0, NUM_ITEMS, (users, 2), generator=g).numpy()  # real next sessions: uniform
    prompts = Prompts(np.arange(users), history, target)
    cfg = AlignConfig(rounds=1, num_samples=8, beta=0.5, dpo_weight=1.0, lr=3e-3, batch_size=16, epochs_per_round=3)
    scorer = PlantedReward()

    def measure():
        return evaluate_alignment(model, scorer, prompts, target[:, 0], CODES, trie, num_samples=8, session_len=2,
                                  beam_width=10, ks=[5, 10], batch_size=32, device=torch.device("cpu"))

    before = measure()
    table = _sample(model, scorer, prompts)
    assert len(table) == users and table.row_R.tolist() == list(range(users))
    pairs = table.usable()
    assert len(pairs) > 0 and (pairs.chosen_reward_R > pairs.rejected_reward_R).all()
    train_cfg = round_train_config(cfg, TrainConfig(), world_size=1)
    logger = RunLogger(LoggingConfig(), tmp_path, "dpo", {})
    fit = train_on_pairs(model, pairs, CODES, cfg, train_cfg, tmp_path / "round_1", dist_info, logger, {}, seed=0)
    logger.close()
    assert fit.steps == 3 * math.ceil(len(pairs) / 16)  # align.epochs_per_round x steps per epoch
    stats = round_statistics(model, pairs, CODES, cfg, torch.device("cpu"), 0, 1, None, fit.steps, len(table))
    after = measure()
    assert stats.pairs == len(pairs) and stats.chosen_reward > stats.rejected_reward
    assert stats.preference_accuracy > 0.5 and stats.dpo_loss < math.log(2)
    assert after["reward_mean"] > before["reward_mean"] + 0.05, (before, after)
    assert set(after["per_signal"]) == {"good"} and "recall@10" in after
    assert list((tmp_path / "round_1" / "checkpoints").glob("step_*")), "the Trainer checkpoints the round"


def test_a_users_pair_does_not_depend_on_its_batch_or_shard():
    """The rows a rank samples for its share (strided, padded with -1 rows) are the rows of the
    whole round: gathered back in row order they are the one-process table."""
    from onerec.align.pairs import PairTable, gather_rows, shard_rows

    model = tiny_model(session_len=2, seed=3)
    g = torch.Generator().manual_seed(1)
    prompts = Prompts(np.arange(11), torch.randint(0, NUM_ITEMS, (11, 4), generator=g).numpy(),
                      torch.randint(0, NUM_ITEMS, (11, 2), generator=g).numpy())
    whole = gather_rows(_sample(model, PlantedReward(), prompts, batch_size=4), 1, torch.device("cpu"))
    shares = [_sample(model, PlantedReward(), prompts, batch_size=3, rows=shard_rows(11, r, 3)) for r in range(3)]
    assert [len(s) for s in shares] == [4, 4, 4] and (shares[2].row_R == -1).sum() == 1
    merged = gather_rows(PairTable.concat(shares), 1, torch.device("cpu"))
    for name, value in whole.tensors().items():
        torch.testing.assert_close(getattr(merged, name), value, msg=name)


def test_pairs_file_round_trips_without_pickle(tmp_path):
    from onerec.align.pairs import load_pairs, save_pairs
    from onerec.errors import CorruptFileError

    model = tiny_model(session_len=2, seed=4)
    g = torch.Generator().manual_seed(2)
    prompts = Prompts(np.arange(5), torch.randint(0, NUM_ITEMS, (5, 4), generator=g).numpy(),
                      torch.randint(0, NUM_ITEMS, (5, 2), generator=g).numpy())
    table = _sample(model, PlantedReward(), prompts, num_samples=4)
    save_pairs(tmp_path / "pairs.safetensors", table, {"round": 3})
    loaded, meta = load_pairs(tmp_path / "pairs.safetensors")
    assert meta == {"round": 3} and not list(tmp_path.glob(".*tmp*"))
    for name, value in table.tensors().items():
        assert torch.equal(getattr(loaded, name), value), name
    (tmp_path / "broken.safetensors").write_bytes((tmp_path / "pairs.safetensors").read_bytes()[:100])
    with pytest.raises(CorruptFileError, match="broken.safetensors"):
        load_pairs(tmp_path / "broken.safetensors")


def test_round_users_depend_on_seed_and_round_only():
    first = round_users(7, 1, 1000, 0.01)
    assert len(first) == 10 and (np.diff(first) > 0).all()
    np.testing.assert_array_equal(round_users(7, 1, 1000, 0.01), first)
    assert not np.array_equal(round_users(7, 2, 1000, 0.01), first)
    assert len(round_users(7, 1, 5, 0.01)) == 1 and len(round_users(7, 1, 3, 1.0)) == 3


def test_held_out_recall_follows_the_exclude_history_rule():
    """Targets taken from the history: found when history items may be recommended, never
    when evaluate_alignment leaves them out as the evaluate stage does."""
    model = tiny_model(session_len=2, seed=2)
    trie = build_trie(CODES, SIZES)
    history = torch.randint(0, NUM_ITEMS, (32, 4), generator=torch.Generator().manual_seed(3)).numpy()
    prompts = Prompts(np.arange(32), history, history[:, -2:])
    common = dict(num_samples=4, session_len=2, beam_width=10, ks=[5, 10], batch_size=16, device=torch.device("cpu"))
    allowed = evaluate_alignment(model, PlantedReward(), prompts, history[:, -1], CODES, trie, **common)
    excluded = evaluate_alignment(model, PlantedReward(), prompts, history[:, -1], CODES, trie, exclude_history=True, **common)
    assert allowed["recall@10"] > 0 and excluded["recall@10"] == 0
