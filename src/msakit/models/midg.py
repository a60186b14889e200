"""MIDG: Mixture of Invariant Experts with knowledge injection for Domain Generalization (Li, Luo and
Hu, "MIDG: Mixture of Invariant Experts with knowledge injection for Domain Generalization in
Multimodal Sentiment Analysis", arXiv 2512.07430, 2025). No official code is public.

The paper's two components: a Cross-Modal Adapter that injects knowledge from the other modalities
into each unimodal representation, and a Mixture of Invariant Experts over the fused multimodal
representation (experts that model inter-modal synergy, a gate, and an invariance objective across
the source domains). Only the abstract and the opening of the paper could be read here, so every
equation below is msakit's design; the assumptions are listed after the equations. Every width is
d (`hidden`); a modality m is text t, audio a or vision v.

1. Unimodal encoders. Text states (a fine-tuned BERT-style encoder or precomputed features), audio
   and vision frames: Linear(D_m -> d), then MulT's self-attention transformer (`CrossModalEncoder`:
   sqrt(d) scaling, sinusoidal positions, pre-LN, `encoder_layers` layers) over the valid steps of
   the modalities the sample has (mask AND `presence`): X_m (B, L_m, d), zeros where invalid.
2. Cross-Modal Adapter, one per target modality m, reading the other two modalities' tokens
   C_m = [X_x; X_y] (concatenated in time, with their masks):
       X~_m = X_m + W_up GELU( MHA(W_q LN(X_m), W_k LN(C_m), W_v LN(C_m)) )
   a bottleneck of width r = `adapter_dim` with `adapter_heads` heads (W_q, W_k, W_v: d -> r,
   W_up: r -> d). A sample with no other modality gets no injection. h_m = masked mean of X~_m.
3. Mixture of Invariant Experts over the fused representation u = [h_t; h_a; h_v]:
       s   = [h_t; h_a; h_v; h_t*h_a; h_t*h_v; h_a*h_v]                (the synergy input, 6d)
       e_k = W2_k Dropout(GELU(W1_k s))          k = 1..K              (K = `num_experts`)
       g   = softmax(W_g u)   (or, with `top_k`, a softmax over the top_k logits, 0 elsewhere)
       f   = sum_k g_k e_k,   y_hat = w^T f + b
   The gate weights are non-negative and sum to one, so with the linear head the prediction is
   the gate-weighted mean of the experts' own predictions y_k = w^T e_k + b.
4. Invariance objective (V-REx form: the variance of per-domain risks). With per-sample risk
   l(y_hat, y) (`risk`: |.| or squared), domain e of the batch and, for `invariance: experts`,
   expert k's risk on the samples it is routed to,
       R_e^k = sum_{i in e} g_ik l(y_ik, y_i) / sum_{i in e} g_ik       (g detached)
       L_inv = mean_k Var_e(R_e^k)         (population variance over the domains in the batch)
   `invariance: mixture` uses the risk of y_hat itself (one column, weights 1). L_inv is zero when
   every domain has the same risk and positive otherwise; it is zero for a batch with fewer than
   two domains, or without `batch.domains` (one domain).
5. Gate balance: L_bal = K sum_k (mean_i g_ik)^2 - 1, zero when the experts are used equally on
   average, so the gate cannot collapse onto one expert for free.
6. Loss: the trainer's task loss on y_hat plus `losses["invariance"]` = lambda_inv L_inv (0 during
   the first `invariance_warmup` epochs, counted by `on_train_epoch_start`) and
   `losses["balance"]` = lambda_bal L_bal.

Assumptions where the paper could not be read (msakit's choices):
- "Knowledge" is what the other two modalities of the same sample carry (the issue's wording);
  no external knowledge base or pretrained multimodal model is used. The adapter is a bottleneck
  residual cross-attention block, the usual adapter shape, applied once after the encoders.
- Experts see explicit pairwise products of the pooled modalities besides the modalities
  themselves, so that each expert can model inter-modal synergy (multiplicative interactions, as in
  tensor fusion) without TFN's outer-product cost. The gate is dense by default (K is small).
- The invariance objective is V-REx's (risk variance) rather than IRMv1's gradient penalty: it is
  cheap, exact for a regression loss and has the property the issue asks for. It is applied per
  expert (the experts are what is meant to be invariant), each expert's risk weighted by the
  routing, with the routing detached so that the gate is not rewarded for hiding an expert's
  domain-dependent errors; `invariance: mixture` applies it to the prediction instead.
- The per-domain risks of a batch estimate the domains' risks: batches should hold several samples
  of each source domain (a shuffled batch of 32 over 2-4 domains does).
- Sizes and weights (d, r, K, lambda_inv = 1, lambda_bal = 0.01, no warm-up) are not from the paper.
- Missing modalities: an absent modality (presence False or no valid step) is masked out of its
  encoder, gives no keys to the other adapters and pools to zeros, so its synergy terms are zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from msakit.data.schema import MODALITIES, Batch, FeatureDims
from msakit.models.base import COUNT, RATE, SIZE, WEIGHT, ModelConfig, MSAModel, Output, one_of, setting
from msakit.models.layers.attention import multi_head_attention
from msakit.models.layers.pooling import masked_mean
from msakit.models.layers.text import TextEncoder
from msakit.models.layers.transformer import CrossModalEncoder
from msakit.models.registry import register_model

INVARIANCE_TARGETS = ("experts", "mixture")
RISKS = ("l1", "mse")
OTHERS = {"text": ("audio", "vision"), "audio": ("text", "vision"), "vision": ("text", "audio")}


@dataclass
class MIDGConfig(ModelConfig):
    """MIDG's settings; the paper's values could not be read, these are msakit's (see the YAML)."""

    hidden: int = setting(64, SIZE, divisible_by="heads")  # d
    heads: int = setting(4, SIZE)  # unimodal encoders
    encoder_layers: int = setting(1, SIZE)
    embed_dropout: float = setting(0.1, RATE)
    adapter_dim: int = setting(32, SIZE, divisible_by="adapter_heads")  # r, the adapter's bottleneck
    adapter_heads: int = setting(4, SIZE)
    num_experts: int = setting(4, SIZE)  # K
    expert_hidden: int = setting(128, SIZE)
    # None: every expert, dense softmax gate
    top_k: int | None = setting(None, SIZE.or_null(), at_most="num_experts")
    dropout: float = setting(0.1, RATE)  # inside the experts
    # experts | mixture: whose per-domain risks must be equal
    invariance: str = setting("experts", one_of(*INVARIANCE_TARGETS))
    invariance_weight: float = setting(1.0, WEIGHT)
    invariance_warmup: int = setting(0, COUNT)  # epochs before the invariance term is switched on
    risk: str = setting("l1", one_of(*RISKS))  # l1 | mse: the per-sample risk of the invariance objective
    balance_weight: float = setting(0.01, WEIGHT)


def domain_risk_variance(
    losses: torch.Tensor, domains: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per column of `losses` (B, C), the variance over domains of the per-domain mean risk -> (C,).

    `domains` (B,) long names each sample's domain. A domain's risk in column c is the mean of its
    samples' losses weighted by `weights` (B, C) (uniform when None); a domain whose weights in
    column c sum to zero has no risk there. The variance is the population variance over the
    domains that have a risk; a column with fewer than two such domains gets 0.
    """
    names, inverse = torch.unique(domains, return_inverse=True)
    if weights is None:
        weights = torch.ones_like(losses)
    shape = (len(names), losses.shape[1])
    total = losses.new_zeros(shape).index_add_(0, inverse, weights * losses)
    mass = losses.new_zeros(shape).index_add_(0, inverse, weights)
    has_risk = mass > 0
    risks = total / mass.clamp(min=torch.finfo(losses.dtype).tiny)
    count = has_risk.sum(0)
    mean = (risks * has_risk).sum(0) / count.clamp(min=1)
    # a single domain is its own mean: its column comes out 0 without a special case
    return ((risks - mean).pow(2) * has_risk).sum(0) / count.clamp(min=1)


def gate_balance(gates: torch.Tensor) -> torch.Tensor:
    """K sum_k (mean_i g_ik)^2 - 1 of gate weights (B, K): 0 for equal mean use, up to K - 1."""
    usage = gates.mean(dim=0)
    return gates.shape[1] * usage.pow(2).sum() - 1.0


class CrossModalAdapter(nn.Module):
    """X + W_up GELU(MHA(W_q LN(X), W_k LN(C), W_v LN(C))): a bottleneck that lets a modality's tokens
    X (B, L, d) read the other modalities' tokens C (B, Lc, d)."""

    def __init__(self, dim: int, bottleneck: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, bottleneck, bias=False)
        self.to_kv = nn.Linear(dim, 2 * bottleneck, bias=False)
        self.up = nn.Linear(bottleneck, dim)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor
    ) -> torch.Tensor:
        empty = ~context_mask.any(dim=1)
        # a sample with no context key attends to all (zeroed) keys so the softmax stays finite;
        # its injection is zeroed below
        key_mask = context_mask | empty.unsqueeze(1)
        k, v = self.to_kv(self.context_norm(context)).chunk(2, dim=-1)
        read = multi_head_attention(self.to_q(self.norm(x)), k, v, self.heads, key_mask)
        injected = self.up(F.gelu(read))
        keep = mask & ~empty.unsqueeze(1)
        return x + injected.masked_fill(~keep.unsqueeze(-1), 0.0)


class MixtureOfExperts(nn.Module):
    """K synergy experts over [h_t; h_a; h_v] and their pairwise products, and a softmax gate."""

    def __init__(self, dim: int, num_experts: int, hidden: int, dropout: float, top_k: int | None) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(3 * dim, num_experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(6 * dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
            for _ in range(num_experts)
        )

    def gate_weights(self, fused: torch.Tensor) -> torch.Tensor:
        """(B, K) non-negative weights summing to one; with top_k, zero outside the top_k logits."""
        logits = self.gate(fused)
        if self.top_k is not None and self.top_k < logits.shape[1]:
            threshold = logits.topk(self.top_k, dim=1).values[:, -1:]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        return logits.softmax(dim=1)

    def forward(self, pooled: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """pooled [h_t, h_a, h_v] (B, d) each -> (expert outputs (B, K, d), gate weights (B, K))."""
        t, a, v = pooled
        fused = torch.cat(pooled, dim=-1)
        synergy = torch.cat([fused, t * a, t * v, a * v], dim=-1)
        outputs = torch.stack([expert(synergy) for expert in self.experts], dim=1)
        return outputs, self.gate_weights(fused)


@register_model("midg")
class MIDG(MSAModel):
    """Unimodal encoders, cross-modal adapters, a gated mixture of invariant synergy experts."""

    config_class = MIDGConfig

    def __init__(self, config: MIDGConfig, dims: FeatureDims) -> None:
        super().__init__(config, dims)
        d = config.hidden
        self.text_encoder = TextEncoder(config, dims)
        widths = {"text": self.text_encoder.out_dim, "audio": dims.audio, "vision": dims.vision}
        self.project = nn.ModuleDict({m: nn.Linear(widths[m], d) for m in MODALITIES})
        self.encoders = nn.ModuleDict({
            m: CrossModalEncoder(d, config.heads, config.encoder_layers, embed_dropout=config.embed_dropout)
            for m in MODALITIES
        })
        self.adapters = nn.ModuleDict({
            m: CrossModalAdapter(d, config.adapter_dim, config.adapter_heads) for m in MODALITIES
        })
        self.mixture = MixtureOfExperts(d, config.num_experts, config.expert_hidden, config.dropout,
                                        config.top_k)
        self.head = nn.Linear(d, 1)
        self.epoch = 1  # the trainer's epoch, for the invariance warm-up

    def encode(self, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per modality the encoded tokens X_m (B, L_m, d) and their masks (absent modalities: all False)."""
        text, text_mask = self.text_encoder(batch)
        inputs = {"text": (text, text_mask), "audio": (batch.audio, batch.audio_mask),
                  "vision": (batch.vision, batch.vision_mask)}
        tokens, masks = {}, {}
        for column, m in enumerate(MODALITIES):
            x, mask = inputs[m]
            mask = mask & batch.presence[:, column].unsqueeze(1)
            # masked_fill, not a product: padded raw frames may hold -inf
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
            tokens[m] = self.encoders[m](self.project[m](x), mask)
            masks[m] = mask
        return tokens, masks

    def inject(self, tokens: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The cross-modal adapters, then masked means: [h_t, h_a, h_v], each (B, d)."""
        pooled = []
        for m in MODALITIES:
            context = torch.cat([tokens[x] for x in OTHERS[m]], dim=1)
            context_mask = torch.cat([masks[x] for x in OTHERS[m]], dim=1)
            adapted = self.adapters[m](tokens[m], masks[m], context, context_mask)
            pooled.append(masked_mean(adapted, masks[m]))
        return pooled

    def forward(self, batch: Batch) -> Output:
        pooled = self.inject(*self.encode(batch))
        experts, gates = self.mixture(pooled)
        fused = (gates.unsqueeze(-1) * experts).sum(dim=1)
        pred = self.head(fused).squeeze(-1)
        expert_preds = self.head(experts).squeeze(-1)  # (B, K); pred = sum_k g_k expert_preds_k
        features = {"fused": fused, "gate": gates, "experts": expert_preds,
                    "unimodal": torch.cat(pooled, dim=-1)}
        if not self.training:
            return Output(pred=pred, features=features)
        cfg = self.config
        losses = {
            "invariance": cfg.invariance_weight * self.invariance_penalty(pred, expert_preds, gates, batch)
            if self.epoch > cfg.invariance_warmup else pred.new_zeros(()),
            "balance": cfg.balance_weight * gate_balance(gates),
        }
        return Output(pred=pred, losses=losses, features=features)

    def invariance_penalty(
        self, pred: torch.Tensor, expert_preds: torch.Tensor, gates: torch.Tensor, batch: Batch
    ) -> torch.Tensor:
        """L_inv: the mean over experts (or of the prediction) of the variance of per-domain risks."""
        if batch.domains is None:
            return pred.new_zeros(())
        labels = batch.labels.unsqueeze(1)
        if self.config.invariance == "experts":
            outputs, weights = expert_preds, gates.detach()
        else:
            outputs, weights = pred.unsqueeze(1), None
        error = outputs - labels
        losses = error.abs() if self.config.risk == "l1" else error.pow(2)
        return domain_risk_variance(losses, batch.domains, weights).mean()

    def on_train_epoch_start(self, epoch: int, train_batches: Callable[[], Iterator[Batch]]) -> None:
        """Count epochs: the invariance term starts after `invariance_warmup` of them."""
        self.epoch = epoch
