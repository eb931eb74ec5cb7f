"""Trie-constrained beam-search step; one entry point with backend="auto" | "reference" | "triton".

Only the reference implementation exists so far, so "auto" uses it on every device.
"""

from __future__ import annotations

import torch

from . import reference

__all__ = ["constrained_beam_step"]

_BACKENDS = ("auto", "reference", "triton")


def constrained_beam_step(
    logits_NC: torch.Tensor,
    beam_scores_N: torch.Tensor,
    states_N: torch.Tensor,
    child_tokens: torch.Tensor,
    child_nodes: torch.Tensor,
    beam_width: int,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens_N, parents_N, scores_N, states_N) of the next W beams per request; see reference.py."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {_BACKENDS}")
    if backend == "triton":
        raise NotImplementedError(
            "the Triton constrained_beam kernel does not exist yet; use backend='reference' or 'auto'"
        )
    return reference.constrained_beam_step(logits_NC, beam_scores_N, states_N, child_tokens, child_nodes, beam_width)
