"""MulT's crossmodal transformer (Tsai et al., ACL 2019), batch-first and aware of padding.

One block lets a target sequence X_b read a source sequence X_a (pre-LayerNorm, as in MulT):

    Z = X_b + Dropout(MHA(Q = LN(X_b), K = V = LN(X_a)))
    Y = Z + Dropout(W_2 Dropout(ReLU(W_1 LN(Z))))            (W_1: d -> 4d, W_2: 4d -> d)

Without a source the block is ordinary self-attention. Before the first block both sequences are
scaled by sqrt(d), given sinusoidal positions and embedding dropout; a LayerNorm ends the stack.
As in MulT, every block reads the same (embedded) source: only the target is updated.

Positions: step t gets position t + `first_position`. MulT's own (fairseq) code numbers steps from 1
and gives no position to a step whose input's first channel is exactly 0 (its test for padding,
which also catches a zeroed missing modality); `first_position=1, position_zero_steps=False`
reproduces that rule.

Padding: padded keys are masked out of every attention, padded inputs are zeroed before use and
padded target positions come out as zeros, so nothing a padded step holds reaches a valid one. A
query with no key it may attend to (a sample whose source is entirely missing) gets a zero
attention output instead of the NaN a softmax over nothing would give.

A stack builds its masks once per forward pass and every layer reuses them; attention runs through
`block_attention.attention` (PyTorch's fused kernels, or, for a CPU training pass, block attention
that never holds the attention weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from msakit.models.layers.block_attention import KeyMask, attention
from msakit.models.layers.pooling import valid_lengths


def sinusoidal_positions(
    length: int, dim: int, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(length, dim) table: sines in the first half of the channels, cosines in the second.

    Frequencies fall geometrically from 1 to 1/10000 across each half; an odd `dim` gets one
    zero channel at the end.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=device) / max(half - 1, 1))
    angles = torch.arange(length, device=device).unsqueeze(1) * freqs.unsqueeze(0)
    table = torch.cat([angles.sin(), angles.cos()], dim=1)
    if dim % 2:
        table = F.pad(table, (0, 1))
    return table.to(dtype=dtype)


def attention_masks(
    query_mask: torch.Tensor, key_mask: torch.Tensor, causal: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The keys each query may attend to, from (B, Lq) and (B, Lk) masks (True = valid step).

    Returns (allowed, empty). `allowed` is True where a query may attend to a key: (B, 1, Lq, Lk)
    when `causal`, else (B, 1, 1, Lk), or None when every key of every sample is valid. `empty`
    marks queries that may attend to no key, shaped to broadcast over the (B, Lq, D) attention
    output: every key is allowed to them (so the softmax stays finite) and their outputs must be
    zeroed.

    `causal` is MulT's "future" mask: query t may attend to keys 0 .. t + |n_k - n_q|, where n_q
    and n_k are the sample's valid lengths (the original code uses the padded lengths, which
    would make the output depend on how much padding a batch carries).
    """
    batch = key_mask.shape[0]
    if not causal:
        empty = ~key_mask.any(dim=1)
        allowed = None if bool(key_mask.all()) else (key_mask | empty.unsqueeze(1)).view(batch, 1, 1, -1)
        return allowed, empty.view(batch, 1, 1)
    key_len = key_mask.shape[1]
    offset = (valid_lengths(key_mask) - valid_lengths(query_mask)).abs()
    queries = torch.arange(query_mask.shape[1], device=key_mask.device)
    keys = torch.arange(key_len, device=key_mask.device)
    horizon = queries.view(1, -1) + offset.view(-1, 1)  # (B, Lq): last key each query may see
    # a query sees no key when the sample's first valid key lies beyond its horizon
    first_key = torch.where(key_mask, keys, key_len).amin(dim=1)
    empty = (first_key.view(-1, 1) > horizon) | ~key_mask.any(dim=1, keepdim=True)
    empty = empty.unsqueeze(-1)  # (B, Lq, 1)
    allowed = (keys.view(1, 1, -1) <= horizon.unsqueeze(-1)) & key_mask.unsqueeze(1)
    return (allowed | empty).unsqueeze(1), empty


class CrossModalLayer(nn.Module):
    """One pre-LN block: (cross- or self-) attention, then a position-wise feed-forward network.

    The attention's projections are an `nn.MultiheadAttention`'s parameters (so its initialisation
    and parameter names stay), applied here around `block_attention.attention`, which takes masks
    built once per stack and reaches the fused kernels.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attn_dropout: float = 0.0,
        relu_dropout: float = 0.0,
        res_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        # one LayerNorm for queries and keys alike, as in MulT
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=attn_dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.relu_dropout = relu_dropout
        self.res_dropout = res_dropout
        for linear in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def _attend(self, query: torch.Tensor, source: torch.Tensor | None, mask: KeyMask) -> torch.Tensor:
        """Multi-head attention of normed (B, Lq, D) queries over a normed source, or themselves."""
        weight, bias = self.attn.in_proj_weight, self.attn.in_proj_bias
        if source is None:
            q, k, v = F.linear(query, weight, bias).chunk(3, dim=-1)
        else:
            dim = query.shape[-1]
            q = F.linear(query, weight[:dim], bias[:dim])
            k, v = F.linear(source, weight[dim:], bias[dim:]).chunk(2, dim=-1)

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.attn.num_heads, -1)).transpose(1, 2)

        dropout = self.attn.dropout if self.training else 0.0
        out = attention(split(q), split(k), split(v), mask, dropout)
        return self.attn.out_proj(out.transpose(1, 2).flatten(2))

    def forward(
        self, x: torch.Tensor, source: torch.Tensor | None, mask: KeyMask, empty: torch.Tensor
    ) -> torch.Tensor:
        query = self.attn_norm(x)
        h = self._attend(query, None if source is None else self.attn_norm(source), mask)
        x = x + F.dropout(h.masked_fill(empty, 0.0), self.res_dropout, self.training)
        h = F.dropout(F.relu(self.fc1(self.ffn_norm(x))), self.relu_dropout, self.training)
        return x + F.dropout(self.fc2(h), self.res_dropout, self.training)


class CrossModalEncoder(nn.Module):
    """A stack of `CrossModalLayer`s: target (B, Lt, D) reads source (B, Ls, D), or itself.

    forward(target, target_mask, source=None, source_mask=None) -> (B, Lt, D), zeros at padded
    target positions. Masks are (B, L) bool, True = valid.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        layers: int,
        attn_dropout: float = 0.0,
        relu_dropout: float = 0.0,
        res_dropout: float = 0.0,
        embed_dropout: float = 0.0,
        causal: bool = False,
        first_position: int = 0,
        position_zero_steps: bool = True,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.embed_dropout = embed_dropout
        self.causal = causal
        self.first_position = first_position
        self.position_zero_steps = position_zero_steps
        self.layers = nn.ModuleList(
            CrossModalLayer(dim, num_heads, attn_dropout, relu_dropout, res_dropout)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def _embed(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        start = self.first_position
        positions = sinusoidal_positions(x.shape[1] + start, self.dim, x.device, x.dtype)[start:]
        if not self.position_zero_steps:
            positions = positions * (x[..., :1] != 0)
        return F.dropout(math.sqrt(self.dim) * x + positions, self.embed_dropout, self.training)

    def forward(
        self,
        target: torch.Tensor,
        target_mask: torch.Tensor,
        source: torch.Tensor | None = None,
        source_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self._embed(target, target_mask)
        if source is None:
            kv, key_mask = None, target_mask
        else:
            if source_mask is None:
                raise ValueError("a source sequence needs its source_mask")
            kv, key_mask = self._embed(source, source_mask), source_mask
        allowed, empty = attention_masks(target_mask, key_mask, self.causal)
        mask = KeyMask(allowed, target_mask.shape[1], key_mask.shape[1], self.num_heads)
        for layer in self.layers:
            x = layer(x, kv, mask, empty)
        return self.norm(x).masked_fill(~target_mask.unsqueeze(-1), 0.0)


def crossmodal_stacks(
    modalities: tuple[str, ...], dim: int, num_heads: int, layers: int,
    attn_dropout: dict[str, float], **options: float | bool,
) -> nn.ModuleDict:
    """MulT's crossmodal stacks, one per ordered pair, keyed "<source>_to_<target>"; a stack's
    attention dropout is chosen by its SOURCE modality, as in MulT."""
    return nn.ModuleDict({
        f"{source}_to_{target}": CrossModalEncoder(
            dim, num_heads, layers, attn_dropout=attn_dropout[source], **options
        )
        for target in modalities for source in modalities if source != target
    })


def memory_stacks(
    modalities: tuple[str, ...], dim: int, num_heads: int, layers: int, attn_dropout: float,
    **options: float | bool,
) -> nn.ModuleDict:
    """MulT's self-attention memory stacks, one per target modality, over its two crossmodal
    streams joined (width 2 * dim)."""
    return nn.ModuleDict({
        m: CrossModalEncoder(2 * dim, num_heads, layers, attn_dropout=attn_dropout, **options)
        for m in modalities
    })


def crossmodal_summaries(
    cross: nn.ModuleDict, memory: nn.ModuleDict,
    seqs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    pool: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """MulT's fusion body: each target reads each other modality through its crossmodal stack,
    then its memory stack; `pool` reduces that over the target's valid steps (MulT: the last one,
    CyIN: the mean). seqs = {modality: (x (B, L, d), mask (B, L))} -> {modality: (B, 2d)}."""
    summaries = {}
    for target, (x, mask) in seqs.items():
        crossed = [cross[f"{source}_to_{target}"](x, mask, *seqs[source])
                   for source in seqs if source != target]
        summaries[target] = pool(memory[target](torch.cat(crossed, dim=-1), mask), mask)
    return summaries
