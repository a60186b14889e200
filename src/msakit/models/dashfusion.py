"""DashFusion: Dual-stream Alignment with Hierarchical Bottleneck Fusion (Wen et al., "DashFusion:
Dual-Stream Alignment With Hierarchical Bottleneck Fusion for Multimodal Sentiment Analysis",
IEEE TNNLS 36(10), 2025; official code ultramarineX/DashFusion). Every width below is d = 128.

1. Encoders. Text: a fine-tunable BERT-style encoder, then Linear-GELU-Linear-GELU to d (no
   biases) and LayerNorm, padded tokens zeroed: X_t (B, L_t, d). Audio and vision: Linear(D_m -> d),
   a learned CLS token (ones at start) in front, learned positions (zeros at start), embedding
   dropout, a post-LN transformer encoder (8 heads, FFN 2d, GELU; 2 layers for MOSI/SIMS, 4 for
   MOSEI) with padding masks, a final LayerNorm, padded frames zeroed: X_a, X_v (B, 1 + L_m, d).
2. Temporal alignment: the text queries audio and vision (8 heads x 32, no biases on q/k/v):
       H = X_t + W_o (CA(X_t, X_a) + CA(X_t, X_v))
3. Semantic alignment (training only): pooled views z_t, z_a, z_v (masked means of X_t, X_a with
   its CLS, X_v with its CLS) and z_f = H[:, 0]. For each sample and view, an NT-Xent term
   (temperature 0.5) per positive pair against the view's negatives:
       l(x, p) = -log( e^{s(x,p)/tau} / (e^{s(x,p)/tau} + sum_n e^{s(x,n)/tau}) ),  s = cosine
   positives: 2 of the view's label-matched neighbours and, for the text view, this sample's own
   z_a and z_v (cross-modal alignment); negatives: 2 hard (most similar, other label) and 2 easy
   (least similar, other label) neighbours, drawn at every step from lists of 10. The neighbours'
   views are computed by the model at every step, like the anchor's (6 more samples per anchor,
   with gradient). The loss is the sum of these 10 terms per anchor divided by 22, the pairs the
   official pair list holds (it also pairs each neighbour's own z_t with its z_a and z_v; those
   12 pairs have no negatives and cost exactly 0), averaged over the batch and weighted 0.2.
   Neighbours come from an index over the whole training split (cosine of [z_t; z_a; z_v], label
   buckets round(y / label_bucket): 1 for MOSI/MOSEI, as np.round; 0.2 for SIMS, whose labels,
   multiples of 0.2, the official loader compares as they are), rebuilt every 2 epochs from the
   model itself in eval mode (`on_train_epoch_start`).
4. Hierarchical bottleneck fusion (depth 2 for MOSI/SIMS, 3 for MOSEI): level 0 starts from H,
   every level runs one self-attention block over the bottleneck and keeps its first n_l tokens
   (n = 8, 4, 2, ...), gathers from text, audio and vision at once,
       B <- LN2(B' + FF(B')),  B' = LN1(B + CA(B, X_t) + CA(B, X_a) + CA(B, X_v)),
   then each modality reads the bottleneck: X_m <- X_m + LN(A(X_m, B)), X_m <- X_m + LN(FF(X_m))
   (at the last level only for the first token, the one the head reads).
   The self- and modality-update blocks use the official attention: biased q/k/v, heads
   concatenated without an output projection, logits scaled by 1/sqrt(d) (not 1/sqrt(d/heads)).
5. Head: [B[:, 0]; X_t[:, 0]; X_a[:, 0]; X_v[:, 0]] -> 2d -> d -> 1 (GELU). Loss: MSE + 0.2 L_con.

Where this differs from the official code, and the setting that restores the official behaviour
(benchmarks/parity/dashfusion.py checks the rest to float precision):
- Neighbour index (a bug fix; `neighbour_index: official` restores the bug). The official
  `__pre_sample` stores the RANK POSITION j of each neighbour instead of its sample id rank[i][j]
  (and compares the sample i with a rank position to skip itself), and the positions are then
  used as sample ids: its positives and hard negatives are samples among the first few dozen of
  the file, its easy negatives (negative positions) the last few, whatever their labels and
  features. Here the index holds sample positions (`fixed`, the default). Either is built block
  by block instead of from two dense N x N matrices (similarities and ranks, 1 GB each at MOSEI
  size) and a Python loop over all N^2 pairs. The official MOSEI and SIMS loaders scan only part
  of each ranking (top N/2 and bottom N/8; top N/1.6 and bottom N/2); with lists of 10 over
  thousands of samples that can shorten a list only for a label that few samples hold, and it is
  not reproduced.
- Neighbour embeddings (`neighbour_views: bank`, a saving; the default `live` is the official
  behaviour). The neighbours' views are read from a memory bank of the whole training split,
  computed in eval mode without gradient together with the index every `refresh_every` epochs,
  instead of running the 6 neighbours of every anchor through the model at every step (7x the
  compute, BERT included); only the anchor's own views carry the gradient. `live` keeps the
  training split's inputs in CPU memory as well.
- Contrastive mean (`contrastive_mean: loss_pairs`; the default `all_pairs` is official). The sum
  is divided by the number of pairs that carry a loss (10 per anchor) instead of 22, so at the
  same weight 0.2 the term is about 2.2x as strong.
- Padding (a bug fix; `attend_padding: true` restores the official behaviour). The official
  temporal alignment and fusion attend to padded text tokens and padded frames; here padding is
  masked out of every attention, so it cannot change a prediction. The official loader also
  takes the frame masks from all-zero frames, msakit from the recorded lengths (the same on
  zero-padded files, unless a real frame sums to 0). A text shorter than the bottleneck is
  padded up to it so that the bottleneck never depends on how much padding a batch carries.
- Missing modalities (absent from the official code). An audio or vision stream whose `presence`
  is False is masked out entirely (only its CLS token remains, so it contributes a learned
  constant; with `attend_padding` its zeroed frames are attended as padding); absent modalities
  take no part in the contrastive loss. `all_pairs` still divides by 22 per anchor.
- Text comes from msakit's `TextEncoder` over the dataset's `text_bert` ids (the official code
  re-tokenises the raw text up to 128 tokens with bert-base-uncased / bert-base-chinese), or from
  precomputed features. The official `TemporalAlignment` also builds a feed-forward block and two
  LayerNorms that its forward never uses, the projector a dropout whose result is discarded, and
  the audio and vision encoders `fc`, `dense` and `cls_embedding` layers that are never called:
  they are left out.
- Names only: the official fusion is called as HBF(H, X_t, X_v, X_a), so its modules named for
  audio read vision and the other way round, and its head reads [B; X_t; X_v; X_a]. msakit names
  each module by what it reads and its head reads [B; X_t; X_a; X_v]: the same function, with
  the head's input columns exchanged (this matters only when porting weights).
- Weight decay (a training setting; neither value is exact). The official AdamW (torch's, eps
  1e-8) spares every bias and only BERT's LayerNorm gains (its name filter is "bias" and
  "LayerNorm.weight"), so the model's own LayerNorm gains are decayed; msakit spares the model's
  own biases and gains (`training.decay_norms_and_biases: false`, kept here) or decays both
  (`true`). The gap is a decay of lr x 1e-3 per step on those gains. BERT's biases and LayerNorm
  parameters are spared on both sides (`encoder_decay_norms_and_biases: false`, the default).
- Selection (no setting). The official loop saves its best-validation-MAE checkpoint from epoch 2
  on, so epoch 1's weights are never kept; msakit may select any epoch (this matters only when
  epoch 1 has the best validation MAE).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
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
    one_of,
    setting,
)
from msakit.models.layers.attention import multi_head_attention
from msakit.models.layers.neighbours import (
    LabelNeighbours,
    label_buckets,
    label_neighbours,
    masked_topk,
    similarity_blocks,
)
from msakit.models.layers.pooling import masked_mean
from msakit.models.layers.text import TextEncoder
from msakit.models.registry import register_model

FRAME_MODALITIES = ("audio", "vision")
VIEWS = ("text", "audio", "vision", "fused")  # pooled views of the contrastive loss, in bank order
NEIGHBOUR_INDEXES = ("fixed", "official")
NEIGHBOUR_VIEWS = ("live", "bank")
CONTRASTIVE_MEANS = ("all_pairs", "loss_pairs")


@dataclass
class DashFusionConfig(ModelConfig):
    """DashFusion's settings; the defaults are the official MOSI configuration (src/config.py)."""

    hidden: int = setting(128, SIZE, divisible_by="heads")  # d: encoder_fea_dim = d_model
    heads: int = setting(8, SIZE)  # audio/vision encoders and fusion
    encoder_layers: int = setting(2, SIZE)  # audio/vision transformer depth: 2 MOSI/SIMS, 4 MOSEI
    encoder_ffn: int = setting(256, SIZE)
    encoder_dropout: float = setting(0.5, RATE)  # inside the audio/vision transformers (official default 0.5)
    embed_dropout: float = setting(0.1, RATE)  # after CLS + positions (a_drop_out, v_drop_out)
    align_heads: int = setting(8, SIZE)
    align_head_dim: int = setting(32, SIZE)
    fusion_depth: int = setting(2, SIZE)  # bottleneck levels: 2 MOSI/SIMS, 3 MOSEI
    bottleneck_tokens: int = setting(8, SIZE)  # at the first level; halved at each next one
    fusion_ffn: int = setting(256, SIZE)
    fusion_dropout: float = setting(0.0, RATE)
    contrastive_weight: float = setting(0.2, WEIGHT)
    temperature: float = setting(0.5, POSITIVE)  # "heat"
    refresh_every: int = setting(2, SIZE)  # epochs between rebuilds of the memory bank and neighbour index
    neighbour_pool: int = setting(10, SIZE)  # neighbours of each kind kept per sample
    num_positives: int = setting(2, SIZE, at_most="neighbour_pool")  # drawn from the pool at every step
    # hard ones and as many easy ones, drawn at every step
    num_negatives: int = setting(2, SIZE, at_most="neighbour_pool")
    label_bucket: float = setting(1.0, POSITIVE)  # positives share round(label / label_bucket)
    index_block: int = setting(1024, SIZE)  # query rows per block of the neighbour search
    # "fixed" (sample ids) or "official" (rank positions used as ids)
    neighbour_index: str = setting("fixed", one_of(*NEIGHBOUR_INDEXES))
    # "live" (official: neighbours run through the model) or "bank"
    neighbour_views: str = setting("live", one_of(*NEIGHBOUR_VIEWS))
    # "all_pairs" (official: 22 pairs per anchor) or "loss_pairs"
    contrastive_mean: str = setting("all_pairs", one_of(*CONTRASTIVE_MEANS))
    # True: alignment and fusion attend to padding, as the official code
    attend_padding: bool = setting(False, FLAG)


def feed_forward(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
    )


class EncoderLayer(nn.Module):
    """Post-LN self-attention layer, the computation of `nn.TransformerEncoderLayer` with GELU:
    x <- LN(x + Drop(SA(x))), x <- LN(x + Drop(FF(x))), with one dropout rate for the attention
    weights, the residual branches and the feed-forward hidden layer. Written out so that padded
    batches reach the fused attention kernels (PyTorch's inference fast path for masked sequences
    is several times slower on a CPU)."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attended = self.out(multi_head_attention(q, k, v, self.heads, key_mask, dropout=p))
        x = self.norm1(x + F.dropout(attended, p, self.training))
        return self.norm2(x + F.dropout(self.ff(x), p, self.training))


class FrameEncoder(nn.Module):
    """Audio or vision: (B, L, D_m) frames -> (B, 1 + L, d) states (CLS first), padded ones zeroed."""

    def __init__(self, in_dim: int, max_len: int, config: DashFusionConfig) -> None:
        super().__init__()
        d = config.hidden
        self.max_len = max_len
        self.project = nn.Linear(in_dim, d)
        self.cls = nn.Parameter(torch.ones(1, 1, d))
        self.positions = nn.Parameter(torch.zeros(1, max_len + 1, d))
        self.dropout = nn.Dropout(config.embed_dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(d, config.heads, config.encoder_ffn, config.encoder_dropout)
            for _ in range(config.encoder_layers)
        )
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`mask` (B, L) True on valid frames -> (states, mask with the CLS step in front)."""
        length = x.shape[1]
        if length > self.max_len and not bool(mask[:, self.max_len:].any()):
            x, mask, length = x[:, : self.max_len], mask[:, : self.max_len], self.max_len
        if length > self.max_len:
            raise MsakitError(
                f"dashfusion: a sequence of {length} frames is longer than the {self.max_len} the "
                "model was built for"
            )
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0)  # padding may hold inf; it must not reach a value
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.project(x)], dim=1)
        x = self.dropout(x + self.positions[:, : length + 1])
        mask = F.pad(mask, (1, 0), value=True)
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x).masked_fill(~mask.unsqueeze(-1), 0.0), mask


class TemporalAlignment(nn.Module):
    """H = X_t + W_o (CA(X_t, X_a) + CA(X_t, X_v)): each text token reads audio and vision."""

    def __init__(self, config: DashFusionConfig) -> None:
        super().__init__()
        d, inner = config.hidden, config.align_heads * config.align_head_dim
        self.heads = config.align_heads
        self.to_q = nn.Linear(d, inner, bias=False)
        self.to_k = nn.ModuleDict({m: nn.Linear(d, inner, bias=False) for m in FRAME_MODALITIES})
        self.to_v = nn.ModuleDict({m: nn.Linear(d, inner, bias=False) for m in FRAME_MODALITIES})
        self.to_out = nn.Sequential(nn.Linear(inner, d), nn.Dropout(config.fusion_dropout))

    def forward(
        self, text: torch.Tensor, sources: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        q = self.to_q(text)
        read = sum(
            multi_head_attention(q, self.to_k[m](x), self.to_v[m](x), self.heads, mask)
            for m, (x, mask) in sources.items()
        )
        return text + self.to_out(read)


class FusionAttention(nn.Module):
    """The official fusion attention: biased q/k/v, heads concatenated with no output projection,
    logits scaled by 1/sqrt(d) of the full width."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = dim**-0.5
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, source: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return multi_head_attention(
            self.to_q(x), self.to_k(source), self.to_v(source), self.heads, key_mask, self.scale
        )


class NormedResidualBlock(nn.Module):
    """x <- x + LN(Attn(x, s)), then x <- x + LN(FF(x)); s = x (self-attention) unless given."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.attn = FusionAttention(dim, heads)
        self.attn_norm = nn.LayerNorm(dim)
        self.ff = feed_forward(dim, ffn, dropout)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        source: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        keep: int | None = None,
    ) -> torch.Tensor:
        """`keep`: only the first `keep` positions are wanted, so only they are computed (the
        block is position-wise after the attention, so the result is the same)."""
        source = x if source is None else source
        if keep is not None:
            x = x[:, :keep]
        x = x + self.attn_norm(self.attn(x, source, key_mask))
        return x + self.ff_norm(self.ff(x))


class Gather(nn.Module):
    """The bottleneck reads text, audio and vision at once (the official Multi_CA), post-LN."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.ModuleDict({m: nn.Linear(dim, dim, bias=False) for m in ("text", *FRAME_MODALITIES)})
        self.to_v = nn.ModuleDict({m: nn.Linear(dim, dim, bias=False) for m in ("text", *FRAME_MODALITIES)})
        self.norm1 = nn.LayerNorm(dim)
        self.ff = feed_forward(dim, ffn, dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(
        self, bottleneck: torch.Tensor, sources: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        q = self.to_q(bottleneck)
        read = sum(
            multi_head_attention(q, self.to_k[m](x), self.to_v[m](x), self.heads, mask)
            for m, (x, mask) in sources.items()
        )
        x = self.norm1(bottleneck + read)
        return self.norm2(x + self.ff(x))


class FusionLevel(nn.Module):
    def __init__(self, config: DashFusionConfig) -> None:
        super().__init__()
        args = (config.hidden, config.heads, config.fusion_ffn, config.fusion_dropout)
        self.select = NormedResidualBlock(*args)
        self.gather = Gather(*args)
        self.update = nn.ModuleDict({m: NormedResidualBlock(*args) for m in ("text", *FRAME_MODALITIES)})


class HierarchicalBottleneckFusion(nn.Module):
    """Bottleneck tokens (8, 4, 2, ...) that gather from every modality, which then read them back."""

    def __init__(self, config: DashFusionConfig) -> None:
        super().__init__()
        self.levels = nn.ModuleList(FusionLevel(config) for _ in range(config.fusion_depth))
        self.sizes = [max(1, config.bottleneck_tokens // 2**i) for i in range(config.fusion_depth)]

    def forward(
        self,
        seed: torch.Tensor,
        seed_mask: torch.Tensor,
        states: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """`seed` (B, L >= bottleneck_tokens, d): the aligned text; `states`: modality -> (X_m, mask).

        Returns the last bottleneck (B, n_last, d) and the updated modality states. The head reads
        only the first token of each, so the last level updates only that token (the update is
        position-wise once the attention is done: the result is the same, at a fraction of the cost).
        """
        bottleneck, key_mask = seed, seed_mask
        for i, (level, size) in enumerate(zip(self.levels, self.sizes, strict=True)):
            bottleneck = level.select(bottleneck, key_mask=key_mask, keep=size)
            key_mask = None
            bottleneck = level.gather(bottleneck, states)
            keep = 1 if i == len(self.levels) - 1 else None
            states = {
                m: (level.update[m](x, source=bottleneck, keep=keep), mask[:, :keep])
                for m, (x, mask) in states.items()
            }
        return bottleneck, states


def neighbour_contrastive_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    positive_mask: torch.Tensor,
    negative_mask: torch.Tensor,
    temperature: float,
    count: float | None = None,
) -> torch.Tensor:
    """NT-Xent over explicit pairs: the mean, over valid positive pairs (a, p), of
    -log(e^{s(a,p)/t} / (e^{s(a,p)/t} + sum_n e^{s(a,n)/t})) with s the cosine similarity and n
    running over a's valid negatives; with `count`, their sum divided by `count` instead.

    anchors (A, D); positives (A, P, D) with positive_mask (A, P); negatives (A, N, D) with
    negative_mask (A, N). A pair whose anchor has no valid negative costs exactly 0 (so does a
    batch with no valid pair, which still returns a tensor connected to the inputs).
    """
    a = F.normalize(anchors, dim=-1).unsqueeze(1)
    pos = (a * F.normalize(positives, dim=-1)).sum(-1) / temperature  # (A, P)
    neg = (a * F.normalize(negatives, dim=-1)).sum(-1) / temperature  # (A, N)
    neg = neg.masked_fill(~negative_mask, float("-inf"))
    logits = torch.cat([pos.unsqueeze(-1), neg.unsqueeze(1).expand(-1, pos.shape[1], -1)], dim=-1)
    # the positive's own logit is always finite, so the log-sum-exp is too
    losses = torch.logsumexp(logits, dim=-1) - pos
    weights = positive_mask.to(losses.dtype)
    return (losses * weights).sum() / (weights.sum().clamp(min=1.0) if count is None else count)


def rank_position_neighbours(
    features: torch.Tensor, buckets: torch.Tensor, k: int, block_size: int
) -> LabelNeighbours:
    """The official `__pre_sample`, bug included: for sample i it walks the ranking of all samples
    by similarity to i and keeps the rank POSITIONS j (not the samples at them), which are then
    used as sample ids. Positives: the first k positions j whose sample shares i's bucket, hard
    negatives the first k whose sample does not (both skipping the position j = i, not the sample
    i); easy negatives: the last k positions from the bottom (n - 1 down to 1) whose sample does
    not. Returns the positions as `LabelNeighbours` (-1 = fewer than k)."""
    n = features.shape[0]
    positions = torch.arange(n, device=features.device)
    buckets = buckets.to(features.device)
    lists: dict[str, list[torch.Tensor]] = {"positives": [], "hard": [], "easy": []}
    for rows, scores in similarity_blocks(features, features, block_size):
        ranked = scores.argsort(dim=1, descending=True, stable=True)
        same = buckets[ranked] == buckets[rows].unsqueeze(1)  # (R, n) by rank position
        not_i = positions.unsqueeze(0) != torch.arange(rows.start, rows.stop, device=features.device)[:, None]
        earliest = -positions.float().expand(len(same), -1)
        lists["positives"].append(masked_topk(earliest, same & not_i, k)[0])
        lists["hard"].append(masked_topk(earliest, ~same & not_i, k)[0])
        lists["easy"].append(masked_topk(-earliest, ~same & (positions > 0), k)[0])
    return LabelNeighbours(positives=torch.cat(lists["positives"]),
                           hard_negatives=torch.cat(lists["hard"]), easy_negatives=torch.cat(lists["easy"]))


def stack_batches(batches: list[Batch]) -> Batch:
    """One CPU batch holding `batches` in order (a split's batches share their padded lengths)."""
    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(b, name) for b in batches]
        return None if values[0] is None else torch.cat([v.cpu() for v in values])

    tensors = ("labels", "index", "presence", "text", "text_ids", "text_mask", "audio", "audio_mask",
               "vision", "vision_mask")
    return Batch(ids=[i for b in batches for i in b.ids], **{name: cat(name) for name in tensors})


def select_rows(batch: Batch, rows: torch.Tensor) -> Batch:
    """The samples of `batch` at `rows` (positions in it)."""
    changes: dict[str, Any] = {name: value[rows] for name, value in vars(batch).items()
                               if isinstance(value, torch.Tensor)}
    return batch.with_updates(ids=[batch.ids[i] for i in rows.tolist()], unimodal_labels={},
                              dropped={}, clean=None, **changes)


def draw(pool: torch.Tensor, count: int) -> torch.Tensor:
    """`count` entries drawn at random, without repeats, from each row of `pool` (B, K) of sample
    positions (-1 = empty slot); -1 where a row has fewer than `count` entries."""
    scores = torch.rand(pool.shape, device=pool.device).masked_fill(pool < 0, -1.0)
    top, where = scores.topk(min(count, pool.shape[1]), dim=1)
    return pool.gather(1, where).masked_fill(top < 0, -1)


@register_model("dashfusion")
class DashFusion(MSAModel):
    """Dual-stream (temporal + semantic) alignment, then hierarchical bottleneck fusion."""

    config_class = DashFusionConfig

    def __init__(self, config: DashFusionConfig, dims: FeatureDims) -> None:
        super().__init__(config, dims)
        d = config.hidden
        self.text_encoder = TextEncoder(config, dims)
        self.text_project = nn.Sequential(
            nn.Linear(self.text_encoder.out_dim, d, bias=False), nn.GELU(),
            nn.Linear(d, d, bias=False), nn.GELU(), nn.LayerNorm(d),
        )
        self.frames = nn.ModuleDict({
            "audio": FrameEncoder(dims.audio, dims.audio_len, config),
            "vision": FrameEncoder(dims.vision, dims.vision_len, config),
        })
        self.align = TemporalAlignment(config)
        self.fusion = HierarchicalBottleneckFusion(config)
        self.head = nn.Sequential(
            nn.Linear(4 * d, 2 * d), nn.GELU(), nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 1)
        )
        # memory bank of training-set views and its neighbour index (`on_train_epoch_start`);
        # rebuilt from the model itself, so deliberately not part of the state dict
        self.bank: torch.Tensor | None = None  # (N, 4, d) views in VIEWS order
        self.bank_ids: np.ndarray | None = None  # (N,) sample ids, to check batches against
        self.neighbours: LabelNeighbours | None = None
        self.store: Batch | None = None  # the training split's inputs (CPU), for live neighbour views

    def encode(self, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """modality -> (states, mask): X_t (B, L_t, d), X_a and X_v with their CLS steps."""
        text, text_mask = self.text_encoder(batch)
        text = self.text_project(text).masked_fill(~text_mask.unsqueeze(-1), 0.0)
        shortfall = self.config.bottleneck_tokens - text.shape[1]
        if shortfall > 0:  # the bottleneck starts from the first tokens: make sure they exist
            text, text_mask = F.pad(text, (0, 0, 0, shortfall)), F.pad(text_mask, (0, shortfall))
        # a text with no valid token (not a protocol's doing: they keep masks) reads its zeros
        text_mask = text_mask | ~text_mask.any(dim=1, keepdim=True)
        out = {"text": (text, text_mask)}
        for m, column in (("audio", 1), ("vision", 2)):
            mask = getattr(batch, f"{m}_mask") & batch.presence[:, column].unsqueeze(1)
            out[m] = self.frames[m](getattr(batch, m), mask)
        return out

    def views(
        self, states: dict[str, tuple[torch.Tensor, torch.Tensor]], aligned: torch.Tensor
    ) -> torch.Tensor:
        """(B, 4, d): z_t, z_a, z_v (masked means) and z_f = H[:, 0], in VIEWS order."""
        pooled = [masked_mean(*states[m]) for m in ("text", *FRAME_MODALITIES)]
        return torch.stack([*pooled, aligned[:, 0]], dim=1)

    def attention_masks(
        self, states: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The states with the masks the alignment and the fusion attend under: their own, or every
        step (padding and an absent stream's zeroed frames included) with `attend_padding`."""
        if not self.config.attend_padding:
            return states
        return {m: (x, torch.ones_like(mask)) for m, (x, mask) in states.items()}

    def batch_views(self, batch: Batch) -> torch.Tensor:
        """(B, 4, d) contrastive views of a batch, without the fusion (what the memory bank holds)."""
        states = self.encode(batch)
        seen = self.attention_masks(states)
        return self.views(states, self.align(seen["text"][0], {m: seen[m] for m in FRAME_MODALITIES}))

    def forward(self, batch: Batch) -> Output:
        states = self.encode(batch)
        seen = self.attention_masks(states)
        text, text_mask = seen["text"]
        aligned = self.align(text, {m: seen[m] for m in FRAME_MODALITIES})
        bottleneck, fused = self.fusion(aligned, text_mask, seen)
        head_in = torch.cat([bottleneck[:, 0], *(fused[m][0][:, 0] for m in ("text", *FRAME_MODALITIES))], -1)
        pred = self.head(head_in).squeeze(-1)
        features = {"fused": head_in}
        bank, neighbours = self.bank, self.neighbours  # None until the trainer's first epoch hook
        if not self.training or bank is None or neighbours is None:
            return Output(pred=pred, features=features)
        loss = self.contrastive_loss(batch, self.views(states, aligned), bank, neighbours)
        return Output(pred=pred, losses={"contrastive": self.config.contrastive_weight * loss},
                      features=features)

    def contrastive_loss(
        self, batch: Batch, views: torch.Tensor, bank: torch.Tensor, neighbours: LabelNeighbours
    ) -> torch.Tensor:
        """The semantic-alignment loss of a training batch with views (B, 4, d), against `bank`."""
        cfg = self.config
        positions = batch.index.cpu().numpy()
        known = np.asarray([]) if self.bank_ids is None else self.bank_ids
        if positions.max(initial=-1) >= len(known) or list(known[positions]) != list(batch.ids):
            raise MsakitError(
                "dashfusion: a training batch is not from the split the neighbour index was built "
                "on (on_train_epoch_start)"
            )
        index = batch.index.to(bank.device)
        pos = draw(neighbours.positives[index], cfg.num_positives)  # (B, P)
        neg = torch.cat([draw(neighbours.hard_negatives[index], cfg.num_negatives),
                         draw(neighbours.easy_negatives[index], cfg.num_negatives)], dim=1)
        present = torch.cat([batch.presence, batch.presence.new_ones(len(batch), 1)], dim=1)  # (B, 4)
        # the neighbours' views, view-major: (4, B, K, d)
        positives, negatives = self.neighbour_views(torch.cat([pos, neg], dim=1), bank).split(
            [pos.shape[1], neg.shape[1]], dim=2)
        positive_ok = (pos >= 0).unsqueeze(0) & present.T.unsqueeze(-1)
        negative_ok = (neg >= 0).unsqueeze(0).expand(len(VIEWS), -1, -1)
        # cross-modal pairs of the same sample: the text view with this sample's audio and vision
        cross = views.new_zeros(len(VIEWS), len(batch), 2, views.shape[-1])
        cross[0] = views[:, 1:3]
        cross_ok = torch.zeros(len(VIEWS), len(batch), 2, dtype=torch.bool, device=views.device)
        cross_ok[0] = present[:, 1:3] & present[:, :1]
        positives = torch.cat([positives, cross], dim=2)
        positive_ok = torch.cat([positive_ok, cross_ok], dim=2)
        # the official pair list also holds every neighbour's own text-audio and text-vision pairs,
        # which have no negatives and cost 0, but count in its mean
        neighbour_pairs = 2 * (cfg.num_positives + 2 * cfg.num_negatives)
        per_anchor = len(VIEWS) * cfg.num_positives + 2 + neighbour_pairs
        count = len(batch) * per_anchor if cfg.contrastive_mean == "all_pairs" else None
        return neighbour_contrastive_loss(
            views.transpose(0, 1).flatten(0, 1), positives.flatten(0, 1), negatives.flatten(0, 1),
            positive_ok.flatten(0, 1), negative_ok.flatten(0, 1), cfg.temperature, count,
        )

    def neighbour_views(self, rows: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """(B, K) sample positions (-1 = none: any row, masked later) -> their views (4, B, K, d):
        read from the bank, or (`neighbour_views: live`) computed by the model as it is now, in its
        current mode and with gradient, from the stored inputs."""
        rows = rows.clamp(min=0)
        if self.config.neighbour_views == "bank":
            return bank[rows].permute(2, 0, 1, 3)
        if self.store is None:
            raise MsakitError("dashfusion: live neighbour views need the training split "
                              "(on_train_epoch_start)")
        inputs = select_rows(self.store, rows.flatten().cpu()).to(bank.device)
        return self.batch_views(inputs).view(*rows.shape, len(VIEWS), -1).permute(2, 0, 1, 3)

    @torch.no_grad()
    def build_index(self, batches: Iterator[Batch]) -> None:
        """Memory bank and neighbour index over a whole split (eval mode, no gradient)."""
        cfg = self.config
        was_training = self.training
        self.eval()
        views, labels, ids, kept = [], [], [], []
        for batch in batches:
            views.append(self.batch_views(batch))
            labels.append(batch.labels.to(views[-1].device))
            ids.extend(batch.ids)
            if cfg.neighbour_views == "live":
                kept.append(batch.to("cpu"))
        self.train(was_training)
        bank = torch.cat(views)
        # as in the official code, neighbours are judged on the concatenated pooled t, a, v views
        search = rank_position_neighbours if cfg.neighbour_index == "official" else label_neighbours
        self.neighbours = search(
            bank[:, :3].flatten(1), label_buckets(torch.cat(labels), cfg.label_bucket),
            cfg.neighbour_pool, cfg.index_block,
        )
        self.bank, self.bank_ids = bank, np.asarray(ids)
        self.store = stack_batches(kept) if kept else None

    def on_train_epoch_start(self, epoch: int, train_batches: Callable[[], Iterator[Batch]]) -> None:
        """Rebuild the bank and the index before epochs 1, 1 + K, 1 + 2K, ... (K = refresh_every)."""
        cfg = self.config
        if cfg.contrastive_weight > 0 and (epoch - 1) % cfg.refresh_every == 0:
            self.build_index(train_batches())
        elif cfg.contrastive_weight > 0 and cfg.neighbour_views == "live" and self.store is None:
            # resumed between refreshes: the index came back with the training state, the inputs not
            self.store = stack_batches([batch.to("cpu") for batch in train_batches()])

    def training_state(self) -> dict[str, Any]:
        """The bank and its index: between refreshes a resumed training needs the ones it had."""
        if self.bank is None or self.neighbours is None or self.bank_ids is None:
            return {}
        return {"bank": self.bank, "bank_ids": self.bank_ids.tolist(),
                "neighbours": dict(vars(self.neighbours))}

    def load_training_state(self, state: dict[str, Any]) -> None:
        if state:
            device = self.head[0].weight.device
            self.bank, self.bank_ids = state["bank"].to(device), np.asarray(state["bank_ids"])
            self.neighbours = LabelNeighbours(**{k: v.to(device) for k, v in state["neighbours"].items()})
