"""A trained session reward model, ready to score: tower outputs -> signal values -> reward.

<out>/reward/ holds model.safetensors and reward.json (the signals, the regression targets'
mean/std, the model shape); `load_reward` puts them back together for IPA and evaluation.

Shape legend: B users, N candidate sessions per user, S history length, M session items,
K signals.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from onerec.align.reward_model import SessionRewardModel
from onerec.checkpoint import load_weights
from onerec.config import RewardConfig, SignalConfig
from onerec.model.onerec import lookup_codes


class RewardScorer:
    """A trained reward model with what it needs to turn tower outputs into signal values."""

    def __init__(self, model: SessionRewardModel, signals: list[SignalConfig], mean_K, std_K, codes_NL) -> None:
        self.model = model.eval()
        self.signals = signals
        device = next(model.parameters()).device
        self.binary_K = torch.tensor([s.kind == "binary" for s in signals], device=device)
        self.mean_K = torch.as_tensor(mean_K, dtype=torch.float32, device=device)
        self.std_K = torch.as_tensor(std_K, dtype=torch.float32, device=device)
        self.weight_K = torch.tensor([s.weight for s in signals], dtype=torch.float32, device=device)
        self.codes_NL = codes_NL.to(device)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.signals]

    def outputs(self, history_BS: torch.Tensor, sessions_BM: torch.Tensor) -> torch.Tensor:
        """Raw tower outputs [B, K]: logits (binary) and z-scores (regression)."""
        device = self.codes_NL.device
        history_BS, sessions_BM = history_BS.to(device), sessions_BM.to(device)
        return self.model(
            history_BS, lookup_codes(history_BS, self.codes_NL), sessions_BM, lookup_codes(sessions_BM, self.codes_NL)
        )

    def signal_values(self, raw_BK: torch.Tensor) -> torch.Tensor:
        """Predicted rates (binary) and values in the signal's own unit (regression)."""
        return torch.where(self.binary_K, torch.sigmoid(raw_BK), raw_BK * self.std_K + self.mean_K)

    def reward(self, raw_BK: torch.Tensor) -> torch.Tensor:
        """The IPA reward: sum_k weight_k * (rate_k for binary, z-score_k for regression)."""
        return (torch.where(self.binary_K, torch.sigmoid(raw_BK), raw_BK) * self.weight_K).sum(-1)

    @torch.no_grad()
    def score_sessions(self, history_BS: torch.Tensor, sessions_BNM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward [B, N], signal values [B, N, K]) for N candidate sessions per user."""
        B, N, M = sessions_BNM.shape
        history_xS = history_BS.repeat_interleave(N, dim=0)
        raw = self.outputs(history_xS, sessions_BNM.reshape(B * N, M))
        return self.reward(raw).view(B, N), self.signal_values(raw).view(B, N, -1)


def model_kwargs(cfg: RewardConfig, num_items: int, codebook_sizes: list[int], num_signals: int, max_history: int):
    return {
        "num_items": num_items,
        "codebook_sizes": list(codebook_sizes),
        "num_signals": num_signals,
        "max_history": max_history,
        "d_model": cfg.d_model,
        "num_heads": cfg.num_heads,
        "session_layers": cfg.layers,
        "dropout": cfg.dropout,
    }


def load_reward(directory: Path, codes_NL: torch.Tensor, device: torch.device | str = "cpu") -> RewardScorer:
    directory = Path(directory)
    meta_path = directory / "reward.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory}: no reward.json; run `onerec reward` first")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    model = SessionRewardModel(**meta["model"])
    load_weights(model, directory / "model.safetensors")
    signals = [SignalConfig(**s) for s in meta["signals"]]
    return RewardScorer(model.to(device), signals, meta["target_mean"], meta["target_std"], codes_NL)
