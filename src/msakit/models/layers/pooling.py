"""Sequence pooling that respects masks: padded steps never reach a pooled vector.

Masks are (B, L) bool, True where a step is valid. A sample whose mask is all False (a modality a
missing-data protocol removed, or one the dataset never had) pools to a zero vector rather than NaN.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` (B, L, D) over its valid steps -> (B, D); zeros where no step is valid."""
    weights = mask.unsqueeze(-1).to(x.dtype)
    # masked_fill rather than multiplication: padded values may be inf or NaN (raw -inf audio)
    total = x.masked_fill(~mask.unsqueeze(-1), 0.0).sum(1)
    return total / weights.sum(1).clamp(min=1.0)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max of `x` (B, L, D) over its valid steps -> (B, D); zeros where no step is valid."""
    pooled = x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
    return pooled.masked_fill(~mask.any(dim=1, keepdim=True), 0.0)


def valid_lengths(mask: torch.Tensor) -> torch.Tensor:
    """(B,) long: one past the last valid step, 0 for a sample with no valid step.

    For right-padded masks this is the number of valid steps; a gap inside the sequence (e.g. an
    all-zero text feature vector) does not shorten it.
    """
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (positions * mask.long()).amax(dim=1)


def last_valid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The state of `x` (B, L, D) at each sample's last valid step -> (B, D); zeros if none."""
    lengths = valid_lengths(mask)
    index = (lengths - 1).clamp(min=0)
    picked = x[torch.arange(x.shape[0], device=x.device), index]
    return picked.masked_fill((lengths == 0).unsqueeze(-1), 0.0)
