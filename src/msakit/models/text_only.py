"""Text-only baseline: a (fine-tuned) text encoder, masked mean pooling, a small regression head.

Not from a paper: the reference point every multimodal model must beat, and the model of the
real-data check on the CMU-MOSI transcripts. Mean pooling (not [CLS]) because all-MiniLM-L6-v2 was
trained to be read that way.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from msakit.data.schema import Batch, FeatureDims
from msakit.models.base import RATE, SIZE, ModelConfig, MSAModel, Output, setting
from msakit.models.layers.pooling import masked_mean
from msakit.models.layers.text import TextEncoder
from msakit.models.registry import register_model


@dataclass
class TextOnlyConfig(ModelConfig):
    """Width of the head's hidden layer and its dropout."""

    hidden: int = setting(128, SIZE)
    dropout: float = setting(0.1, RATE)


@register_model("text_only")
class TextOnly(MSAModel):
    """Text-only baseline: encoder, mean pooling, MLP head (the bar multimodal models must clear)."""

    config_class = TextOnlyConfig
    modalities = ("text",)

    def __init__(self, config: TextOnlyConfig, dims: FeatureDims) -> None:
        super().__init__(config, dims)
        self.text_encoder = TextEncoder(config, dims)
        self.head = nn.Sequential(
            nn.Dropout(config.dropout),
            nn.Linear(self.text_encoder.out_dim, config.hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, 1),
        )

    def forward(self, batch: Batch) -> Output:
        states, mask = self.text_encoder(batch)
        pooled = masked_mean(states, mask)
        return Output(pred=self.head(pooled).squeeze(-1), features={"text": pooled})
