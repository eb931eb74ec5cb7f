import math

import pytest
import torch
import torch.nn.functional as F

from onerec.train.losses import next_token_loss


def _mask(sizes, c_max):
    return torch.arange(c_max)[None, :] < torch.tensor(sizes)[:, None]


def test_matches_cross_entropy_over_each_levels_real_codes():
    torch.manual_seed(0)
    sizes = [5, 5, 2]
    mask_LC = _mask(sizes, 5)
    logits = torch.randn(3, 2, 3, 5).masked_fill(~mask_LC, float("-inf"))
    targets = torch.stack([torch.randint(0, s, (3, 2)) for s in sizes], dim=-1)
    loss, n = next_token_loss(logits, targets, mask_LC)
    expected = torch.stack(
        [F.cross_entropy(logits[..., l, : sizes[l]].reshape(-1, sizes[l]), targets[..., l].reshape(-1), reduction="sum")
         for l in range(3)]
    ).sum() / targets.numel()
    assert n == targets.numel()
    torch.testing.assert_close(loss, expected)


def test_padding_items_carry_no_loss():
    torch.manual_seed(1)
    mask_LC = _mask([4, 4], 4)
    logits = torch.randn(2, 3, 2, 4)
    targets = torch.randint(0, 4, (2, 3, 2))
    padded = targets.clone()
    padded[:, 2] = -1
    loss_padded, n = next_token_loss(logits, padded, mask_LC)
    loss_cut, _ = next_token_loss(logits[:, :2], targets[:, :2], mask_LC)
    assert n == 8
    torch.testing.assert_close(loss_padded, loss_cut)


def test_label_smoothing_spreads_mass_over_real_codes_only():
    mask_LC = _mask([4, 2], 4)
    logits = torch.zeros(1, 1, 2, 4).masked_fill(~mask_LC, float("-inf"))  # uniform over real codes
    targets = torch.tensor([[[0, 1]]])
    loss, _ = next_token_loss(logits, targets, mask_LC, label_smoothing=0.3)
    # uniform predictions: every real code has log-prob -log(size), smoothed or not
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx((math.log(4) + math.log(2)) / 2)
