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
