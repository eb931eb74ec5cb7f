"""A toy regression model for the training-loop tests (tests/unit/test_trainer.py,
tests/unit/test_checkpoint_ownership.py): small enough to train for a dozen steps in a
second, with dropout so that a resume is exact only if the RNG state is restored too."""

from __future__ import annotations

import torch

NUM_EXAMPLES = 96


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)
