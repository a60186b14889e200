"""MMIM: MultiModal InfoMax (Han, Chen and Poria, "Improving Multimodal Fusion with Hierarchical
Mutual Information Maximization for Multimodal Sentiment Analysis", EMNLP 2021), as the MMSA
framework implements and trains it (thuiar/MMSA @a94e65d, `models/singleTask/MMIM.py` and
`trains/singleTask/MMIM.py`).

1. Encoders. Text: a fine-tuned BERT-style encoder over the `text_bert` ids, its first ([CLS])
   state h_t (B, D_t). Audio and vision: a one-layer bidirectional LSTM over the valid frames
   (packed), its forward and backward final hidden states concatenated, a linear map:
   h_a (B, `audio_out`), h_v (B, `vision_out`).
2. Fusion and prediction: z = tanh(W_2 tanh(W_1 Dropout([h_t; h_a; h_v]))) (B, `fusion_hidden`),
   y^ = W_3 z.
3. Input-level MI lower bound (MMILB), for the pairs (x, y) = (h_t, h_v), (h_t, h_a) and, with
   `va_bound`, (h_v, h_a): a Gaussian q(y | x) = N(mu(x), diag(exp(logvar(x)))), mu and logvar
   each Linear-ReLU-Linear, and its log-likelihood without constants and without the log-variance
   term (as MMSA and the authors compute it):
       lld = mean_b sum_d -(mu_d(x_b) - y_bd)^2 / (2 exp(logvar_d(x_b)))
   and, in the main training phase, the entropy of p(y) estimated with a two-component Gaussian
   mixture (one component for the samples of positive label, one for negative; exact zeros in
   neither) over p = tanh(W_e y) (width y's / 4): with Sigma_+ and Sigma_- the covariance matrices
   (divided by n) of the memory of the last `entropy_memory` batches' projections plus this
   batch's, H = (log det Sigma_+ + log det Sigma_-) / 4. LLD and H are summed over the pairs.
4. Fusion-level contrastive bound (CPC): for each m in {t, a, v}, with g_m a linear map of z
   (`cpc_layers` > 1: Linear-Tanh then Linear layers) and both sides scaled to unit norm,
       NCE_m = -mean_b (<h_mb, g_m(z_b)> - log sum_b' exp <h_mb, g_m(z_b')>)
5. Two optimisation phases per epoch (`MSAModel.extra_phases`). Phase "bound": the MMILB
   estimators' parameters (mu and logvar) maximise lld (loss -lld) at
   `bound_lr` / `bound_weight_decay`, over the first `bound_share` of the batches. Then the main
   phase: every other parameter minimises
       |y^ - y| + alpha NCE - beta lld - beta H
   with alpha = `nce_weight`, beta = `mi_weight`; -beta H enters from the batch after the memory
   fills (batch index > `entropy_memory`, counted from 0 in each epoch), and the memory is
   emptied at the start of every epoch. The first term is the trainer's task loss
   (`training.loss: l1`), the others are `losses["nce"]`, `losses["lld"]` and `losses["entropy"]`.
   With `contrast: false` there is no bound phase, the estimators are frozen (MMSA never steps
   them then, but counts W_e's gradients in the clipped norm), and only -beta H is added to the
   task loss.
   The gradients of the whole model are clipped together in both phases (`training.grad_clip`),
   as MMSA does. The entropy projections W_e belong to the bound phase's optimiser, whose loss
   never reads them, so they keep their initial values (as in MMSA), while their gradients from
   -beta H count in the main phase's clipped norm. Every weight matrix outside the text encoder
   starts from Xavier-normal values (MMSA's trainer), biases keep PyTorch's initial values.

Where this differs from MMSA, and the setting that restores MMSA's behaviour
(benchmarks/parity/mmim.py checks predictions, every loss term and gradients):
- Too few samples for a covariance (no setting; MMSA gives -inf or NaN). When a mixture component
  has no more samples (memory and batch) than the projection is wide, its covariance is singular
  and log det is -inf: that pair's entropy term is left out of the batch's H. The published
  settings (batches of 32, width 4) reach it only in a batch with under 5 positive or negative
  samples.
- A singular covariance in float (no setting; MMSA gives NaN). On raw-scale input the Tanh of the
  entropy projection saturates, the samples coincide and a covariance's determinant rounds to 0 or
  below: that pair's entropy term is left out, as with too few samples.
- A bounded log-variance (no setting; MMSA gives inf). MMILB's logvar is clamped to
  [-LOGVAR_BOUND, LOGVAR_BOUND] (variances 2e-9 to 5e8): on raw-scale input an unbounded logvar
  goes far below -88, exp(logvar) underflows to 0 and lld is infinite. Trained on normalised
  features it stays well inside (the parity check never reaches the bound).
- Zero vectors in CPC (no setting; MMSA gives NaN). A zero representation (a modality a
  missing-data protocol zeroed) stays zero when scaled to unit norm (`F.normalize`).
- Optimiser (`training.optimizer`, `plateau`, `encoder_decay_norms_and_biases`). MMSA uses Adam
  with coupled L2 weight decay in two optimisers: the MMILB estimators at `lr_mmilb` /
  `weight_decay_mmilb`, and BERT (`lr_bert`, `weight_decay_bert`) and the rest (`lr_main`,
  `weight_decay_main`), every parameter decayed. The MMSA sections set `optimizer: adam` (L2
  decay), which the bound phase's optimiser follows: the bound phase at its own rate and decay,
  `training.encoder_lr` / `encoder_weight_decay` for the encoder (its biases and LayerNorm gains
  decayed too: `encoder_decay_norms_and_biases`; msakit's default exempts them) and
  `training.lr` / `weight_decay` for the rest (biases decayed too: `decay_norms_and_biases`). MMSA's
  ReduceLROnPlateau on the main optimiser (factor 0.5, patience `when` 20) is `plateau: {factor:
  0.5, patience: 20}`, stepped on the validation MAE where MMSA steps on its validation L1 loss
  (the same error, but the mean of per-batch means rounded to 4 decimals); it can act only if the
  MAE keeps improving, by less than 1e-4 of it, at least every 8 epochs (else early stopping ends
  the run first).
- Padding. Audio and vision LSTMs read each modality's own valid frames, as MMSA does on the
  published (unaligned) data; on word-aligned data MMSA reads them up to the text's token count
  ([CLS] and [SEP] included), which `rnn_lengths: text` restores (capped at each modality's
  padded length).
  A sample with no valid frame runs one zeroed step (MMSA crashes: an LSTM over length 0). MMSA's
  encoders fail on a batch of one (a squeeze) and on more than one LSTM layer; here one layer, as
  published, and any batch size.
- Missing modalities (absent from MMSA). The model ignores `presence`, as MMSA's does: it reads
  the zeroed inputs a missing-data protocol leaves.
- Settings that change nothing in MMSA's published runs are not offered: LSTM dropout (only
  active with several layers), the MMILB activations (ReLU; the "last" Tanh is never applied) and
  the CPC activation (Tanh). `update_epochs` is not read by MMSA's MMIM trainer.
- Text. Precomputed text features (`text_source: features`) are read at their first step, where
  MMSA's BERT features hold [CLS].
- Under torchrun each process keeps the entropy memory of its own part of the batches, so H
  estimates the covariances from that part.
- Selection (none needed). MMSA keeps the checkpoint with the best validation loss (the mean of
  the per-batch L1 losses) and stops after 8 epochs without improvement; msakit selects on
  validation MAE (`select_metric: mae`) with `patience: 8`. MMSA has no epoch ceiling; `epochs` here
  is one. The test split enters only where the published settings were chosen (MMSA's tune mode
  scores every hyperparameter set on test); the YAML takes those settings as published.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from msakit.data.schema import Batch, FeatureDims
from msakit.models.base import (
    FLAG,
    POSITIVE,
    RATE,
    SIZE,
    WEIGHT,
    ExtraPhase,
    ModelConfig,
    MSAModel,
    Output,
    Rule,
    one_of,
    setting,
)
from msakit.models.layers.pooling import valid_lengths
from msakit.models.layers.text import TextEncoder
from msakit.models.registry import register_model

SHARE = Rule("a fraction in (0, 1]", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
             and 0 < v <= 1)
# the entropy projection of an MMILB is a quarter as wide as its y
QUARTERABLE = Rule("an integer >= 4", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 4)
BOUND_PHASE = "bound"


@dataclass
class MMIMConfig(ModelConfig):
    """MMIM's settings; the defaults are MMSA's MOSI values."""

    audio_hidden: int = setting(16, SIZE)  # d_ah
    vision_hidden: int = setting(16, SIZE)  # d_vh
    audio_out: int = setting(16, QUARTERABLE)  # d_aout
    vision_out: int = setting(16, QUARTERABLE)  # d_vout
    bidirectional: bool = setting(True, FLAG)
    fusion_hidden: int = setting(128, SIZE)  # d_prjh
    fusion_dropout: float = setting(0.1, RATE)  # dropout_prj
    cpc_layers: int = setting(1, SIZE)
    va_bound: bool = setting(False, FLAG)  # add_va: an MMILB between vision and audio too
    contrast: bool = setting(True, FLAG)  # the bounds in the loss and the bound phase
    nce_weight: float = setting(0.1, WEIGHT)  # alpha
    mi_weight: float = setting(0.1, WEIGHT)  # beta, of lld and of H
    entropy_memory: int = setting(1, SIZE)  # mem_size: batches kept for the entropy estimate
    bound_lr: float = setting(1e-3, POSITIVE)  # lr_mmilb
    bound_weight_decay: float = setting(1e-4, WEIGHT)  # weight_decay_mmilb
    bound_share: float = setting(1.0, SHARE)  # MMSA: 0.5 on MOSEI
    # the frames the LSTMs read: "own", each modality's valid ones; "text", as many as the text
    # has tokens (MMSA on word-aligned data)
    rnn_lengths: str = setting("own", one_of("own", "text"))


class FrameEncoder(nn.Module):
    """An LSTM over the valid frames; its last layer's final hidden states (both directions,
    concatenated) mapped linearly."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, bidirectional: bool) -> None:
        super().__init__()
        self.rnn = nn.LSTM(in_dim, hidden, batch_first=True, bidirectional=bidirectional)
        self.linear = nn.Linear((2 if bidirectional else 1) * hidden, out_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x: (B, L, D), mask: (B, L) bool -> (B, out_dim). The LSTM reads `lengths` (B,) frames
        (capped at L), or the valid ones, which alone are then read as they are."""
        if lengths is None:
            lengths = valid_lengths(mask)
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)  # padded values (even inf) never reach the LSTM
        lengths = lengths.clamp(min=1, max=x.shape[1]).cpu()
        _, (final, _) = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        directions = 2 if self.rnn.bidirectional else 1
        return self.linear(torch.cat(list(final[-directions:]), dim=-1))


LOGVAR_BOUND = 20.0


def gaussian_log_likelihood(mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MMILB's lld: mean over the batch of sum_d -(mu - y)^2 / (2 exp(logvar)), logvar bounded."""
    variance = logvar.clamp(-LOGVAR_BOUND, LOGVAR_BOUND).exp()
    return (-(mu - y).pow(2) / 2.0 / variance).sum(-1).mean()


def mixture_entropy(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor | None:
    """(log det Sigma_+ + log det Sigma_-) / 4 of two sample sets (N, D), each covariance the
    mean of the centred outer products; None when either has fewer than D + 1 samples, or when
    a covariance is singular in float (its determinant not above 0)."""
    width = positive.shape[1]
    if len(positive) <= width or len(negative) <= width:
        return None

    def covariance(samples: torch.Tensor) -> torch.Tensor:
        centred = samples - samples.mean(0)
        return (centred.unsqueeze(-1) @ centred.unsqueeze(1)).mean(0)

    signs, logdets = torch.linalg.slogdet(torch.stack([covariance(positive), covariance(negative)]))
    if not bool((signs > 0).all() and torch.isfinite(logdets).all()):
        return None
    return 0.25 * logdets.sum()


class MutualInformationLowerBound(nn.Module):
    """MMILB of one pair (x, y): q(y | x)'s mean and log-variance networks and the entropy
    projection of y."""

    def __init__(self, x_dim: int, y_dim: int) -> None:
        super().__init__()
        self.mu = nn.Sequential(nn.Linear(x_dim, y_dim), nn.ReLU(), nn.Linear(y_dim, y_dim))
        self.logvar = nn.Sequential(nn.Linear(x_dim, y_dim), nn.ReLU(), nn.Linear(y_dim, y_dim))
        # in the bound phase's optimiser (MMSA's), but only the main phase computes it: its
        # gradients count in the clipped norm and it keeps its initial values
        self.entropy_projection = nn.Sequential(nn.Linear(y_dim, y_dim // 4), nn.Tanh())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return gaussian_log_likelihood(self.mu(x), self.logvar(x), y)


class ContrastivePredictor(nn.Module):
    """CPC between a modality's representation x and the fusion z: predicts x from z."""

    def __init__(self, x_dim: int, z_dim: int, layers: int) -> None:
        super().__init__()
        if layers == 1:
            self.net: nn.Module = nn.Linear(z_dim, x_dim)
        else:
            stack: list[nn.Module] = [nn.Linear(z_dim, x_dim), nn.Tanh()]
            stack += [nn.Linear(x_dim, x_dim) for _ in range(layers - 1)]
            self.net = nn.Sequential(*stack)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(x, self.net(z))


def contrastive_loss(x: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """NCE of unit-norm x (B, D) against unit-norm predictions (B, D): the other samples of the
    batch are the negatives."""
    prediction, x = F.normalize(prediction, dim=1), F.normalize(x, dim=1)
    positive = (x * prediction).sum(-1)
    return -(positive - torch.logsumexp(x @ prediction.t(), dim=-1)).mean()


@register_model("mmim")
class MMIM(MSAModel):
    """MMIM: MI bounds between modalities (MMILB) and between modalities and fusion (CPC)."""

    config_class = MMIMConfig

    def __init__(self, config: MMIMConfig, dims: FeatureDims) -> None:
        super().__init__(config, dims)
        self.text_encoder = TextEncoder(config, dims)
        text_dim = self.text_encoder.out_dim
        # MMSA's order of parameters, which sets the order of the clipped norm's sum
        self.vision = FrameEncoder(dims.vision, config.vision_hidden, config.vision_out,
                                   config.bidirectional)
        self.audio = FrameEncoder(dims.audio, config.audio_hidden, config.audio_out, config.bidirectional)
        # the pairs (x, y) whose MI is bounded, by name: text-vision, text-audio, vision-audio
        self.pairs = {"tv": ("text", "vision"), "ta": ("text", "audio")}
        if config.va_bound:
            self.pairs["va"] = ("vision", "audio")
        widths = {"text": text_dim, "audio": config.audio_out, "vision": config.vision_out}
        self.bounds = nn.ModuleDict({
            pair: MutualInformationLowerBound(widths[x], widths[y]) for pair, (x, y) in self.pairs.items()
        })
        self.cpc = nn.ModuleDict({
            m: ContrastivePredictor(widths[m], config.fusion_hidden, config.cpc_layers)
            for m in ("text", "vision", "audio")
        })
        self.fusion_dropout = nn.Dropout(config.fusion_dropout)
        self.fusion_1 = nn.Linear(sum(widths.values()), config.fusion_hidden)
        self.fusion_2 = nn.Linear(config.fusion_hidden, config.fusion_hidden)
        self.head = nn.Linear(config.fusion_hidden, 1)
        for name, param in self.named_parameters():
            if param.dim() > 1 and not name.startswith("text_encoder."):
                nn.init.xavier_normal_(param)
        if not config.contrast:  # MMSA never steps them then (they are not in its main optimiser)
            self.bounds.requires_grad_(False)
        # the entropy projections of the last `entropy_memory` main-phase batches, per pair and sign
        self.memory: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        self.batch_in_epoch = 0

    def extra_phases(self) -> tuple[ExtraPhase, ...]:
        cfg = self.config
        if not cfg.contrast:
            return ()
        return (ExtraPhase(BOUND_PHASE, ("bounds.",), cfg.bound_lr, cfg.bound_weight_decay,
                           cfg.bound_share),)

    def on_train_epoch_start(self, epoch: int, train_batches: Callable[[], Iterator[Batch]]) -> None:
        self.memory = []
        self.batch_in_epoch = 0

    def forward(self, batch: Batch) -> Output:
        states, text_mask = self.text_encoder(batch)
        lengths = valid_lengths(text_mask) if self.config.rnn_lengths == "text" else None
        h = {"text": states[:, 0], "audio": self.audio(batch.audio, batch.audio_mask, lengths),
             "vision": self.vision(batch.vision, batch.vision_mask, lengths)}
        fused = torch.cat([h["text"], h["audio"], h["vision"]], dim=-1)
        z = torch.tanh(self.fusion_2(torch.tanh(self.fusion_1(self.fusion_dropout(fused)))))
        pred = self.head(z).squeeze(-1)
        features = {"fused": z, **h}
        if not self.training:
            return Output(pred=pred, features=features)
        lld = sum(self.bounds[pair](h[x], h[y]) for pair, (x, y) in self.pairs.items())
        if self.phase == BOUND_PHASE:
            return Output(pred=pred, losses={"bound": -lld}, features=features)
        return Output(pred=pred, losses=self._main_losses(batch, h, z, lld), features=features)

    def _main_losses(self, batch: Batch, h: dict[str, torch.Tensor], z: torch.Tensor,
                     lld: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        labels = batch.labels.to(z.device)
        projections = {}
        for pair, (_, y) in self.pairs.items():
            p = self.bounds[pair].entropy_projection(h[y])
            projections[pair] = (p[labels > 0], p[labels < 0])
        losses = {}
        if cfg.contrast:
            nce = sum(self.cpc[m](h[m], z) for m in ("text", "vision", "audio"))
            losses = {"nce": cfg.nce_weight * nce, "lld": -cfg.mi_weight * lld}
        if self.batch_in_epoch > cfg.entropy_memory:
            entropy = None
            for pair, (positive, negative) in projections.items():
                term = mixture_entropy(torch.cat([*(m[pair][0] for m in self.memory), positive]),
                                       torch.cat([*(m[pair][1] for m in self.memory), negative]))
                if term is not None:
                    entropy = term if entropy is None else entropy + term
            if entropy is not None:
                losses["entropy"] = -cfg.mi_weight * entropy
        detached = {pair: (p.detach(), n.detach()) for pair, (p, n) in projections.items()}
        if len(self.memory) < cfg.entropy_memory:
            self.memory.append(detached)
        else:  # the oldest entry makes way
            self.memory[self.batch_in_epoch % cfg.entropy_memory] = detached
        self.batch_in_epoch += 1
        return losses
