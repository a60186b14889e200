"""The pre-norm transformer of the ALMT / LNLN / MMSLF code family (Haoyu Zhang et al.): separate
LayerNorms on queries, keys and values, heads x dim_head wide inside and `dim` outside, learned
positions, and optional learned extra tokens whose outputs summarise a sequence.

    x <- x + W_o Attn(LN_q(x), LN_k(s), LN_v(s))          (s = x for self-attention)
    x <- x + W_2 GELU(W_1 LN(x))

Also the two fusion pieces ALMT introduced and LNLN reuses: the hyper-modality layer and the
cross transformer with a shared extra token.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from msakit.errors import MsakitError
from msakit.models.layers.attention import multi_head_attention


class Attention(nn.Module):
    """Multi-head attention with separate widths: heads x dim_head inside, `dim` outside."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = multi_head_attention(self.to_q(q), self.to_k(k), self.to_v(v), self.heads, key_mask)
        return self.to_out(out)


class Block(nn.Module):
    """Pre-norm block: x + Attn(LN_q(x), LN_k(s), LN_v(s)), then x + FF(LN(x)); s = x by default."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm_q, self.norm_k, self.norm_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(
        self, x: torch.Tensor, source: torch.Tensor | None = None, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        source = x if source is None else source
        x = x + self.attn(self.norm_q(x), self.norm_k(source), self.norm_v(source), key_mask)
        return x + self.ff(self.norm_ff(x))


class TokenTransformer(nn.Module):
    """`num_tokens` learned extra tokens prepended (zeros at start), learned positions, `depth` blocks.

    Returns the list of hidden states: the input with positions added, then each block's output.
    """

    def __init__(
        self, max_len: int, num_tokens: int, depth: int, *, dim: int, heads: int, dim_head: int,
        mlp_dim: int,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.tokens = nn.Parameter(torch.zeros(1, num_tokens, dim)) if num_tokens else None
        self.positions = nn.Parameter(torch.randn(1, max_len + num_tokens, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, dim_head, mlp_dim) for _ in range(depth))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, keep: int | None = None
    ) -> list[torch.Tensor]:
        """`keep`: only the first `keep` positions of the last block's output are wanted, so only
        they are computed there (the output is the same; most of the last block's cost is saved).
        Padding beyond the length the positions were built for is cut off."""
        batch, length = x.shape[:2]
        if length > self.max_len and mask is not None and not bool(mask[:, self.max_len:].any()):
            x, mask, length = x[:, : self.max_len], mask[:, : self.max_len], self.max_len
        if length > self.max_len:
            raise MsakitError(
                f"a sequence of {length} steps is longer than the {self.max_len} the model was "
                "built for"
            )
        if self.tokens is not None:
            x = torch.cat([self.tokens.expand(batch, -1, -1), x], dim=1)
            if mask is not None:
                mask = F.pad(mask, (self.tokens.shape[1], 0), value=True)
        x = x + self.positions[:, : x.shape[1]]
        states = [x]
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            x = block(x[:, :keep], source=x, key_mask=mask) if last and keep else block(x, key_mask=mask)
            states.append(x)
        return states


def widths_of(config: Any) -> dict[str, int]:
    """The block widths a model's transformers share: its config's hidden_dim, heads, dim_head and
    mlp_dim."""
    return {"dim": config.hidden_dim, "heads": config.heads, "dim_head": config.dim_head,
            "mlp_dim": config.mlp_dim}


class HyperLayer(nn.Module):
    """One step of the hyper-modality learner: the language state queries audio and vision, and the
    two readings, summed, move the (normalised) hyper-modality:

        H_hyper <- LN(H_hyper) + W_o (Attn(q, LN(H_a) W_k^a, LN(H_a) W_v^a)
                                      + Attn(q, LN(H_v) W_k^v, LN(H_v) W_v^v)),   q = LN(H_l) W_q

    heads x dim_head wide inside (dim_head defaults to dim / heads), with separate keys and values
    per modality and one query.
    """

    def __init__(self, dim: int, heads: int, dim_head: int | None = None) -> None:
        super().__init__()
        inner = heads * (dim // heads if dim_head is None else dim_head)
        self.heads = heads
        self.norm_language, self.norm_audio = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.norm_vision, self.norm_hyper = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k_audio, self.to_v_audio = (nn.Linear(dim, inner, bias=False) for _ in range(2))
        self.to_k_vision, self.to_v_vision = (nn.Linear(dim, inner, bias=False) for _ in range(2))
        self.to_out = nn.Linear(inner, dim)

    def forward(
        self, language: torch.Tensor, audio: torch.Tensor, vision: torch.Tensor, hyper: torch.Tensor
    ) -> torch.Tensor:
        q = self.to_q(self.norm_language(language))
        audio, vision = self.norm_audio(audio), self.norm_vision(vision)
        from_audio = multi_head_attention(q, self.to_k_audio(audio), self.to_v_audio(audio), self.heads, None)
        from_vision = multi_head_attention(
            q, self.to_k_vision(vision), self.to_v_vision(vision), self.heads, None
        )
        return self.norm_hyper(hyper) + self.to_out(from_audio + from_vision)


class CrossTransformer(nn.Module):
    """The target reads the source; one shared extra token is prepended to both, positions learned
    (for `num_tokens` + 1 steps on each side). Returns the target's last states, the token first."""

    def __init__(self, num_tokens: int, depth: int, *, dim: int, heads: int, dim_head: int,
                 mlp_dim: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))
        self.source_positions = nn.Parameter(torch.randn(1, num_tokens + 1, dim))
        self.target_positions = nn.Parameter(torch.randn(1, num_tokens + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, dim_head, mlp_dim) for _ in range(depth))

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        token = self.token.expand(source.shape[0], -1, -1)
        source = torch.cat([token, source], dim=1) + self.source_positions
        target = torch.cat([token, target], dim=1) + self.target_positions
        for block in self.blocks:
            target = block(target, source)
        return target
