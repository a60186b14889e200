"""MulT: Multimodal Transformer (Tsai et al., "Multimodal Transformer for Unaligned Multimodal
Language Sequences", ACL 2019), as trained by the MMSA framework (thuiar/MMSA,
models/singleTask/MULT.py; original code yaohungt/Multimodal-Transformer).

1. Temporal convolution to a common width d, per modality m in {t, a, v}:
       X_m = Conv1D(X_m, kernel k_m)                           (B, L_m, d), no bias
2. Crossmodal transformers: each target modality b reads each other modality a through a stack of
   `layers` crossmodal blocks (`msakit.models.layers.transformer`):
       Z_{a->b} = CM_{a->b}(X_b, X_a)                          (B, L_b, d)
   e.g. the text stream: Z_t = [Z_{a->t}; Z_{v->t}]            (B, L_t, 2d)
3. Memory: a self-attention transformer per target (`memory_layers` blocks) over Z_b; its state at
   the last valid step is the modality's summary h_b (2d).
4. Prediction from h = [h_t; h_a; h_v] (6d) through a residual block:
       y = W_o (h + W_2 Dropout(ReLU(W_1 h)))

The attention dropout of a crossmodal stack is chosen by its SOURCE modality (`attn_dropout` for
text, `attn_dropout_audio`, `attn_dropout_vision`), and `attn_dropout` serves the memory stacks, as
in MMSA. `causal_mask` is MulT's future mask (MMSA's `attn_mask: true`).

Trained as MMSA's MULT trainer does (the YAML's MMSA sections): Adam without weight decay
(`training.optimizer: adam`; MMSA lists a weight_decay its trainer never passes on), each gradient
clipped by value after every backward (`grad_clip_value`), 8 batches summed per step
(`accumulate_steps`), and ReduceLROnPlateau (factor 0.1, MMSA's `patience`) stepped after each
validation (`training.plateau`).

Deviations from MMSA:
- The plateau steps on the validation MAE, MMSA's on its validation L1 loss: the same error, but
  MMSA's is the mean of per-batch means (its last, smaller batch weighs more) rounded to 4 decimals.
- Padding is masked: padded frames are zeroed before the convolutions, masked out of every
  attention, and the summary is taken at each sample's last VALID step (MMSA reads the last padded
  step and lets attention see padding).
- Convolutions keep the sequence length ("same" padding) so masks stay aligned (MMSA uses no
  padding, which shortens each sequence by k - 1); they run even when a width already equals d.
- The causal mask's offset |L_k - L_q| is taken on each sample's valid lengths, not on the padded
  lengths, so the amount of padding in a batch cannot change a prediction.
- Sinusoidal positions are added, as in the paper and the original code (MMSA turns them off).
- MMSA's `nlevels` applies to the memory stacks as max(nlevels, 3); here `memory_layers` is its
  own setting (the YAML holds MMSA's effective values).
- Feature sizes come from the data and the text encoder, never from the config.
- Attention runs through `msakit.models.layers.block_attention`: the same function, but on a CPU
  a training pass never holds the (B, heads, L_b, L_a) weights, and its attention dropout masks
  are drawn block by block (p rounded to a multiple of 2^-15), not as `F.dropout` draws them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from msakit.data.schema import MODALITIES, Batch, FeatureDims
from msakit.models.base import RATE, SIZE, ModelConfig, MSAModel, Output, setting
from msakit.models.layers.pooling import last_valid
from msakit.models.layers.text import TextEncoder
from msakit.models.layers.transformer import (
    crossmodal_stacks,
    crossmodal_summaries,
    memory_stacks,
)
from msakit.models.registry import register_model


@dataclass
class MulTConfig(ModelConfig):
    """MulT's settings; the defaults are MMSA's MOSI values."""

    # d, the common width (MMSA: dst_feature_dim_nheads[0])
    embed_dim: int = setting(50, SIZE, divisible_by="num_heads")
    num_heads: int = setting(10, SIZE)
    layers: int = setting(4, SIZE)  # crossmodal blocks per stack (MMSA: nlevels)
    memory_layers: int = setting(4, SIZE)  # self-attention blocks per memory stack
    attn_dropout: float = setting(0.3, RATE)  # text as the source, and the memory stacks
    attn_dropout_audio: float = setting(0.2, RATE)
    attn_dropout_vision: float = setting(0.0, RATE)
    relu_dropout: float = setting(0.0, RATE)
    res_dropout: float = setting(0.0, RATE)
    embed_dropout: float = setting(0.2, RATE)
    output_dropout: float = setting(0.5, RATE)
    text_dropout: float = setting(0.5, RATE)  # on the text states before the convolution
    conv_kernel_text: int = setting(5, SIZE)
    conv_kernel_audio: int = setting(5, SIZE)
    conv_kernel_vision: int = setting(5, SIZE)
    causal_mask: bool = True


@register_model("mult")
class MulT(MSAModel):
    """Multimodal Transformer: every modality attends to the other two, then to itself."""

    config_class = MulTConfig

    def __init__(self, config: MulTConfig, dims: FeatureDims) -> None:
        super().__init__(config, dims)
        self.text_encoder = TextEncoder(config, dims)
        d = config.embed_dim
        widths = {"text": self.text_encoder.out_dim, "audio": dims.audio, "vision": dims.vision}
        kernels = {
            "text": config.conv_kernel_text,
            "audio": config.conv_kernel_audio,
            "vision": config.conv_kernel_vision,
        }
        self.proj = nn.ModuleDict({
            m: nn.Conv1d(widths[m], d, kernels[m], padding="same", bias=False) for m in MODALITIES
        })
        attn_dropout = {
            "text": config.attn_dropout,
            "audio": config.attn_dropout_audio,
            "vision": config.attn_dropout_vision,
        }
        shared = dict(
            relu_dropout=config.relu_dropout, res_dropout=config.res_dropout,
            embed_dropout=config.embed_dropout, causal=config.causal_mask,
        )
        self.cross = crossmodal_stacks(MODALITIES, d, config.num_heads, config.layers,
                                       attn_dropout, **shared)
        self.memory = memory_stacks(MODALITIES, d, config.num_heads, config.memory_layers,
                                    config.attn_dropout, **shared)
        combined = 6 * d
        self.proj1 = nn.Linear(combined, combined)
        self.proj2 = nn.Linear(combined, combined)
        self.out = nn.Linear(combined, 1)

    def _project(self, name: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D_m) -> (B, L, d); padded frames are zeroed so the kernel never reads them."""
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        return self.proj[name](x.transpose(1, 2)).transpose(1, 2)

    def forward(self, batch: Batch) -> Output:
        text, text_mask = self.text_encoder(batch)
        text = F.dropout(text, self.config.text_dropout, self.training)
        inputs = {
            "text": (text, text_mask),
            "audio": (batch.audio, batch.audio_mask),
            "vision": (batch.vision, batch.vision_mask),
        }
        seqs = {m: (self._project(m, x, mask), mask) for m, (x, mask) in inputs.items()}
        summaries = crossmodal_summaries(self.cross, self.memory, seqs, last_valid)
        fused = torch.cat([summaries[m] for m in MODALITIES], dim=-1)
        hidden = F.dropout(F.relu(self.proj1(fused)), self.config.output_dropout, self.training)
        hidden = fused + self.proj2(hidden)
        return Output(
            pred=self.out(hidden).squeeze(-1),
            features={"fused": fused, **summaries},
        )
