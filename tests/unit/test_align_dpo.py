"""DPO loss and chosen/rejected selection."""

import math

import pytest
import torch

from onerec.align.dpo import dpo_loss, select_pairs, session_log_prob


def test_dpo_loss_matches_the_closed_form_on_a_hand_made_case():
    # margin = (-1 - -2) - (-3 - -2.5) = 1.5; beta 0.5 -> -log sigmoid(0.75)
    loss = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]), beta=0.5)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-0.75)), rel=1e-6)
    two = dpo_loss(torch.tensor([-1.0, 0.0]), torch.tensor([-3.0, 0.0]), torch.tensor([-2.0, 0.0]),
                   torch.tensor([-2.5, 1.0]), beta=0.5)  # second pair: margin 1 -> -log sigmoid(0.5)
    expected = (math.log1p(math.exp(-0.75)) + math.log1p(math.exp(-0.5))) / 2
    assert float(two) == pytest.approx(expected, rel=1e-6)


def test_dpo_loss_is_log_two_when_policy_equals_reference():
    chosen, rejected = torch.randn(5), torch.randn(5)
    assert float(dpo_loss(chosen, rejected, chosen, rejected, beta=0.1)) == pytest.approx(math.log(2), rel=1e-6)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(chosen, rejected, chosen, rejected, beta=0.0)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.zeros(3, requires_grad=True)
    rejected = torch.zeros(3, requires_grad=True)
    dpo_loss(chosen, rejected, torch.zeros(3), torch.zeros(3), beta=1.0).backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent raises chosen, lowers rejected


def test_session_log_prob_sums_real_tokens_only():
    logits = torch.log(torch.tensor([[[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]], [[0.2, 0.2, 0.6], [0.3, 0.3, 0.4]]]]))
    targets = torch.tensor([[[0, 1], [-1, -1]]])  # second item is padding
    assert float(session_log_prob(logits, targets)[0]) == pytest.approx(math.log(0.5) + math.log(0.8), rel=1e-6)
    with pytest.raises(ValueError, match="disagree"):
        session_log_prob(logits, targets[:, :1])


def test_select_pairs_picks_max_and_min_and_flags_ties():
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.0], [0.3, 0.3, 0.3, 0.3], [2.0, -1.0, 2.0, -1.0]])
    chosen, rejected, usable = select_pairs(rewards)
    assert chosen.tolist() == [1, 0, 0] and rejected.tolist() == [3, 0, 1]
    assert usable.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="samples"):
        select_pairs(torch.zeros(2, 1))
