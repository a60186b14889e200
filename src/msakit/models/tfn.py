"""TFN: Tensor Fusion Network (Zadeh et al., "Tensor Fusion Network for Multimodal Sentiment
Analysis", EMNLP 2017), as trained by the MMSA framework (thuiar/MMSA, models/singleTask/TFN.py).

Unimodal embeddings:
    z_t = W_t Dropout(LSTM(text)_final)                                      (text subnetwork)
    z_a = MLP_a(Dropout(BatchNorm(mean_time(audio))))    3 x (Linear, ReLU)  (audio subnetwork)
    z_v = MLP_v(Dropout(BatchNorm(mean_time(vision))))                       (vision subnetwork)
Tensor fusion: the outer product of the embeddings, each extended by a constant 1 so that the
unimodal and bimodal terms survive next to the trimodal ones:
    z_m = [1; z_t] (x) [1; z_a] (x) [1; z_v]      flattened, (d_t + 1)(d_a + 1)(d_v + 1) values
Inference: y = B tanh(W_3 ReLU(W_2 ReLU(W_1 Dropout(z_m))) / 2), i.e. 2B sigmoid(.) - B: the
output is squashed into (-B, B) with B = `output_bound` (3: MMSA's 6 sigmoid(.) - 3).

Deviations from MMSA:
- Audio and vision are averaged over their valid frames only (MMSA averages over the padded
  length, zeros included), and the LSTM runs over the valid tokens only (packed sequences).
- The text dropout acts on the LSTM's final state, where the original code meant it to; MMSA's
  one-layer LSTM subnetwork silently sets it to 0, which is why our YAML sets `text_dropout: 0`.
- A training batch of one sample is normalised with the running BatchNorm statistics (batch
  statistics of one sample are undefined; MMSA crashes there).
- Feature sizes come from the data and the text encoder, never from the config.
- `features["fused"]` is the last post-fusion hidden layer, not the (large) fusion tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from msakit.data.schema import Batch, FeatureDims
from msakit.models.base import POSITIVE, RATE, SIZE, ModelConfig, MSAModel, Output, setting
from msakit.models.layers.subnets import UnimodalSubnets, with_one
from msakit.models.registry import register_model


@dataclass
class TFNConfig(ModelConfig):
    """TFN's settings; the defaults are MMSA's MOSI values."""

    text_hidden: int = setting(128, SIZE)  # LSTM width
    audio_hidden: int = setting(32, SIZE)
    vision_hidden: int = setting(128, SIZE)
    text_out: int = setting(32, SIZE)  # text embedding size after the LSTM's linear layer
    post_fusion_dim: int = setting(64, SIZE)
    audio_dropout: float = setting(0.3, RATE)
    vision_dropout: float = setting(0.3, RATE)
    text_dropout: float = setting(0.0, RATE)
    post_fusion_dropout: float = setting(0.5, RATE)
    # predictions lie in (-bound, bound); None = unbounded
    output_bound: float | None = setting(3.0, POSITIVE.or_null())


@register_model("tfn")
class TFN(MSAModel):
    """Tensor Fusion Network: the 3-way outer product of unimodal embeddings, then an MLP."""

    config_class = TFNConfig

    def __init__(self, config: TFNConfig, dims: FeatureDims) -> None:
        super().__init__(config, dims)
        self.subnets = UnimodalSubnets(config, dims)
        fusion_dim = (config.text_out + 1) * (config.audio_hidden + 1) * (config.vision_hidden + 1)
        self.post_fusion = nn.Sequential(
            nn.Dropout(config.post_fusion_dropout),
            nn.Linear(fusion_dim, config.post_fusion_dim), nn.ReLU(),
            nn.Linear(config.post_fusion_dim, config.post_fusion_dim), nn.ReLU(),
        )
        self.out = nn.Linear(config.post_fusion_dim, 1)

    def forward(self, batch: Batch) -> Output:
        z_t, z_a, z_v = self.subnets(batch)
        fusion = torch.einsum("bi,bj,bk->bijk", with_one(z_t), with_one(z_a), with_one(z_v))
        hidden = self.post_fusion(fusion.flatten(1))
        pred = self.out(hidden).squeeze(-1)
        if self.config.output_bound is not None:
            pred = self.config.output_bound * torch.tanh(pred / 2)
        return Output(
            pred=pred, features={"fused": hidden, "text": z_t, "audio": z_a, "vision": z_v}
        )
