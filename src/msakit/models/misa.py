"""MISA: Modality-Invariant and -Specific Representations (Hazarika, Zimmermann and Poria, "MISA:
Modality-Invariant and -Specific Representations for Multimodal Sentiment Analysis", ACM MM 2020),
as the MMSA framework trains it (thuiar/MMSA @ a94e65d, models/singleTask/MISA.py and
trains/singleTask/MISA.py).

Utterance vectors, one per modality:
    u_t = mean over the valid tokens of the text encoder's states
    u_m = [h1_fwd; h2_fwd; h1_bwd; h2_bwd]   for m in {a, v}: the final states of two stacked
          bidirectional LSTMs (hidden size = the modality's feature width), a LayerNorm between them
Projection into one space of size d_h (`hidden_size`):  x_m = LayerNorm(ReLU(W_m u_m))
Shared and private codes (one shared encoder for all modalities, one private encoder per modality):
    h^c_m = sigmoid(W_c x_m)          h^p_m = sigmoid(W^p_m x_m)
Fusion: a one-layer transformer encoder (2 heads) over the six codes
[h^p_t, h^p_v, h^p_a, h^c_t, h^c_v, h^c_a], concatenated, then
    y = W_2 ReLU(Dropout(W_1 [six codes]))
Training losses (eq. 6-9 of the paper; weights `diff_weight`, `sim_weight`, `recon_weight`):
    L_sim   = 1/3 sum_{(m1, m2) in {(t,v), (t,a), (a,v)}} CMD_5(h^c_m1, h^c_m2)
              CMD_K(X, Y) = ||E(X) - E(Y)|| + sum_{k=2..K} ||C_k(X) - C_k(Y)||,
              C_k the k-th central moment per dimension over the batch (MMSA omits the paper's
              1/|b-a|^k factors: the codes lie in [0, 1])
    L_diff  = sum over the 3 (private, shared) pairs and the 3 private pairs of
              mean((P^T Q)^2), P and Q the batch-centred codes with unit-norm rows
    L_recon = 1/3 sum_m mean((D_m(h^p_m + h^c_m) - x_m)^2)
The trainer adds the task loss (MSE: `training.loss: mse`).

Deviations from MMSA:
- Audio and vision LSTMs run over each modality's own valid frames. MMSA packs both with the
  text's token count (its BERT mask, [CLS] and [SEP] included), so on unaligned data it reads only
  the first few dozen of up to 500 frames, and padded frames when a clip has fewer frames than
  tokens.
  `rnn_lengths: text` restores MMSA's lengths (capped at each modality's padded length).
- A sample with no valid frame (a modality the data never had) runs one zeroed step: packing
  needs a length of at least one.
- The norms inside CMD have a zero gradient where two moments are equal (MMSA's sqrt of a sum of
  squares has an infinite one there, which makes a training batch of one sample NaN); the value
  is the same.
- MMSA's shared-vs-private discriminator (`sp_discriminator`) is built but enters no loss and no
  prediction; it is left out (4 d_h + 4 parameters fewer, nothing else changes). So is the
  adversarial domain discriminator of `use_cmd_sim: false`, which MMSA's trainer cannot run (it
  reads attributes it never sets); every published setting uses CMD.
- Checkpoints are chosen on the validation MAE (msakit's selection), MMSA's on the validation MSE.
- MMSA's `weight_decay` values are never handed to its optimiser (plain Adam, one parameter
  group), so the YAML has none, with `training.optimizer: adam` in the MMSA settings (at decay 0
  the same update as AdamW); BERT is fine-tuned at the model's learning rate, as MMSA does.
  MMSA's gradient clipping by value after every backward (`grad_clip`) and its accumulation of two
  batches per update (`update_epochs: 2`, the odd last batch of an epoch dropped) are the
  training loop's `grad_clip_value` and `accumulate_steps`, set in the YAML.
- The text width is the encoder's (MMSA hard-codes BERT-base's 768); with `text_source: features`
  the mean runs over the precomputed text features.
- MMSA's `rnncell: gru` alternative, unused by every published setting, is not offered.

- `input_norm: layernorm` (the YAML's default, `none` in MMSA's four dataset sections) puts a
  LayerNorm over each audio and vision frame's features before the first LSTM. MMSA has none: on
  raw features far from zero (`synthetic-raw`: offsets up to 1e3 over MOSI's 375 audio frames)
  some initialisations start MMSA's audio LSTMs with every gate saturated, and the branch carries
  nothing. Shuffling the audio across 32 training clips then moves the untrained model's
  predictions by 9.7e-7 of their spread with seed 1111 and 6.7e-7 with 1113 (0.56 and 1.2 once the
  audio is z-scored); with the LayerNorm, 3.1e-3 and 8.8e-3 (0.64 and 0.79). The run warns when a
  branch starts silenced (`msakit.training.raw_scale`); `data.normalize=zscore` is the other remedy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from msakit.data.schema import Batch, FeatureDims
from msakit.models.base import (
    RATE,
    SIZE,
    WEIGHT,
    ModelConfig,
    MSAModel,
    Output,
    one_of,
    setting,
)
from msakit.models.layers.pooling import masked_mean, valid_lengths
from msakit.models.layers.text import TextEncoder
from msakit.models.registry import register_model

CMD_MOMENTS = 5  # MMSA's (and the paper's) K
ORDER = ("private_t", "private_v", "private_a", "shared_t", "shared_v", "shared_a")


@dataclass
class MISAConfig(ModelConfig):
    """MISA's settings; the defaults are MMSA's MOSI values."""

    hidden_size: int = setting(128, SIZE, divisible_by="fusion_heads")  # d_h, the code space
    # the audio and vision LSTMs' width; null = the modality's feature width (MMSA)
    audio_rnn_hidden: int | None = setting(None, SIZE.or_null())
    vision_rnn_hidden: int | None = setting(None, SIZE.or_null())
    dropout: float = setting(0.2, RATE)  # in the prediction head
    fusion_heads: int = setting(2, SIZE)
    fusion_ff_dim: int = setting(2048, SIZE)  # PyTorch's default, which MMSA keeps
    fusion_dropout: float = setting(0.1, RATE)  # likewise
    diff_weight: float = setting(0.1, WEIGHT)
    sim_weight: float = setting(0.3, WEIGHT)
    recon_weight: float = setting(1.0, WEIGHT)
    # "own": each modality's valid frames; "text": the text's token count (MMSA)
    rnn_lengths: str = setting("own", one_of("own", "text"))
    # "layernorm": each audio and vision frame layer-normalised before its first LSTM; "none": MMSA
    input_norm: str = setting("none", one_of("none", "layernorm"))


class StackedBiLSTM(nn.Module):
    """Two bidirectional LSTMs with a LayerNorm between them (and, with `input_norm`, one before
    the first); returns their four final states."""

    def __init__(self, in_dim: int, hidden: int, input_norm: bool = False) -> None:
        super().__init__()
        self.input_norm = nn.LayerNorm(in_dim) if input_norm else nn.Identity()
        self.first = nn.LSTM(in_dim, hidden, bidirectional=True, batch_first=True)
        self.norm = nn.LayerNorm(2 * hidden)
        self.second = nn.LSTM(2 * hidden, hidden, bidirectional=True, batch_first=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D), lengths: (B,) >= 1 on the CPU -> (B, 4 hidden), MMSA's order
        [first forward, second forward, first backward, second backward]."""
        packed = pack_padded_sequence(self.input_norm(x), lengths, batch_first=True, enforce_sorted=False)
        states, (final_first, _) = self.first(packed)
        states, _ = pad_packed_sequence(states, batch_first=True)
        normed = pack_padded_sequence(self.norm(states), lengths, batch_first=True, enforce_sorted=False)
        _, (final_second, _) = self.second(normed)
        # (2 directions, B, H) each -> (B, 2 directions, 2H) -> (B, 4H)
        return torch.cat([final_first, final_second], dim=-1).transpose(0, 1).flatten(1)


def projection(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(), nn.LayerNorm(out_dim))


def cmd(x: torch.Tensor, y: torch.Tensor, moments: int = CMD_MOMENTS) -> torch.Tensor:
    """Central moment discrepancy of two batches of codes (B, D), as MMSA computes it."""
    mean_x, mean_y = x.mean(0), y.mean(0)
    centred_x, centred_y = x - mean_x, y - mean_y
    total = torch.linalg.vector_norm(mean_x - mean_y)
    for k in range(2, moments + 1):
        total = total + torch.linalg.vector_norm(centred_x.pow(k).mean(0) - centred_y.pow(k).mean(0))
    return total


def difference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Soft orthogonality of two batches of codes (B, D): mean((X^T Y)^2) over the D x D entries,
    rows centred over the batch and scaled to unit norm (the norm is a constant to backward)."""
    def unit_rows(z: torch.Tensor) -> torch.Tensor:
        z = z - z.mean(0, keepdim=True)
        return z / (torch.linalg.vector_norm(z, dim=1, keepdim=True).detach() + 1e-6)

    return (unit_rows(x).t() @ unit_rows(y)).pow(2).mean()


@register_model("misa")
class MISA(MSAModel):
    """MISA: shared and private codes per modality, a transformer over them, three losses."""

    config_class = MISAConfig

    def __init__(self, config: MISAConfig, dims: FeatureDims) -> None:
        super().__init__(config, dims)
        d = config.hidden_size
        self.text_encoder = TextEncoder(config, dims)
        input_norm = config.input_norm == "layernorm"
        self.audio_rnn = StackedBiLSTM(dims.audio, config.audio_rnn_hidden or dims.audio, input_norm)
        self.vision_rnn = StackedBiLSTM(dims.vision, config.vision_rnn_hidden or dims.vision, input_norm)
        self.project = nn.ModuleDict({
            "text": projection(self.text_encoder.out_dim, d),
            "audio": projection(4 * (config.audio_rnn_hidden or dims.audio), d),
            "vision": projection(4 * (config.vision_rnn_hidden or dims.vision), d),
        })
        self.private = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, d), nn.Sigmoid())
                                      for m in ("text", "audio", "vision")})
        self.shared = nn.Sequential(nn.Linear(d, d), nn.Sigmoid())
        self.reconstruct = nn.ModuleDict({m: nn.Linear(d, d) for m in ("text", "audio", "vision")})
        self.fusion = nn.TransformerEncoderLayer(
            d, config.fusion_heads, dim_feedforward=config.fusion_ff_dim,
            dropout=config.fusion_dropout, batch_first=True,
        )
        self.head = nn.Sequential(
            nn.Linear(6 * d, 3 * d), nn.Dropout(config.dropout), nn.ReLU(), nn.Linear(3 * d, 1)
        )

    def _frame_lengths(self, batch: Batch, modality: str, text_mask: torch.Tensor) -> torch.Tensor:
        mask = getattr(batch, f"{modality}_mask")
        source = text_mask if self.config.rnn_lengths == "text" else mask
        return valid_lengths(source).clamp(min=1, max=mask.shape[1]).cpu()

    def _utterance(self, batch: Batch, modality: str, text_mask: torch.Tensor) -> torch.Tensor:
        x, mask = getattr(batch, modality), getattr(batch, f"{modality}_mask")
        lengths = self._frame_lengths(batch, modality, text_mask)
        if self.config.rnn_lengths == "own":  # padded values (even inf) never reach the LSTM
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        rnn = self.audio_rnn if modality == "audio" else self.vision_rnn
        return rnn(x, lengths)

    def forward(self, batch: Batch) -> Output:
        states, text_mask = self.text_encoder(batch)
        utterances = {
            "text": masked_mean(states, text_mask),
            "audio": self._utterance(batch, "audio", text_mask),
            "vision": self._utterance(batch, "vision", text_mask),
        }
        projected = {m: self.project[m](u) for m, u in utterances.items()}
        codes = {}
        for m, x in projected.items():
            codes[f"private_{m[0]}"] = self.private[m](x)
            codes[f"shared_{m[0]}"] = self.shared(x)
        fused = self.fusion(torch.stack([codes[k] for k in ORDER], dim=1)).flatten(1)
        pred = self.head(fused).squeeze(-1)
        losses = self._losses(codes, projected) if self.training else {}
        return Output(pred=pred, losses=losses, features={"fused": fused, **codes})

    def _losses(self, codes: dict[str, torch.Tensor], projected: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        c = self.config
        similarity = (cmd(codes["shared_t"], codes["shared_v"]) + cmd(codes["shared_t"], codes["shared_a"])
                      + cmd(codes["shared_a"], codes["shared_v"])) / 3
        pairs = [("private_t", "shared_t"), ("private_v", "shared_v"), ("private_a", "shared_a"),
                 ("private_a", "private_t"), ("private_a", "private_v"), ("private_t", "private_v")]
        diff = sum(difference(codes[p], codes[q]) for p, q in pairs)
        recon = sum(
            (self.reconstruct[m](codes[f"private_{m[0]}"] + codes[f"shared_{m[0]}"]) - x).pow(2).mean()
            for m, x in projected.items()
        ) / 3
        return {"similarity": c.sim_weight * similarity, "difference": c.diff_weight * diff,
                "reconstruction": c.recon_weight * recon}
