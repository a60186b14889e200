"""Multi-head scaled dot-product attention on already-projected tensors, shared by the models that
write their own attention blocks (LNLN, DashFusion, HME) so that every one reaches PyTorch's fused
kernels the same way."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multi_head_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention of projected (B, L, heads * dh) tensors split into `heads` heads -> (B, Lq, heads * dh).

    `key_mask` (B, Lk) is True where a key may be attended to (every row needs one such key); an
    all-True mask is dropped so that the unmasked kernels run. `scale` defaults to 1 / sqrt(dh);
    `dropout` applies to the attention weights.
    """
    batch, length = q.shape[:2]

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, x.shape[1], heads, -1).transpose(1, 2)

    mask = None if key_mask is None or bool(key_mask.all()) else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        split(q), split(k), split(v), attn_mask=mask, dropout_p=dropout, scale=scale
    )
    return out.transpose(1, 2).reshape(batch, length, -1)
