"""MAG-BERT: a Multimodal Adaptation Gate inside BERT (Rahman, Hasan, Lee, Zadeh, Mao, Morency and
Hoque, "Integrating Multimodal Information in Large Pretrained Transformers", ACL 2020), as the MMSA
framework trains it (thuiar/MMSA @ a94e65d, models/singleTask/BERT_MAG.py and
trains/singleTask/BERT_MAG.py).

Word-aligned input: token i of the text reads audio frame a_i and vision frame v_i. After BERT's
embedding layer, before its first transformer layer, the gate shifts each token embedding e_i:
    g^v_i = ReLU(W_hv [v_i; e_i])        g^a_i = ReLU(W_ha [a_i; e_i])
    h_i   = g^v_i * (W_v v_i + b_v) + g^a_i * (W_a a_i + b_a)       (the non-verbal displacement)
    alpha_i = min(beta * ||e_i|| / (||h_i|| + 1e-6), 1),  ||h_i|| read as 1 where it is 0
    e'_i  = Dropout(LayerNorm(e_i + alpha_i h_i))
so the displacement is never longer than beta times the embedding (`beta_shift`), and dropout
`gate_dropout` follows the gate's own LayerNorm. BERT's transformer layers and pooler then run on
e' under the text's attention mask, and y = W Dropout(pooler([CLS])) with BERT's
`hidden_dropout_prob`. The trainer adds the task loss (L1, as MMSA's).
Where the non-verbal input is zero the displacement is g^v_i b_v + g^a_i b_a: zero as
initialised (normal(0, BERT's initializer_range) weights and zero biases, as MMSA's from_pretrained
initialises the gate and the head), so the text then reaches the encoder as LayerNorm(e).

Deviations from MMSA:
- Masked frames (padding, frames a missing-data protocol drops) are zeroed before the gate; MMSA
  feeds what the arrays hold. MMSA's aligned pickles pad with zeros, so nothing changes on them.
- Input is aligned when audio and vision have as many steps as the token ids (MMSA's aligned
  pickles: 50 and 50); msakit reads the aligned pickles for this model (`aligned_input`) and, by
  default (`unaligned_input: refuse`), refuses other input in one line, as MMSA only runs aligned
  data (`need_data_aligned`; SIMS has no aligned pickle, so MMSA hands its gate 39 tokens against
  400 and 55 frames, where the concatenation fails). `unaligned_input: resample`, msakit's
  addition (for SIMS and other unaligned data; media are word-aligned by `msakit extract` and
  `predict` with `alignment.unit: word`, `msakit.features.alignment`), lets token t of the n
  attended ones read the mean of the valid frames in [floor(t F / n), ceil((t + 1) F / n)), F the
  frames up to the last valid one.
- The encoder is any BERT-architecture folder (embeddings, encoder, pooler), the packaged MiniLM by
  default, and the gate's text width is its width (MMSA's feature_dims[0], 768, which must equal
  BERT's); MMSA's are bert-base-uncased (MOSI, MOSEI) and bert-base-chinese (SIMS). BERT's attention
  mask is built here as the additive mask MMSA's transformers 4 helper builds (transformers 5
  dropped `get_extended_attention_mask`). With `text_adapter: lora` the pooler, like every weight
  but the adapters, stays frozen; MMSA fine-tunes all of BERT.
- MMSA's Adam trains everything at `learning_rate` without weight decay: the MMSA settings'
  `training.optimizer: adam` with `lr` = `encoder_lr` and no decay (at decay 0 AdamW, the
  synthetic settings', is the same update). Checkpoints are chosen on the validation MAE, which is MMSA's
  KeyEval ("Loss", its validation L1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from msakit.data.schema import Batch, FeatureDims
from msakit.errors import MsakitError
from msakit.models.base import POSITIVE, RATE, ModelConfig, MSAModel, Output, one_of, setting
from msakit.models.layers.text import TextEncoder
from msakit.models.registry import register_model

NORM_EPS = 1e-6  # MMSA's eps in the gate's norm ratio
BERT_PARTS = ("embeddings", "encoder", "pooler")


@dataclass
class MAGBERTConfig(ModelConfig):
    """MAG-BERT's settings; the defaults are MMSA's MOSI values."""

    beta_shift: float = setting(1.0, POSITIVE)  # the longest displacement, relative to ||e_i||
    gate_dropout: float = setting(0.3, RATE)  # after the gate's LayerNorm (MMSA's dropout_prob)
    # what input with other step counts than the token ids gets: "refuse" (MMSA) | "resample"
    unaligned_input: str = setting("refuse", one_of("refuse", "resample"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.text_source != "encoder":
            raise MsakitError(f"mag_bert: the gate sits inside BERT, so model.text_source must be "
                              f"'encoder', not {self.text_source!r}")


class MultimodalAdaptationGate(nn.Module):
    """Shifts token embeddings (B, L, D) by their gated audio and vision displacement."""

    def __init__(self, text_dim: int, audio_dim: int, vision_dim: int, beta_shift: float,
                 dropout: float, init_std: float) -> None:
        super().__init__()
        self.gate_vision = nn.Linear(vision_dim + text_dim, text_dim)
        self.gate_audio = nn.Linear(audio_dim + text_dim, text_dim)
        self.shift_vision = nn.Linear(vision_dim, text_dim)
        self.shift_audio = nn.Linear(audio_dim, text_dim)
        self.beta_shift = beta_shift
        self.norm = nn.LayerNorm(text_dim)
        self.dropout = nn.Dropout(dropout)
        for layer in (self.gate_vision, self.gate_audio, self.shift_vision, self.shift_audio):
            nn.init.normal_(layer.weight, std=init_std)
            nn.init.zeros_(layer.bias)

    def displacement(self, text: torch.Tensor, audio: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        """alpha_i h_i: the gated non-verbal shift, scaled to at most beta_shift ||e_i||."""
        gate_v = torch.relu(self.gate_vision(torch.cat([vision, text], dim=-1)))
        gate_a = torch.relu(self.gate_audio(torch.cat([audio, text], dim=-1)))
        shift = gate_v * self.shift_vision(vision) + gate_a * self.shift_audio(audio)
        text_norm = torch.linalg.vector_norm(text, dim=-1)
        shift_norm = torch.linalg.vector_norm(shift, dim=-1)
        shift_norm = torch.where(shift_norm == 0, torch.ones_like(shift_norm), shift_norm)
        alpha = (text_norm / (shift_norm + NORM_EPS) * self.beta_shift).clamp(max=1.0)
        return alpha.unsqueeze(-1) * shift

    def forward(self, text: torch.Tensor, audio: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.norm(text + self.displacement(text, audio, vision)))


def additive_attention_mask(attention: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 1/0 -> (B, 1, 1, L): 0 where attended, the dtype's lowest value where not."""
    keep = attention[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


def resample_frames(frames: torch.Tensor, mask: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Frames (B, F, d) onto the token steps of `attention` (B, L): token t of the n attended ones
    reads the mean of the valid frames in [floor(t F_b / n), ceil((t + 1) F_b / n)), F_b the frames
    up to the last valid one; tokens beyond n, and spans without a valid frame, read zeros."""
    steps, count = attention.shape[1], frames.shape[1]
    token = torch.arange(steps, device=frames.device)[None, :, None]
    frame = torch.arange(count, device=frames.device)[None, None, :]
    tokens = attention.sum(1).clamp(min=1)[:, None, None]
    extent = (mask * torch.arange(1, count + 1, device=frames.device)).amax(1)[:, None, None]
    start = token * extent // tokens
    end = -((-(token + 1) * extent) // tokens)
    weights = ((frame >= start) & (frame < end) & mask[:, None, :] & (token < tokens)).to(frames.dtype)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1)
    return weights @ frames


@register_model("mag_bert")
class MAGBERT(MSAModel):
    """MAG-BERT: audio and vision shift BERT's token embeddings through a gate; BERT predicts."""

    config_class = MAGBERTConfig
    aligned_input = True  # MMSA trains it on aligned_*.pkl only (need_data_aligned)

    def __init__(self, config: MAGBERTConfig, dims: FeatureDims) -> None:
        super().__init__(config, dims)
        self.text_encoder = TextEncoder(config, dims)
        bert = self.text_encoder.model
        if any(getattr(bert, part, None) is None for part in BERT_PARTS):
            raise MsakitError(f"mag_bert: model.text_encoder={config.text_encoder!r} is not a BERT-"
                              f"architecture encoder with {', '.join(BERT_PARTS)}")
        bert_config = bert.config
        width = self.text_encoder.out_dim
        self.gate = MultimodalAdaptationGate(width, dims.audio, dims.vision, config.beta_shift,
                                             config.gate_dropout, bert_config.initializer_range)
        self.dropout = nn.Dropout(bert_config.hidden_dropout_prob)
        self.head = nn.Linear(width, 1)
        nn.init.normal_(self.head.weight, std=bert_config.initializer_range)
        nn.init.zeros_(self.head.bias)

    def _frames(self, batch: Batch, modality: str, attention: torch.Tensor) -> torch.Tensor:
        """The modality's frames at the token steps, masked frames zeroed (even infinities)."""
        frames, mask = getattr(batch, modality), getattr(batch, f"{modality}_mask")
        frames = frames.masked_fill(~mask.unsqueeze(-1), 0.0)
        if frames.shape[1] == attention.shape[1]:
            return frames
        if self.config.unaligned_input == "refuse":
            raise MsakitError(
                f"mag_bert reads word-aligned input, but {modality} has {frames.shape[1]} steps "
                f"for {attention.shape[1]} tokens; read the aligned pickle (--aligned) or set "
                "model.unaligned_input=resample")
        return resample_frames(frames, mask, attention)

    def forward(self, batch: Batch) -> Output:
        bert = self.text_encoder.model
        ids = batch.text_ids
        attention = ids[:, 1]
        audio = self._frames(batch, "audio", attention)
        vision = self._frames(batch, "vision", attention)
        embedded = bert.embeddings(input_ids=ids[:, 0], token_type_ids=ids[:, 2])
        fused = self.gate(embedded, audio, vision)
        states = bert.encoder(fused, attention_mask=additive_attention_mask(attention, fused.dtype))[0]
        pooled = bert.pooler(states)
        pred = self.head(self.dropout(pooled)).squeeze(-1)
        return Output(pred=pred, features={"pooled": pooled})
