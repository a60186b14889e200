"""Masked multi-head attention with dropout on the attention weights, without keeping the
(B, heads, Lq, Lk) weights.

`F.scaled_dot_product_attention` reaches a fused kernel that never stores the weights, except on a
CPU with dropout: PyTorch's CPU kernel takes no dropout, so there it falls back to its math path,
which keeps the weights, their dropout mask and the dropped weights for the backward pass (about 9
bytes per weight: 4 GB for MulT's train step at MOSI's lengths). `attention` calls SDPA wherever a
fused kernel serves, and otherwise `BlockAttention`: the queries in blocks, each block's weights
formed, dropped and applied at once, then formed again in the backward pass from the saved
log-sum-exp of each row and the block's seed, so the memory kept grows with Lq + Lk, not Lq x Lk.
A block computes only the keys that one of its queries may see (`KeyMask.blocks`), so MulT's
causal horizon and padding at the end of a batch also save time.

Dropout: each weight is kept with probability 1 - p (p rounded to a multiple of 2^-15) and the
kept ones are scaled by 1 / (1 - p), as `F.dropout` does; the masks come from the CPU generator
seeded per block from one draw of the global generator, so a run is repeatable under
`torch.manual_seed`, but the masks differ from those `F.dropout` or SDPA would draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

# weights formed at once per block (B x heads x block queries x keys): 16 MB, so a block stays in
# a server's last-level cache between its passes while the loop over blocks stays short (with
# several threads on a busy machine, every extra small operation waits on the slowest thread)
BLOCK_ELEMENTS = 1 << 22
RANDOM_BITS = 15  # per dropout decision: p is rounded to a multiple of 2^-15


@dataclass(frozen=True)
class KeyMask:
    """The keys each query may attend to, for a stack of attention layers over the same sequences.

    `allowed` is (B, 1, Lq, Lk) or (B, 1, 1, Lk), True where the query may attend to the key, or
    None when every query may attend to every key; every query must be allowed at least one key.
    What the block path needs is derived from it once, when first asked for, and then shared by
    every layer of the stack.
    """

    allowed: torch.Tensor | None
    query_len: int
    key_len: int
    heads: int

    @cached_property
    def blocks(self) -> tuple[tuple[int, int, int, int], ...]:
        """Query blocks of about BLOCK_ELEMENTS weights each: (first query, query after the last,
        keys needed: 1 + the last key any of them may see in any sample, first key one of them may
        not see in some sample, or the keys needed when there is none)."""
        batch = 1 if self.allowed is None else self.allowed.shape[0]
        size = max(1, BLOCK_ELEMENTS // (batch * self.heads * self.key_len))
        spans = [(q, min(q + size, self.query_len)) for q in range(0, self.query_len, size)]
        if self.allowed is None:
            return tuple((first, stop, self.key_len, self.key_len) for first, stop in spans)
        keys = torch.arange(self.key_len, device=self.allowed.device)
        seen = self.allowed.any(dim=0).any(dim=0).expand(self.query_len, -1)
        unseen = (~self.allowed).any(dim=0).any(dim=0).expand(self.query_len, -1)
        needed = torch.where(seen, keys + 1, 0).amax(dim=-1).tolist()
        first_unseen = torch.where(unseen, keys, self.key_len).amin(dim=-1).tolist()
        blocks = []
        for first, stop in spans:
            end = max(needed[first:stop])
            blocks.append((first, stop, end, min(min(first_unseen[first:stop]), end)))
        return tuple(blocks)

    @cached_property
    def bias(self) -> torch.Tensor:
        """(B, 1, Lq, Lk) float: 0 where allowed, -inf where not (adding it is far faster on a CPU
        than `masked_fill_`). Only for a mask with `allowed`."""
        assert self.allowed is not None
        bias = torch.zeros(self.allowed.shape, device=self.allowed.device)
        return bias.masked_fill_(~self.allowed, float("-inf")).expand(-1, -1, self.query_len, -1)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: KeyMask, dropout: float = 0.0
) -> torch.Tensor:
    """Softmax attention of (B, heads, L, dh) tensors -> (B, heads, Lq, dh), scaled by 1 / sqrt(dh),
    with `dropout` on the weights (pass 0 outside training).

    On a CPU, a pass that needs gradients or dropout runs block by block: faster than the fused
    kernel at MulT's head widths, and the only way there to drop weights without keeping them.
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.device.type != "cpu" or not (dropout or needs_grad) or dropout >= 1.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.allowed, dropout_p=dropout)
    return _in_blocks(q, k, v, mask, dropout)


# torch.compile leaves it eager: its block plan and seeded generators are host-side Python
@torch.compiler.disable
def _in_blocks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: KeyMask, dropout: float
) -> torch.Tensor:
    seed = int(torch.randint(2**62, (1,))) if dropout else 0
    return BlockAttention.apply(q, k, v, mask, dropout, seed)


def keep_mask(shape: torch.Size, keep_prob: float, seed: int) -> torch.Tensor:
    """A block's dropout multiplier: 1 / keep_prob where a weight is kept, else 0; the same for the
    same seed (multiplying is far faster on a CPU than `masked_fill_` with a boolean mask)."""
    count = shape.numel()
    draws = torch.empty((count + 1) // 2, dtype=torch.int32)
    draws.random_(generator=torch.Generator().manual_seed(seed))  # uniform on [0, 2^31)
    # each draw gives two 15-bit numbers: its low and high halves, without their top bits
    bits = draws.view(torch.int16)[:count].bitwise_and_(2**RANDOM_BITS - 1)
    return (bits < round(keep_prob * 2**RANDOM_BITS)).float().mul_(1 / keep_prob).view(shape)


def _scores(q: torch.Tensor, k_t: torch.Tensor, mask: KeyMask, block: tuple[int, int, int, int],
            heads: int) -> torch.Tensor:
    """(B * heads, block queries, keys needed) scores of pre-scaled q, -inf where not allowed."""
    first, stop, keys, hidden = block
    scores = torch.bmm(q[:, first:stop], k_t[:, :, :keys])
    if hidden < keys:
        scores.view(-1, heads, stop - first, keys)[..., hidden:].add_(
            mask.bias[:, :, first:stop, hidden:keys])
    return scores


class BlockAttention(torch.autograd.Function):
    """Attention with dropout, block by block; saves q, k, v, the output and each row's
    log-sum-exp, and recomputes each block's weights and dropout mask in the backward pass.

    Inside, keys and values are held transposed, (B * heads, dh, L): with heads as narrow as
    MulT's (5 channels), the matrix products run several times faster in that layout.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: KeyMask,
                dropout: float, seed: int) -> torch.Tensor:
        batch, heads, query_len, dim = q.shape
        q = (q * dim**-0.5).flatten(0, 1).contiguous()
        k_t = k.flatten(0, 1).transpose(1, 2).contiguous()
        v_t = v.flatten(0, 1).transpose(1, 2).contiguous()
        keep_prob = 1.0 - dropout
        out = q.new_empty(q.shape[0], query_len, v_t.shape[1])
        log_sum = q.new_empty(q.shape[0], query_len, 1)
        for index, block in enumerate(mask.blocks):
            first, stop, keys, _ = block
            weights = _scores(q, k_t, mask, block, heads)
            top = weights.amax(dim=-1, keepdim=True)
            weights.sub_(top).exp_()
            total = weights.sum(dim=-1, keepdim=True)
            if dropout:
                weights.mul_(keep_mask(weights.shape, keep_prob, seed + index))
            out[:, first:stop] = torch.bmm(weights, v_t[:, :, :keys].transpose(1, 2)).div_(total)
            log_sum[:, first:stop] = top + total.log()
        ctx.save_for_backward(q, k_t, v_t, out, log_sum)
        ctx.mask, ctx.dropout, ctx.seed, ctx.heads = mask, dropout, seed, heads
        return out.view(batch, heads, query_len, -1)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k_t, v_t, out, log_sum = ctx.saved_tensors
        shape = grad_out.shape
        grad_out = grad_out.flatten(0, 1).contiguous()
        grad_out_t = grad_out.transpose(1, 2).contiguous()
        q_t = q.transpose(1, 2).contiguous()
        keep_prob = 1.0 - ctx.dropout
        # d softmax: rowsum(dP * P) equals rowsum(dO * O), O the dropped weights applied to V
        delta = (grad_out * out).sum(dim=-1, keepdim=True)
        grad_q = torch.empty_like(q)
        grad_k_t, grad_v_t = torch.zeros_like(k_t), torch.zeros_like(v_t)
        for index, block in enumerate(ctx.mask.blocks):
            first, stop, keys, _ = block
            probs = _scores(q, k_t, ctx.mask, block, ctx.heads).sub_(log_sum[:, first:stop]).exp_()
            grad_scores = torch.bmm(grad_out[:, first:stop], v_t[:, :, :keys])
            dropped = probs
            if ctx.dropout:
                keep = keep_mask(probs.shape, keep_prob, ctx.seed + index)
                dropped = probs * keep
                grad_scores.mul_(keep)
            grad_v_t[:, :, :keys] += torch.bmm(grad_out_t[:, :, first:stop], dropped)
            grad_scores.sub_(delta[:, first:stop]).mul_(probs)
            grad_q[:, first:stop] = torch.bmm(grad_scores, k_t[:, :, :keys].transpose(1, 2))
            grad_k_t[:, :, :keys] += torch.bmm(q_t[:, :, first:stop], grad_scores)
        grad_q.mul_(q.shape[-1] ** -0.5)
        grad_k, grad_v = (g.transpose(1, 2).unflatten(0, shape[:2]) for g in (grad_k_t, grad_v_t))
        return grad_q.unflatten(0, shape[:2]), grad_k, grad_v, None, None, None
