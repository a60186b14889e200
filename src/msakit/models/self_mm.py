"""Self-MM: self-supervised multi-task learning (Yu, Xu, Yuan and Wu, "Learning Modality-Specific
Representations with Self-Supervised Multi-Task Learning for Multimodal Sentiment Analysis",
AAAI 2021), as the MMSA framework implements and trains it (thuiar/MMSA @a94e65d,
`models/multiTask/SELF_MM.py` and `trains/multiTask/SELF_MM.py`).

1. Encoders. Text: a fine-tuned BERT-style encoder over the `text_bert` ids, its first ([CLS])
   state: x_t (B, D_t). Audio and vision: a one-layer LSTM over the valid frames (packed), its last
   hidden state, dropout, a linear map: x_a (B, `audio_out`), x_v (B, `vision_out`).
2. Four heads, each Dropout -> Linear -> ReLU (the representation F_s), Linear -> ReLU -> Linear:
   the fusion head reads [x_t; x_a; x_v] and gives the prediction y_m; the text, audio and vision
   heads read x_t, x_a, x_v and give the unimodal predictions y_t, y_a, y_v.
3. Unimodal label generation (ULGM). A memory of the whole training split keeps, per sample, the
   labels y_m (the given label, never changed), y_t, y_a, y_v (the given label before epoch 1) and
   the latest F_s of the four heads, and per head the centres C_s^+ and C_s^- (means of F_s over
   the samples whose label of that head is > 0, resp. < 0). For a training batch at epoch n > 1,
   with D^+ and D^- the L2 distances of F_s to C_s^+ and C_s^-:
       a_s = (D_s^- - D_s^+) / (D_s^+ + eps)                       (eps = 1e-8)
       target_s = clip(y_m a_s / (2 a_m + 2 eps) + (y_m + a_s - a_m) / 2, -H, H)
       y_s <- (n - 1) / (n + 1) y_s + 2 / (n + 1) target_s          (s = t, a, v)
   after the losses are computed; then the batch's F_s are written to the memory and the centres
   recomputed from the whole memory (unseen samples count with zero features in epoch 1, as in
   MMSA). The losses read the memory as it was before the update:
       L = |y_m^ - y_m| + sum_s tanh(|y_s - y_m|) |y_s^ - y_s|      (means over the batch)
   The first term is the trainer's task loss (`training.loss: l1`), the others are
   `losses["text"]`, `losses["audio"]`, `losses["vision"]`. In epoch 1 y_s = y_m, so the unimodal
   terms weigh 0: the unimodal heads start learning in epoch 2.
   The memory lives in `training_state()` (it is not part of the weights a checkpoint needs to
   predict) and survives `--resume`; it is built before epoch 1 from the training split's labels
   (`on_train_epoch_start`), and a training batch must come from that split (`batch.index` is its
   position there, checked against `batch.ids`). A training-mode forward outside the training loop,
   before any memory exists, returns the fusion prediction without the unimodal losses. Under
   torchrun every rank keeps the whole memory and updates it with the whole batch, gathered from
   the ranks' parts in batch order, so it stays the memory one process would have.

Where this differs from MMSA, and the setting that restores MMSA's behaviour
(benchmarks/parity/self_mm.py checks predictions, losses, generated labels and gradients):
- Optimiser (`training.optimizer`). MMSA uses Adam with coupled L2 weight decay: the MMSA
  settings' `optimizer: adam` (the synthetic settings keep AdamW, decoupled decay). MMSA's five
  parameter groups are kept: BERT at `training.encoder_lr` / `encoder_weight_decay` (biases and
  LayerNorm not decayed), the audio and vision subnetworks at
  `audio_lr` / `audio_weight_decay` and `vision_lr` / `vision_weight_decay` (`parameter_groups`),
  the rest at `training.lr` / `weight_decay`, biases decayed too (`decay_norms_and_biases: true`).
  MMSA's gradient accumulation (`update_epochs` 4: the gradients of four batch means summed per
  step, an epoch's last 1-3 batches computed and dropped, the ULGM run after every batch) is the
  loop's `training.accumulate_steps`.
- Empty frame streams. MMSA crashes on a sample with no valid audio or vision frame (an LSTM over
  length 0); here such a stream runs one zeroed step (a missing-data protocol that zeroes a
  modality keeps its frames valid, so it is read as the zeros MMSA would read). Padded frames are
  never read, as in MMSA. On word-aligned data MMSA reads audio and vision up to the text's token
  count; msakit up to their own lengths (every frame of an aligned pickle). Self-MM's published
  settings are unaligned.
- Empty centre (no setting; MMSA gives NaN). When no sample of the memory has a positive (or
  negative) label for a head, that centre keeps its previous value (zero before the first update)
  instead of becoming the mean of nothing.
- Missing modalities (absent from MMSA). The model ignores `presence`, as MMSA's does: it reads
  the zeroed inputs a missing-data protocol leaves.
- Text. Precomputed text features (`text_source: features`) are read at their first step, where
  MMSA's BERT features hold [CLS]. MMSA's `t_bert_dropout` is never used by its model, and its
  LSTM subnetworks work only with one layer (the published value): neither is a setting here.
  MMSA's optional dump of the generated labels (`save_labels`) is not reproduced.
- Selection (none needed). MMSA keeps the checkpoint with the best validation loss (`KeyEval:
  Loss`, the mean of the per-batch L1 losses) and stops after 8 epochs without improvement; msakit
  selects on validation MAE (`select_metric: mae`, the same up to the weight of the last, smaller
  batch) with `patience: 8`. MMSA has no epoch ceiling; `epochs` here is one. The test split
  enters only where the published settings were chosen: MMSA's tune mode (`run.py`, `_run` with
  `is_tune`) scores every hyperparameter set on test. The YAML takes those settings as published;
  msakit's own searches select on validation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from msakit.data.schema import Batch, FeatureDims
from msakit.errors import MsakitError
from msakit.models.base import (
    FLAG,
    POSITIVE,
    RATE,
    SIZE,
    WEIGHT,
    ModelConfig,
    MSAModel,
    Output,
    ParameterGroup,
    setting,
)
from msakit.models.layers.subnets import TextSubNet
from msakit.models.layers.text import TextEncoder
from msakit.models.registry import register_model

HEADS = ("fusion", "text", "audio", "vision")  # the label memory's columns
UNIMODAL = HEADS[1:]
EPS = 1e-8  # MMSA's MIN, in the distance ratios


@dataclass
class SelfMMConfig(ModelConfig):
    """Self-MM's settings; the defaults are MMSA's MOSI values (config_regression.json)."""

    audio_hidden: int = setting(16, SIZE)  # a_lstm_hidden_size
    vision_hidden: int = setting(32, SIZE)  # v_lstm_hidden_size
    audio_out: int = setting(16, SIZE)
    vision_out: int = setting(32, SIZE)  # video_out
    audio_lstm_dropout: float = setting(0.0, RATE)  # on the LSTM's last state (a_lstm_dropout)
    vision_lstm_dropout: float = setting(0.0, RATE)
    post_fusion_dim: int = setting(128, SIZE)
    post_text_dim: int = setting(32, SIZE)
    post_audio_dim: int = setting(16, SIZE)
    post_vision_dim: int = setting(32, SIZE)  # post_video_dim
    post_fusion_dropout: float = setting(0.0, RATE)
    post_text_dropout: float = setting(0.1, RATE)
    post_audio_dropout: float = setting(0.1, RATE)
    post_vision_dropout: float = setting(0.0, RATE)
    label_bound: float = setting(3.0, POSITIVE)  # H: generated labels are clipped to [-H, H]
    exclude_zero: bool = setting(True, FLAG)  # excludeZero: label 0 counts as neither side
    # the audio and vision subnetworks' own optimiser group (MMSA's learning_rate_audio/_video,
    # weight_decay_audio/_video); null: training.lr, training.weight_decay
    audio_lr: float | None = setting(None, WEIGHT.or_null())
    audio_weight_decay: float | None = setting(None, WEIGHT.or_null())
    vision_lr: float | None = setting(None, WEIGHT.or_null())
    vision_weight_decay: float | None = setting(None, WEIGHT.or_null())


class Head(nn.Module):
    """Dropout -> Linear -> ReLU (the representation F_s) -> Linear -> ReLU -> Linear (the score)."""

    def __init__(self, in_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.layer_1 = nn.Linear(in_dim, hidden)
        self.layer_2 = nn.Linear(hidden, hidden)
        self.layer_3 = nn.Linear(hidden, 1)

    def represent(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.layer_1(self.dropout(x)))

    def score(self, representation: torch.Tensor) -> torch.Tensor:
        return self.layer_3(F.relu(self.layer_2(representation))).squeeze(-1)


class LabelMemory:
    """The ULGM's memory over a training split: labels per head (N,), the latest representation
    per head (N, d_s), and per head the positive and negative centres (2, d_s)."""

    def __init__(self, labels: torch.Tensor, ids: np.ndarray, widths: dict[str, int]) -> None:
        self.ids = ids
        self.labels = {s: labels.clone() for s in HEADS}
        self.features = {s: labels.new_zeros(len(labels), widths[s]) for s in HEADS}
        self.centres = {s: labels.new_zeros(2, widths[s]) for s in HEADS}

    def check(self, batch: Batch) -> None:
        positions = batch.index.cpu().numpy()
        if positions.max(initial=-1) >= len(self.ids) or list(self.ids[positions]) != list(batch.ids):
            raise MsakitError(
                "self_mm: a training batch is not from the split the label memory was built on "
                "(on_train_epoch_start)"
            )

    def gap(self, head: str, representation: torch.Tensor) -> torch.Tensor:
        """a_s = (D^- - D^+) / (D^+ + eps): how much nearer the positive centre than the negative."""
        positive, negative = self.centres[head]
        to_positive = torch.norm(representation - positive, dim=-1)
        to_negative = torch.norm(representation - negative, dim=-1)
        return (to_negative - to_positive) / (to_positive + EPS)

    @torch.no_grad()
    def update(self, representations: dict[str, torch.Tensor], index: torch.Tensor, epoch: int,
               bound: float, exclude_zero: bool) -> None:
        """One ULGM step for the samples at `index` (labels from epoch 2 on, then representations
        and centres)."""
        if epoch > 1:
            fused_gap = self.gap("fusion", representations["fusion"])
            fused = self.labels["fusion"][index]
            for head in UNIMODAL:
                own_gap = self.gap(head, representations[head])
                ratio = own_gap / (fused_gap + EPS)
                target = 0.5 * ratio * fused + 0.5 * (fused + own_gap - fused_gap)
                target = target.clamp(-bound, bound)
                self.labels[head][index] = ((epoch - 1) / (epoch + 1) * self.labels[head][index]
                                            + 2 / (epoch + 1) * target)
        for head in HEADS:
            self.features[head][index] = representations[head]
        for head in HEADS:
            labels = self.labels[head]
            sides = (labels > 0 if exclude_zero else labels >= 0, labels < 0)
            for side, chosen in enumerate(sides):
                if chosen.any():
                    self.centres[head][side] = self.features[head][chosen].mean(dim=0)

    def state(self) -> dict[str, Any]:
        return {"ids": self.ids.tolist(), "labels": self.labels, "features": self.features,
                "centres": self.centres}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> LabelMemory:
        memory = cls.__new__(cls)
        memory.ids = np.asarray(state["ids"])
        for key in ("labels", "features", "centres"):
            setattr(memory, key, {s: v.to(device) for s, v in state[key].items()})
        return memory


def whole_batch(index: torch.Tensor, representations: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The whole batch's positions and representations, in batch order. Under torchrun each rank
    holds a contiguous part of every batch (`training_shards`), and every rank's memory must see
    every sample's update, so the parts are gathered; a rank left without samples holds the
    batch's first one again, which is dropped. One process: the batch as it is."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return index, representations
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (index.cpu(), {s: r.cpu() for s, r in representations.items()}))
    gathered = torch.cat([positions for positions, _ in parts])
    _, first = np.unique(gathered.numpy(), return_index=True)
    keep = torch.as_tensor(np.sort(first))
    return gathered[keep].to(index.device), {
        s: torch.cat([part[s] for _, part in parts])[keep].to(r.device)
        for s, r in representations.items()}


@register_model("self_mm")
class SelfMM(MSAModel):
    """Self-MM: multi-task heads whose unimodal labels are generated during training (ULGM)."""

    config_class = SelfMMConfig

    def __init__(self, config: SelfMMConfig, dims: FeatureDims) -> None:
        super().__init__(config, dims)
        self.text_encoder = TextEncoder(config, dims)
        self.audio = TextSubNet(dims.audio, config.audio_hidden, config.audio_out,
                                config.audio_lstm_dropout)
        self.vision = TextSubNet(dims.vision, config.vision_hidden, config.vision_out,
                                 config.vision_lstm_dropout)
        text_dim = self.text_encoder.out_dim
        self.heads = nn.ModuleDict({
            "fusion": Head(text_dim + config.audio_out + config.vision_out, config.post_fusion_dim,
                           config.post_fusion_dropout),
            "text": Head(text_dim, config.post_text_dim, config.post_text_dropout),
            "audio": Head(config.audio_out, config.post_audio_dim, config.post_audio_dropout),
            "vision": Head(config.vision_out, config.post_vision_dim, config.post_vision_dropout),
        })
        self.memory: LabelMemory | None = None  # the ULGM's, built by on_train_epoch_start
        self.epoch = 1

    def forward(self, batch: Batch) -> Output:
        states, _ = self.text_encoder(batch)
        text = states[:, 0]
        audio = self.audio(batch.audio, batch.audio_mask)
        vision = self.vision(batch.vision, batch.vision_mask)
        inputs = {"fusion": torch.cat([text, audio, vision], dim=-1), "text": text,
                  "audio": audio, "vision": vision}
        # every head's dropout before any second layer: MMSA's order of random draws
        representations = {s: self.heads[s].represent(inputs[s]) for s in HEADS}
        scores = {s: self.heads[s].score(representations[s]) for s in HEADS}
        features = {"fused": representations["fusion"],
                    **{s: representations[s] for s in UNIMODAL},
                    **{f"pred_{s}": scores[s] for s in UNIMODAL}}
        if not self.training or self.memory is None:
            return Output(pred=scores["fusion"], features=features)
        memory = self.memory
        memory.check(batch)
        index = batch.index.to(memory.labels["fusion"].device)
        fused = memory.labels["fusion"][index]
        losses = {}
        for s in UNIMODAL:
            target = memory.labels[s][index]
            weight = torch.tanh(torch.abs(target - fused))
            losses[s] = torch.mean(weight * torch.abs(scores[s] - target))
        cfg = self.config
        # the memory keeps the labels' precision whatever the forward computed in (autocast)
        index, detached = whole_batch(index, {s: r.detach().to(fused.dtype)
                                              for s, r in representations.items()})
        memory.update(detached, index, self.epoch, cfg.label_bound, cfg.exclude_zero)
        return Output(pred=scores["fusion"], losses=losses, features=features)

    def parameter_groups(self) -> tuple[ParameterGroup, ...]:
        """MMSA's optimiser groups of the audio and vision subnetworks (BERT's is the encoder's)."""
        cfg = self.config
        return (ParameterGroup("audio", ("audio.",), cfg.audio_lr, cfg.audio_weight_decay),
                ParameterGroup("vision", ("vision.",), cfg.vision_lr, cfg.vision_weight_decay))

    def on_train_epoch_start(self, epoch: int, train_batches: Callable[[], Iterator[Batch]]) -> None:
        """Keep the epoch number (the ULGM's n); before epoch 1 (or when no memory came back with
        a resumed training state) build the memory from the training split's labels."""
        self.epoch = epoch
        if epoch == 1 or self.memory is None:
            labels, ids = [], []
            for batch in train_batches():
                labels.append(batch.labels)
                ids.extend(batch.ids)
            widths = {s: self.heads[s].layer_1.out_features for s in HEADS}
            device = self.heads["fusion"].layer_1.weight.device
            self.memory = LabelMemory(torch.cat(labels).to(device), np.asarray(ids), widths)

    def training_state(self) -> dict[str, Any]:
        """The label memory: generated labels, representations and centres."""
        return {} if self.memory is None else self.memory.state()

    def load_training_state(self, state: dict[str, Any]) -> None:
        if state:
            self.memory = LabelMemory.from_state(state, self.heads["fusion"].layer_1.weight.device)
