"""TFR-Net: Transformer-based Feature Reconstruction Network (Yuan, Li, Xu and Yu, "Transformer-based
Feature Reconstruction Network for Robust Multimodal Sentiment Analysis", ACM MM 2021), as the
MMSA framework trains it (thuiar/MMSA @ a94e65d, models/missingTask/TFR_NET/ and
trains/missingTask/TFR_NET.py), MMSA's one model for missing data.

Training input: the complete batch X_m and a copy X'_m in which a share `missing_rate` of the
tokens and frames is removed (text: [UNK] ids, or zeroed precomputed features; audio, vision:
zeroed frames; [CLS]/[SEP] stay). The network reads only X'_m; the complete input is the target.

1. Text states: S'_t = Dropout(Encoder(X'_t)), S_t = Encoder(X_t) (the target; training only).
2. Temporal convolution to a common width d (`dim`), no bias, per modality: P_m = Conv1D(X'_m).
3. Alignment, per target modality b (MulT blocks, `msakit.models.layers.transformer`):
       H_b = [SA_b(P_b); CM_{a1->b}(P_b, P_a1); CM_{a2->b}(P_b, P_a2)]        (B, L_b, 3d)
   SA: `memory_layers` self-attention blocks; CM: `layers` crossmodal blocks.
4. Fusion (a gated encoder per modality, then a head):
       G_b = BiGRU_b(H_b) (`fusion_gru_layers` layers, hidden h_b, over the valid steps)
       g_b = sigmoid(Conv1D_3(G_b))                  a gate per step
       u_b = max over steps of tanh(W_b [H_b; tanh(G_b) * g_b])      (h_b), then Dropout
       y   = W_2 Dropout(LeakyReLU(W_1 BatchNorm([u_t; u_a; u_v])))
5. Reconstruction (training only): a "temporal" transformer T_b (`memory_layers` blocks, width
   L_b, `temporal_heads` heads, no positions) over H_b read with time as the embedding, then a
   linear generator back to the input width:   X^_b = W^g_b T_b(H_b)        (B, L_b, D_b)
       L_rec_b = [SmoothL1_sum(M X^_b, M X_b) + lambda CMD_3(M X^_b, M X_b)] / (|M| D_b + 1e-4)
   M: the positions removed from X'_b (valid in X_b); |M| D_b: their number times the width;
   CMD_3 over all B L_b rows of the masked tensors (MMSA's RECLoss "combine"; lambda =
   `similarity_weight`). The model returns w_b L_rec_b per modality (`recon_weight_*`) from epoch
   `reconstruction_from_epoch` on; the trainer adds the task loss (MMSA: L1).

Masking is the model's own, not a `training.noise`: the loss needs the very positions removed
and the input before their removal, and removing them is TFR-Net's training objective rather
than an augmentation any model could use. It runs through `msakit.missing`'s pure streams (stream
"tfr_net", seed `missing_seed`), without the epoch in the key, so a sample loses the same positions
in every epoch as MMSA's masks, drawn once when its data loader starts. Positions that a missing-
data protocol or a training noise already removed are not removed again and are not
reconstructed (their target is gone). Evaluation and prediction read the batch as given.

Kept from MMSA although unusual:
- The temporal transformer reads its input (L_b, B, 3d) permuted to (B, 3d, L_b) as (sequence,
  batch, embedding): it attends across the SAMPLES of the batch, causally (sample i reads samples
  1..i), not across the 3d channels of one sample. It feeds only the reconstruction losses, so a
  prediction never depends on the rest of its batch; the losses do (like any batch statistic).
  The width L_b is the dataset's padded length, to which a training batch is padded.
- The text target S_t is computed with gradients: the reconstruction loss also trains the encoder
  through its target. The convolution is skipped where a width already equals d.

Deviations from MMSA:
- Padding is masked (`mask_padding: true`): padded steps are zeroed and masked out of every
  attention, the causal mask's offset |L_k - L_q| uses each sample's valid lengths, and the
  fusion's max runs over valid steps only; MMSA lets attention see padding, offsets by the padded
  lengths and takes the max over padded steps too. `mask_padding: false` restores all three (the
  GRUs read the valid steps either way, as MMSA's packing does).
- `temporal_heads` must divide the three sequence lengths: MMSA's 25 cannot run SIMS' 39 text
  tokens (it crashes), so the SIMS settings use 1.
- Training loop (msakit's one loop): MMSA's trainer zeroes the gradients every `update_epochs`
  (4) batches but steps after every batch on their running sum (clipped by value after each
  backward: `grad_clip`, clip_grad_value_) and once more on the same sum after every fourth; an
  epoch's last incomplete group steps after each of its batches and its sum ends with the epoch.
  The MMSA settings say so in the loop's terms: `training.accumulate_steps: 4`,
  `step_every_batch: true`, `grad_clip_value`; the synthetic settings step once per batch on
  that batch's gradient (`accumulate_steps: 1`, `step_every_batch: false`). MMSA's Adam with L2
  weight decay and ReduceLROnPlateau on the main optimiser (factor 0.1, `patience` 5, 10 on SIMS)
  are the MMSA settings' `training.optimizer: adam` and `plateau`; the synthetic settings keep
  AdamW at a constant rate. The plateau steps on the validation MAE, MMSA's on its validation L1
  loss: the same error, but MMSA's is the mean of per-batch means rounded to 4 decimals.
  Checkpoints are chosen on the validation MAE (MMSA: the validation L1 loss, the same number).
- MMSA's mask keeps position 0 and the last valid token of the text; msakit keeps the
  tokenizer's special tokens ([CLS], [SEP], [PAD]) wherever they are (the same positions on
  BERT input). MMSA draws its masks with numpy from `missing_seed`, msakit from its own streams:
  the same rate, other positions.
- A training batch of one sample is normalised with the running BatchNorm statistics (batch
  statistics of one sample are undefined; MMSA crashes there).
- The text width is the encoder's (MMSA: 768). Only the settings MMSA publishes are offered
  (crossmodal alignment, linear generators, gated fusion, the "combine" reconstruction loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from msakit.data.schema import MODALITIES, Batch, FeatureDims
from msakit.errors import MsakitError
from msakit.missing.masks import drop_within_modalities
from msakit.models.base import (
    COUNT,
    FLAG,
    RATE,
    SIZE,
    WEIGHT,
    ModelConfig,
    MSAModel,
    Output,
    setting,
)
from msakit.models.layers.pooling import masked_max, valid_lengths
from msakit.models.layers.text import TextEncoder, special_token_ids
from msakit.models.layers.transformer import CrossModalEncoder, crossmodal_stacks
from msakit.models.misa import cmd
from msakit.models.registry import register_model

CMD_MOMENTS = 3  # MMSA's RECLoss calls its CMD with the default n_moments
REC_EPS = 1e-4  # MMSA's RECLoss denominator offset
MASK_STREAM = "tfr_net"


@dataclass
class TFRNetConfig(ModelConfig):
    """TFR-Net's settings; the defaults are MMSA's MOSI values."""

    dim: int = setting(30, SIZE, divisible_by="heads")  # d (MMSA: dst_feature_dim_nheads[0])
    heads: int = setting(6, SIZE)
    layers: int = setting(3, SIZE)  # crossmodal blocks per stack (MMSA: nlevels)
    memory_layers: int = setting(3, SIZE)  # self-attention and temporal stacks: max(nlevels, 3)
    temporal_heads: int = setting(25, SIZE)  # MMSA: num_temporal_head
    causal_mask: bool = setting(True, FLAG)  # MMSA: attn_mask
    attn_dropout: float = setting(0.2, RATE)  # text as the source, self and temporal stacks
    attn_dropout_audio: float = setting(0.1, RATE)
    attn_dropout_vision: float = setting(0.0, RATE)
    relu_dropout: float = setting(0.2, RATE)
    res_dropout: float = setting(0.2, RATE)
    embed_dropout: float = setting(0.2, RATE)
    text_dropout: float = setting(0.2, RATE)
    conv_kernel_text: int = setting(1, SIZE)
    conv_kernel_audio: int = setting(5, SIZE)
    conv_kernel_vision: int = setting(3, SIZE)
    fusion_hidden_text: int = setting(36, SIZE)
    fusion_hidden_audio: int = setting(20, SIZE)
    fusion_hidden_vision: int = setting(48, SIZE)
    fusion_gru_layers: int = setting(3, SIZE)
    fusion_dropout: float = setting(0.2, RATE)
    head_hidden: int = setting(128, SIZE)  # MMSA: cls_hidden_dim
    head_dropout: float = setting(0.0, RATE)
    recon_weight_text: float = setting(5.0, WEIGHT)  # MMSA: weight_gen_loss
    recon_weight_audio: float = setting(2.0, WEIGHT)
    recon_weight_vision: float = setting(20.0, WEIGHT)
    similarity_weight: float = setting(5.0, WEIGHT)  # MMSA: weight_sim_loss (CMD in RECLoss)
    missing_rate: float = setting(0.2, RATE)  # share of positions the model removes in training
    missing_seed: int = setting(1111, COUNT)
    reconstruction_from_epoch: int = setting(2, SIZE)  # MMSA adds the losses after epoch 1
    mask_padding: bool = setting(True, FLAG)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, removed: torch.Tensor,
                        similarity_weight: float) -> torch.Tensor:
    """MMSA's RECLoss ("combine") of (B, L, D) tensors over the (B, L) `removed` positions."""
    mask = removed.unsqueeze(-1).to(pred.dtype).expand_as(pred)
    pred, target = pred * mask, target * mask
    count = mask.sum() + REC_EPS
    loss = F.smooth_l1_loss(pred, target, reduction="sum") / count
    if similarity_weight:
        width = pred.shape[-1]
        loss = loss + similarity_weight * cmd(pred.reshape(-1, width), target.reshape(-1, width),
                                              CMD_MOMENTS) / count
    return loss


class UnpositionedEncoder(CrossModalEncoder):
    """A MulT stack without positions (MMSA's `position_embedding=False`): inputs only scaled."""

    def _embed(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.dropout(math.sqrt(self.dim) * x, self.embed_dropout, self.training)


class GatedEncoder(nn.Module):
    """MMSA's C_GATE: a BiGRU over the valid steps, a convolutional gate, a projection, max-pooling."""

    def __init__(self, in_dim: int, hidden: int, gru_layers: int, dropout: float) -> None:
        super().__init__()
        self.gru = nn.GRU(in_dim, hidden, num_layers=gru_layers, bidirectional=True, batch_first=True)
        self.gate = nn.Conv1d(2 * hidden, 1, kernel_size=3, padding=1)
        self.project = nn.Linear(2 * hidden + in_dim, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, in), lengths (B,) >= 1 on the CPU, pool_mask (B, L) -> (B, hidden)."""
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        states, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=x.shape[1])
        gate = torch.sigmoid(self.gate(states.transpose(1, 2)).transpose(1, 2))
        rep = torch.tanh(self.project(torch.cat([x, torch.tanh(states) * gate], dim=-1)))
        return self.dropout(masked_max(rep, pool_mask))


@register_model("tfr_net")
class TFRNet(MSAModel):
    """TFR-Net: crossmodal alignment, gated fusion, reconstruction of randomly removed features."""

    config_class = TFRNetConfig

    def __init__(self, config: TFRNetConfig, dims: FeatureDims) -> None:
        super().__init__(config, dims)
        c, d = config, config.dim
        self.text_encoder = TextEncoder(config, dims)
        self.special = special_token_ids(config)
        widths = {"text": self.text_encoder.out_dim, "audio": dims.audio, "vision": dims.vision}
        self.lengths = {"text": dims.text_len, "audio": dims.audio_len, "vision": dims.vision_len}
        for m, length in self.lengths.items():
            if length % c.temporal_heads:
                raise MsakitError(f"tfr_net: model.temporal_heads ({c.temporal_heads}) must divide the "
                                  f"{m} length ({length}); sequence lengths here: "
                                  + ", ".join(f"{k} {v}" for k, v in self.lengths.items()))
        kernels = {"text": c.conv_kernel_text, "audio": c.conv_kernel_audio, "vision": c.conv_kernel_vision}
        self.project = nn.ModuleDict({
            m: nn.Identity() if widths[m] == d
            else nn.Conv1d(widths[m], d, kernels[m], padding=(kernels[m] - 1) // 2, bias=False)
            for m in MODALITIES
        })
        options = {"relu_dropout": c.relu_dropout, "res_dropout": c.res_dropout,
                   "embed_dropout": c.embed_dropout, "causal": c.causal_mask}
        positions = {"first_position": 1, "position_zero_steps": False}  # fairseq's, as MMSA
        self.cross = crossmodal_stacks(
            MODALITIES, d, c.heads, c.layers,
            {"text": c.attn_dropout, "audio": c.attn_dropout_audio, "vision": c.attn_dropout_vision},
            **options, **positions)
        self.memory = nn.ModuleDict({
            m: CrossModalEncoder(d, c.heads, c.memory_layers, attn_dropout=c.attn_dropout,
                                 **options, **positions)
            for m in MODALITIES
        })
        self.temporal = nn.ModuleDict({
            m: UnpositionedEncoder(self.lengths[m], c.temporal_heads, c.memory_layers,
                                   attn_dropout=c.attn_dropout, **options)
            for m in MODALITIES
        })
        self.generator = nn.ModuleDict({m: nn.Linear(3 * d, widths[m]) for m in MODALITIES})
        hidden = {"text": c.fusion_hidden_text, "audio": c.fusion_hidden_audio,
                  "vision": c.fusion_hidden_vision}
        self.fusion = nn.ModuleDict({
            m: GatedEncoder(3 * d, hidden[m], c.fusion_gru_layers, c.fusion_dropout) for m in MODALITIES
        })
        total = sum(hidden.values())
        self.norm = nn.BatchNorm1d(total)
        self.head = nn.Sequential(nn.Linear(total, c.head_hidden), nn.LeakyReLU(),
                                  nn.Dropout(c.head_dropout), nn.Linear(c.head_hidden, 1))
        # set per epoch by the trainer's hook; a model trained without the hook always reconstructs
        self.reconstructing = True

    def on_train_epoch_start(self, epoch: int, train_batches: Callable[[], Iterator[Batch]]) -> None:
        self.reconstructing = epoch >= self.config.reconstruction_from_epoch

    def remove(self, batch: Batch) -> tuple[Batch, dict[str, torch.Tensor]]:
        """The batch with `missing_rate` of its positions removed, and, per modality, the (B, L)
        positions removed here (not those a protocol or noise had removed before)."""
        before = batch.dropped
        rates = dict.fromkeys(MODALITIES, self.config.missing_rate)
        seen = drop_within_modalities(batch, rates, stream=MASK_STREAM, seed=self.config.missing_seed,
                                      **self.special)
        # a position already gone is no target: its complete value is not in the batch
        removed = {m: seen.dropped[m] & ~before[m] if m in before else seen.dropped[m]
                   for m in MODALITIES}
        return seen, removed

    def _normalise(self, fused: torch.Tensor) -> torch.Tensor:
        """BatchNorm; a training batch of one sample (no batch statistics) uses the running ones."""
        if self.training and fused.shape[0] == 1:
            norm = self.norm
            return F.batch_norm(fused, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                                training=False, eps=norm.eps)
        return self.norm(fused)

    def _aligned(self, seqs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """H_b (B, L_b, 3d) per target modality: its self-attention stream, then the crossmodal ones."""
        out = {}
        for target, (x, mask) in seqs.items():
            streams = [self.memory[target](x, mask)]
            streams += [self.cross[f"{source}_to_{target}"](x, mask, *seqs[source])
                        for source in MODALITIES if source != target]
            out[target] = torch.cat(streams, dim=-1)
        return out

    def _temporal(self, modality: str, h: torch.Tensor) -> torch.Tensor:
        """T_b(H_b): H_b padded to the dataset's length L_b, read as (3d, B, L_b) (batch, sequence,
        embedding), as MMSA's permutation does; back to (B, L, 3d)."""
        steps = h.shape[1]
        x = F.pad(h, (0, 0, 0, self.lengths[modality] - steps)).permute(2, 0, 1)
        every = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return self.temporal[modality](x, every).permute(1, 2, 0)[:, :steps]

    def forward(self, batch: Batch) -> Output:
        c = self.config
        removing = self.training and c.missing_rate > 0
        seen, removed = self.remove(batch) if removing else (batch, {})
        text, text_mask = self.text_encoder(seen)
        inputs = {"text": F.dropout(text, c.text_dropout, self.training),
                  "audio": seen.audio, "vision": seen.vision}
        masks = {"text": text_mask, "audio": seen.audio_mask, "vision": seen.vision_mask}
        attend = masks if c.mask_padding else {m: torch.ones_like(v) for m, v in masks.items()}
        seqs = {}
        for m in MODALITIES:
            x = inputs[m].masked_fill(~attend[m].unsqueeze(-1), 0.0)
            seqs[m] = (self.project[m](x.transpose(1, 2)).transpose(1, 2), attend[m])
        aligned = self._aligned(seqs)
        reps = [self.fusion[m](aligned[m], valid_lengths(masks[m]).clamp(min=1).cpu(), attend[m])
                for m in MODALITIES]
        fused = torch.cat(reps, dim=-1)
        pred = self.head(self._normalise(fused)).squeeze(-1)
        losses = {}
        if removing and self.reconstructing:
            targets = {"text": self.text_encoder(batch)[0], "audio": batch.audio, "vision": batch.vision}
            weights = {"text": c.recon_weight_text, "audio": c.recon_weight_audio,
                       "vision": c.recon_weight_vision}
            for m in MODALITIES:
                generated = self.generator[m](self._temporal(m, aligned[m]))
                losses[f"reconstruction_{m}"] = weights[m] * reconstruction_loss(
                    generated, targets[m], removed[m], c.similarity_weight)
        return Output(pred=pred, losses=losses, features={"fused": fused})
