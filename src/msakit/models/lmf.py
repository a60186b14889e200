"""LMF: Low-rank Multimodal Fusion (Liu et al., "Efficient Low-rank Multimodal Fusion with
Modality-Specific Factors", ACL 2018), as trained by the MMSA framework (thuiar/MMSA,
models/singleTask/LMF.py).

LMF keeps TFN's unimodal subnetworks (see `msakit.models.tfn`): z_t from an LSTM over the text,
z_a and z_v from MLPs over time-averaged audio and vision. TFN's fusion, a weight tensor W applied
to z = [1; z_t] (x) [1; z_a] (x) [1; z_v], is never formed: W is constrained to rank r,
W = sum_i w^(i)_t (x) w^(i)_a (x) w^(i)_v, so that

    W . z = sum_{i=1..r} prod_{m in t,a,v} (w^(i)_m . [1; z_m])

costs O(r sum_m d_m) instead of O(prod_m d_m). As in MMSA the fused output is one number per rank
factor, and the prediction is a learned weighting of the r products:

    y = sum_i lambda_i prod_m (w^(i)_m . [1; z_m]) + b

Deviations from MMSA:
- The same as TFN's: masked time averages and packed LSTM (MMSA includes padding), BatchNorm on
  running statistics for a one-sample training batch, sizes read from the data.
- MMSA lists a fourth, post-fusion dropout that its LMF never applies; there is no such setting.
- `features["fused"]` is the (B, rank) vector of per-factor products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from msakit.data.schema import Batch, FeatureDims
from msakit.models.base import RATE, SIZE, ModelConfig, MSAModel, Output, setting
from msakit.models.layers.subnets import UnimodalSubnets, with_one
from msakit.models.registry import register_model


@dataclass
class LMFConfig(ModelConfig):
    """LMF's settings; the defaults are MMSA's MOSI values."""

    text_hidden: int = setting(128, SIZE)  # LSTM width
    audio_hidden: int = setting(16, SIZE)
    vision_hidden: int = setting(128, SIZE)
    text_out: int = setting(64, SIZE)  # MMSA: text_hidden // 2
    rank: int = setting(3, SIZE)
    audio_dropout: float = setting(0.3, RATE)
    vision_dropout: float = setting(0.3, RATE)
    text_dropout: float = setting(0.0, RATE)


@register_model("lmf")
class LMF(MSAModel):
    """Low-rank Multimodal Fusion: TFN's fusion with a rank-r factorised weight tensor."""

    config_class = LMFConfig

    def __init__(self, config: LMFConfig, dims: FeatureDims) -> None:
        super().__init__(config, dims)
        self.subnets = UnimodalSubnets(config, dims)
        # one (d_m + 1) x rank factor per modality: column i is w^(i)_m
        self.text_factor = nn.Parameter(torch.empty(config.text_out + 1, config.rank))
        self.audio_factor = nn.Parameter(torch.empty(config.audio_hidden + 1, config.rank))
        self.vision_factor = nn.Parameter(torch.empty(config.vision_hidden + 1, config.rank))
        self.rank_weights = nn.Parameter(torch.empty(config.rank, 1))
        self.bias = nn.Parameter(torch.zeros(1))
        for factor in (self.text_factor, self.audio_factor, self.vision_factor, self.rank_weights):
            nn.init.xavier_normal_(factor)

    def forward(self, batch: Batch) -> Output:
        z_t, z_a, z_v = self.subnets(batch)
        products = (
            (with_one(z_t) @ self.text_factor)
            * (with_one(z_a) @ self.audio_factor)
            * (with_one(z_v) @ self.vision_factor)
        )  # (B, rank)
        pred = (products @ self.rank_weights).squeeze(-1) + self.bias
        return Output(
            pred=pred, features={"fused": products, "text": z_t, "audio": z_a, "vision": z_v}
        )
