"""CENet: Cross-modal Enhancement Network (Wang, Wu, Xu, Zhang, Zhang and Chen, "Cross-modal
Enhancement Network for Multimodal Sentiment Analysis", IEEE Transactions on Multimedia 2022), as
the MMSA framework implements and trains it (thuiar/MMSA @ a94e65d, models/singleTask/CENET.py and
trains/singleTask/CENET.py).

The non-verbal streams enter BERT between two of its layers: the input H (B, L, D) of layer
`injection_layer` (MMSA: 1, after the first layer) is replaced by the enhanced states

    A = W_a2 ReLU(W_a1 x_a + b_a1) + b_a2         V = W_v2 ReLU(W_v1 x_v + b_v1) + b_v2
    C_m = softmax(8 (H W_q^m)(M W_k^m)^T) (M W_v^m)     for (m, M) in {(v, V), (a, A)}
    H' = H + W_c [C_v; C_a] + b_c

(frame-level audio and vision of any length, projected to BERT's width D; per modality one
attention head, W_q, W_k, W_v affine, whose text queries read the frames, its scores multiplied by
8 as in MMSA, not divided by sqrt(D)). The remaining layers run on H'. The prediction reads the
last layer's first ([CLS]) state: y = W_o Dropout(tanh(W_h Dropout(h_cls))). BERT's embedding layer
is not trained (MMSA computes it under no_grad: `freeze_embeddings`). The enhancement and the head
start as MMSA's `init_weights` leaves them: weights N(0, initializer_range of the encoder, 0.02 for
BERT), biases 0. The trainer's task loss is MMSA's L1 (`training.loss: l1`). The attention is
computed with the frame transform's last layer and the key and value maps moved to the text side
(`FrameAttention`: the same function, products over L tokens instead of F frames, tested against
MMSA's order).

The text path. Layers before `injection_layer` always compute what the plain encoder computes.
With all-zero audio and vision, A and V are constant vectors, so each C_m is the one vector
W_v^m applied to that constant (attention over identical frames) and the injection adds the same vector
s_0 = W_c [C_v; C_a] + b_c to every token. s_0 = 0 while every bias of the enhancement is zero, as
it is at initialisation: there a zero non-verbal input leaves every hidden state the plain
encoder's. Once training has moved those biases, zero input shifts every token by s_0 (test).

Where this differs from MMSA, and the setting that restores MMSA's behaviour
(benchmarks/parity/cenet.py checks predictions, the loss and gradients):
- Padded frames (`mask_nonverbal_padding`, default true). MMSA's attention reads every frame of
  the pickle's padded length, the zero padding included (attended with the weight the zero frame's
  key earns). Here the text queries read the valid frames only. `false` restores MMSA (padded
  frames read as zeros, whatever they hold).
- A sample with no valid frame of a modality (absent from MMSA) attends one zero frame: the same
  enhancement as a zeroed stream, which is what a missing-data protocol leaves. The model ignores
  `presence`, as MMSA's does.
- Injection layer (`injection_layer`; MMSA hard-codes 1). It must be below the encoder's layer
  count (MMSA, with fewer layers, would never inject).
- The paper's feature transformation for the acoustic and visual modalities (in the authors' own
  code, Say2L/CENet) is not part of MMSA's implementation, which msakit follows: MMSA's CE accepts
  visual and acoustic ids that it never reads and projects the raw frames with the MLPs above.
- Unused modules are left out: MMSA builds part-of-speech, word-sentiment and polarity embeddings
  (AMIO asks for them) that never receive ids and so add nothing. MMSA's BERT computes its
  pooler, which nothing reads; the Hugging Face encoder here keeps its pooler, unread too.
- Optimiser (`training.optimizer: adam`, `adam_eps` and `decay_enhancement_biases` in the MMSA
  settings). MMSA: Adam with coupled L2 decay (eps 3e-8 MOSI and SIMSv2, 2e-8 SIMS,
  1e-8 MOSEI), every parameter at `learning_rate`, decayed except BERT's and the head's biases and
  LayerNorm gains, the enhancement's biases decayed too. msakit: the same Adam with L2 decay at
  MMSA's eps (`adam_eps`), the same rate and decay for the encoder (`encoder_lr`,
  `encoder_weight_decay`) and the rest (`lr`, `weight_decay`), no bias or norm decayed by default;
  `decay_enhancement_biases: true` (the MMSA settings) decays the enhancement's biases as MMSA
  does, leaving the head's undecayed (`decay_norms_and_biases` would decay both). The gradient
  norm is clipped at 2, as in MMSA.
- Selection (none needed). MMSA keeps the epoch with the best validation loss (KeyEval Loss, the
  mean of per-batch L1 losses) and stops after 8 epochs without improvement; msakit selects on
  validation MAE (the same up to the weight of the last, smaller batch), `patience: 8`. MMSA has
  no epoch ceiling; `epochs` here is one. MMSA's CENet trainer scores the test split only for its
  per-epoch log, never for selection; the YAML takes MMSA's settings as published.
- Precomputed text (`text_source: features`, absent from MMSA, whose CENet needs BERT): the
  encoder is the identity, so the enhancement shifts the precomputed states (padded steps zeroed)
  and the head reads their first step. The parity check's identity rows compare exactly this.
- The text width is the encoder's (MMSA's `feature_dims[0]`, 768, must equal BERT's).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from msakit.data.schema import Batch, FeatureDims
from msakit.errors import MsakitError
from msakit.models.base import COUNT, FLAG, RATE, ModelConfig, MSAModel, Output, ParameterGroup, setting
from msakit.models.layers.text import TextEncoder
from msakit.models.registry import register_model

SCORE_SCALE = 8.0  # MMSA multiplies the attention scores by 8
DEFAULT_INIT_STD = 0.02  # BERT's initializer_range, for an encoder that names none


@dataclass
class CENetConfig(ModelConfig):
    """CENet's settings; the defaults are MMSA's, except `mask_nonverbal_padding` (docstring)."""

    injection_layer: int = setting(1, COUNT)  # the BERT layer whose input is enhanced
    head_dropout: float = setting(0.1, RATE)  # BERT's hidden_dropout_prob, MMSA's head dropout
    freeze_embeddings: bool = setting(True, FLAG)  # MMSA runs BERT's embeddings under no_grad
    # the text reads only valid audio/vision frames; false: padded frames as zeros (MMSA)
    mask_nonverbal_padding: bool = setting(True, FLAG)
    # the enhancement's biases weight-decayed, as MMSA's optimiser does (the MMSA settings)
    decay_enhancement_biases: bool = setting(False, FLAG)


def frame_transform(in_dim: int, width: int) -> nn.Sequential:
    """Frames (B, L, in_dim) -> BERT's width: Linear, ReLU, Linear."""
    return nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, width))


class FrameAttention(nn.Module):
    """One head: text states query the frames of one modality (MMSA's SelfAttention, head_num 1)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def forward(self, text: torch.Tensor, hidden: torch.Tensor, projection: nn.Linear,
                mask: torch.Tensor) -> torch.Tensor:
        """text (B, L, D); hidden (B, F, D), the frames before the transform's last layer
        `projection` (M = projection(hidden)); mask (B, F) True where a frame is read -> (B, L, D).

        softmax(8 Q key(M)^T) value(M), computed without mapping the F frames through `projection`,
        `key` and `value` (F >> L: up to 500 frames for 50 tokens): the two maps of the keys are
        folded into the L queries, and as each row of attention weights sums to 1, `projection`
        and `value` (affine) apply to the mixed frames instead of to every frame."""
        query = self.query(text)
        folded = query @ self.key.weight @ projection.weight
        offset = query @ (self.key.weight @ projection.bias + self.key.bias)
        scores = SCORE_SCALE * (folded @ hidden.transpose(1, 2) + offset.unsqueeze(-1))
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        return self.value(projection(torch.softmax(scores, dim=-1) @ hidden))


class CrossModalEnhancement(nn.Module):
    """MMSA's CE: H + W_c [attention of H over V; attention of H over A] + b_c."""

    def __init__(self, width: int, audio_dim: int, vision_dim: int, mask_padding: bool) -> None:
        super().__init__()
        self.mask_padding = mask_padding
        self.vision_transform = frame_transform(vision_dim, width)
        self.audio_transform = frame_transform(audio_dim, width)
        self.vision_attention = FrameAttention(width)
        self.audio_attention = FrameAttention(width)
        self.combine = nn.Linear(2 * width, width)

    def _frames(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frames with padded ones zeroed (their values, even inf, never reach a product), and
        which of them the text reads: the valid ones (MMSA: all); with none, the first, zeroed."""
        frames = frames.masked_fill(~mask.unsqueeze(-1), 0.0)
        if not self.mask_padding:
            return frames, torch.ones_like(mask)
        read = mask.clone()
        read[:, 0] |= ~mask.any(dim=1)
        return frames, read

    def forward(self, text: torch.Tensor, audio: torch.Tensor, audio_mask: torch.Tensor,
                vision: torch.Tensor, vision_mask: torch.Tensor) -> torch.Tensor:
        vision, vision_read = self._frames(vision, vision_mask)
        audio, audio_read = self._frames(audio, audio_mask)
        from_vision = self.vision_attention(text, self.vision_transform[:2](vision),
                                            self.vision_transform[2], vision_read)
        from_audio = self.audio_attention(text, self.audio_transform[:2](audio),
                                          self.audio_transform[2], audio_read)
        return text + self.combine(torch.cat([from_vision, from_audio], dim=-1))


@register_model("cenet")
class CENet(MSAModel):
    """CENet: audio and vision injected into BERT's hidden states by text-queried attention."""

    config_class = CENetConfig

    def __init__(self, config: CENetConfig, dims: FeatureDims) -> None:
        super().__init__(config, dims)
        self.text_encoder = TextEncoder(config, dims)
        width = self.text_encoder.out_dim
        encoder = self.text_encoder.model
        init_std = DEFAULT_INIT_STD
        if encoder is not None:
            layers = getattr(getattr(encoder, "encoder", None), "layer", None)
            if not isinstance(layers, nn.ModuleList) or not hasattr(encoder, "embeddings"):
                raise MsakitError(f"cenet: model.text_encoder={config.text_encoder} is not a "
                                  "BERT-architecture encoder (embeddings, encoder.layer)")
            if config.injection_layer >= len(layers):
                raise MsakitError(f"cenet: model.injection_layer ({config.injection_layer}) must be "
                                  f"below the text encoder's layer count ({len(layers)})")
            if config.freeze_embeddings:
                encoder.embeddings.requires_grad_(False)
            init_std = getattr(encoder.config, "initializer_range", DEFAULT_INIT_STD)
        self.enhancement = CrossModalEnhancement(width, dims.audio, dims.vision,
                                                 config.mask_nonverbal_padding)
        self.head = nn.Sequential(nn.Dropout(config.head_dropout), nn.Linear(width, width), nn.Tanh(),
                                  nn.Dropout(config.head_dropout), nn.Linear(width, 1))
        for module in (*self.enhancement.modules(), *self.head.modules()):
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=init_std)
                nn.init.zeros_(module.bias)

    def parameter_groups(self) -> tuple[ParameterGroup, ...]:
        """With `decay_enhancement_biases`, the enhancement with its biases weight-decayed (MMSA's)."""
        if not self.config.decay_enhancement_biases:
            return ()
        return (ParameterGroup("enhancement", ("enhancement.",), decay_norms_and_biases=True),)

    def _enhance(self, batch: Batch, text: torch.Tensor) -> torch.Tensor:
        return self.enhancement(text, batch.audio, batch.audio_mask, batch.vision, batch.vision_mask)

    def _inject(self, batch: Batch, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Forward pre-hook of the injection layer: its hidden-state input, enhanced."""
        if args:
            return (self._enhance(batch, args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._enhance(batch, kwargs["hidden_states"])}

    def text_states(self, batch: Batch) -> torch.Tensor:
        """The last layer's states (B, L, D), the non-verbal streams injected on the way."""
        encoder = self.text_encoder.model
        if encoder is None:
            text = batch.text.masked_fill(~batch.text_mask.unsqueeze(-1), 0.0)
            return self._enhance(batch, text)
        layer = encoder.encoder.layer[self.config.injection_layer]
        hook = layer.register_forward_pre_hook(partial(self._inject, batch), with_kwargs=True)
        try:
            ids = batch.text_ids
            # gradients flow through a frozen encoder too: the enhancement sits inside it
            return encoder(input_ids=ids[:, 0], attention_mask=ids[:, 1],
                           token_type_ids=ids[:, 2]).last_hidden_state
        finally:
            hook.remove()

    def forward(self, batch: Batch) -> Output:
        first = self.text_states(batch)[:, 0]
        return Output(pred=self.head(first).squeeze(-1), features={"text_cls": first})
