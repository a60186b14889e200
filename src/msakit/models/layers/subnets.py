"""The unimodal subnetworks of TFN and LMF (Zadeh et al. 2017; Liu et al. 2018), shared by both."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from msakit.data.schema import Batch, FeatureDims
from msakit.models.base import ModelConfig
from msakit.models.layers.pooling import masked_mean, valid_lengths
from msakit.models.layers.text import TextEncoder


class FrameSubNet(nn.Module):
    """Audio/vision subnetwork of TFN and LMF: BatchNorm, dropout, three ReLU layers."""

    def __init__(self, in_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_dim)
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_dim) pooled features -> (B, hidden)."""
        if self.training and x.shape[0] == 1:
            norm = self.norm
            normed = F.batch_norm(
                x, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                training=False, eps=norm.eps,
            )
        else:
            normed = self.norm(x)
        return self.mlp(self.dropout(normed))


class TextSubNet(nn.Module):
    """Text subnetwork of TFN and LMF: an LSTM over the valid tokens, its final state projected."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.rnn = nn.LSTM(in_dim, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden, out_dim)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """states: (B, L, D), mask: (B, L) bool -> (B, out_dim)."""
        # a sample without any valid token runs one zeroed step: finite, and blind to padding
        lengths = valid_lengths(mask).clamp(min=1).cpu()
        states = states.masked_fill(~mask.unsqueeze(-1), 0.0)
        packed = pack_padded_sequence(states, lengths, batch_first=True, enforce_sorted=False)
        _, (final, _) = self.rnn(packed)
        return self.linear(self.dropout(final[-1]))


def with_one(x: torch.Tensor) -> torch.Tensor:
    """[1; x]: append a constant 1 so products of embeddings keep their lower-order terms."""
    return torch.cat([x.new_ones(x.shape[0], 1), x], dim=1)


class UnimodalSubnets(nn.Module):
    """The three subnetworks TFN and LMF share: z_t from an LSTM over the text, z_a and z_v from
    the time-averaged audio and vision. The config needs text_hidden, text_out, text_dropout,
    audio_hidden, audio_dropout, vision_hidden and vision_dropout."""

    def __init__(self, config: ModelConfig, dims: FeatureDims) -> None:
        super().__init__()
        self.text_encoder = TextEncoder(config, dims)
        self.text = TextSubNet(
            self.text_encoder.out_dim, config.text_hidden, config.text_out, config.text_dropout
        )
        self.audio = FrameSubNet(dims.audio, config.audio_hidden, config.audio_dropout)
        self.vision = FrameSubNet(dims.vision, config.vision_hidden, config.vision_dropout)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_t, z_a, z_v): (B, text_out), (B, audio_hidden), (B, vision_hidden)."""
        z_t = self.text(*self.text_encoder(batch))
        z_a = self.audio(masked_mean(batch.audio, batch.audio_mask))
        z_v = self.vision(masked_mean(batch.vision, batch.vision_mask))
        return z_t, z_a, z_v
