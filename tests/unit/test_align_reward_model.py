"""The session reward model: shapes, padding, and learning a planted signal."""

import torch

from onerec.align.reward_model import SessionRewardModel

SIZES = [4, 4]


def codes_of(items, codes_NL):
    out = codes_NL[items.clamp(min=0)]
    return out.masked_fill((items < 0).unsqueeze(-1), -1)


def test_session_padding_does_not_change_the_score():
    torch.manual_seed(0)
    codes = torch.randint(0, 4, (10, 2))
    model = SessionRewardModel(10, SIZES, num_signals=2, max_history=4, d_model=16, dropout=0.0).eval()
    history = torch.tensor([[-1, 1, 2, 3]])
    short = torch.tensor([[4, 5]])
    padded = torch.tensor([[4, 5, -1]])
    a = model(history, codes_of(history, codes), short, codes_of(short, codes))
    b = model(history, codes_of(history, codes), padded, codes_of(padded, codes))
    assert a.shape == (1, 2)
    torch.testing.assert_close(a, b)
    empty_history = torch.full((1, 4), -1)
    assert torch.isfinite(model(empty_history, codes_of(empty_history, codes), short, codes_of(short, codes))).all()


def test_learns_a_planted_target_aware_signal():
    # "like" = 1 when the session contains an item of the same parity group as the user's last item.
    torch.manual_seed(0)
    num_items = 20
    codes = torch.stack([torch.arange(num_items) % 4, torch.arange(num_items) // 5], 1)
    users = 512
    history = torch.randint(0, num_items, (users, 3))
    session = torch.randint(0, num_items, (users, 2))
    label = ((session % 2) == (history[:, -1:] % 2)).all(1).float()
    model = SessionRewardModel(num_items, SIZES, 1, max_history=3, d_model=32, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    hc, sc = codes_of(history, codes), codes_of(session, codes)
    for _ in range(300):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(history, hc, session, sc)[:, 0], label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores = model(history, hc, session, sc)[:, 0]
    accuracy = ((scores > 0).float() == label).float().mean()
    assert accuracy > 0.95, accuracy


def test_reward_config_maps_onto_the_trainer_with_a_global_batch_split_over_the_ranks(caplog):
    from onerec.align.reward_training import reward_train_config
    from onerec.config import RewardConfig, TrainConfig

    reward = RewardConfig(batch_size=64, lr=2e-3, max_epochs=7, patience=2)
    train = TrainConfig(resume="auto", keep_checkpoints=3, log_every=5, max_nonfinite_steps=4, lr=9.0, warmup_steps=50)
    one, four = (reward_train_config(reward, train, num_sessions=1000, world_size=w) for w in (1, 4))
    assert (one.batch_size, four.batch_size) == (64, 16)  # per rank: the global batch stays 64
    assert one.eval_every == one.checkpoint_every == four.eval_every == 16  # one epoch: ceil(1000 / 64) steps
    assert (one.lr, one.warmup_steps, one.min_lr_ratio, one.max_epochs, one.patience) == (2e-3, 0, 1.0, 7, 2)
    assert (one.resume, one.keep_checkpoints, one.log_every, one.max_nonfinite_steps) == ("auto", 3, 5, 4)
    assert "not a multiple" not in caplog.text
    odd = reward_train_config(reward, train, num_sessions=1000, world_size=3)
    assert odd.batch_size == 22 and "reward.batch_size=64 is not a multiple of the 3 ranks" in caplog.text
