"""Block attention (msakit.models.layers.block_attention) against plain softmax attention written
out here: the same outputs and gradients, without and with dropout (the same masks given to both),
the keys each block computes, the dropout rate, and that a training pass keeps no tensor as large
as the attention weights."""

from __future__ import annotations

import math

import pytest
import torch

from msakit.models.layers import block_attention
from msakit.models.layers.block_attention import BlockAttention, KeyMask, attention, keep_mask
from msakit.models.layers.transformer import CrossModalEncoder, attention_masks

B, HEADS, LQ, LK, DH = 3, 2, 7, 9, 4


@pytest.fixture
def small_blocks(monkeypatch):
    """Two queries per block at these sizes, so that several blocks run."""
    monkeypatch.setattr(block_attention, "BLOCK_ELEMENTS", 2 * B * HEADS * LK)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, HEADS, n, DH, generator=generator, dtype=torch.float64, requires_grad=True)
                 for n in (LQ, LK, LK))


def _allowed() -> torch.Tensor:
    """A causal-like band with holes, the last keys seen by no query, every row with a key."""
    generator = torch.Generator().manual_seed(1)
    allowed = torch.rand(B, 1, LQ, LK, generator=generator) > 0.4
    allowed &= torch.arange(LK) <= torch.arange(LQ).view(-1, 1) + 1
    allowed[..., 0] = True
    return allowed


def _reference(q, k, v, allowed, keep=None):
    """Softmax attention; `keep` multiplies the weights (dropout: 0 or 1 / (1 - p))."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    if keep is not None:
        weights = weights * keep
    return weights @ v


def _masks_of(mask: KeyMask, keep_prob: float, seed: int) -> torch.Tensor:
    """The full (B, heads, Lq, Lk) dropout multiplier the blocks draw (0 beyond a block's keys)."""
    full = torch.zeros(B, HEADS, LQ, LK, dtype=torch.float64)
    for index, (first, stop, keys, _) in enumerate(mask.blocks):
        shape = torch.Size((B * HEADS, stop - first, keys))
        full[:, :, first:stop, :keys] = keep_mask(shape, keep_prob, seed + index).view(B, HEADS, -1, keys)
    return full


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_block_attention_equals_plain_softmax_attention(small_blocks, dropout):
    q, k, v = _inputs()
    allowed = _allowed()
    mask = KeyMask(allowed, LQ, LK, HEADS)
    assert len(mask.blocks) == 4
    out = BlockAttention.apply(q, k, v, mask, dropout, 7)
    keep = _masks_of(mask, 1 - dropout, 7) if dropout else None
    expected = _reference(q, k, v, allowed, keep)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    for mine, theirs in zip(torch.autograd.grad(out, (q, k, v), grad),
                            torch.autograd.grad(expected, (q, k, v), grad), strict=True):
        torch.testing.assert_close(mine, theirs)


def test_blocks_compute_only_the_keys_a_query_may_see(small_blocks):
    mask = KeyMask(_allowed(), LQ, LK, HEADS)
    # block (first, stop): its last query t sees keys up to t + 1; every row sees key 0
    assert [(first, stop, keys) for first, stop, keys, _ in mask.blocks] == [
        (0, 2, 3), (2, 4, 5), (4, 6, 7), (6, 7, 8)]
    for first, stop, _, hidden in mask.blocks:
        assert mask.allowed[:, :, first:stop, :hidden].all()  # nothing to mask before `hidden`
    unmasked = KeyMask(None, LQ, LK, HEADS)
    assert all(keys == LK and hidden == LK for _, _, keys, hidden in unmasked.blocks)


def test_the_dispatcher_drops_weights_only_in_a_training_pass():
    q, k, v = _inputs()
    mask = KeyMask(_allowed(), LQ, LK, HEADS)
    expected = _reference(q, k, v, mask.allowed)
    torch.testing.assert_close(attention(q, k, v, mask, 0.0), expected)  # block path: needs grad
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k, v, mask, 0.0), expected)  # fused kernel
    torch.manual_seed(0)
    first = attention(q, k, v, mask, 0.5)
    torch.manual_seed(0)
    torch.testing.assert_close(attention(q, k, v, mask, 0.5), first)  # repeatable under a seed
    assert not torch.allclose(first, expected)


def test_dropout_keeps_each_weight_with_probability_one_minus_p():
    keep = keep_mask(torch.Size((400, 1000)), 0.7, 3) * 0.7
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    sigma = math.sqrt(0.7 * 0.3 / keep.numel())
    assert abs(keep.mean().item() - 0.7) < 5 * sigma
    torch.testing.assert_close(keep_mask(torch.Size((400, 1000)), 0.7, 3) * 0.7, keep)
    assert not torch.equal(keep_mask(torch.Size((400, 1000)), 0.7, 4) * 0.7, keep)
    # odd sizes: the draws are split in halves, one of them unused
    assert keep_mask(torch.Size((3, 5)), 0.5, 0).shape == (3, 5)


def test_a_training_pass_keeps_nothing_as_large_as_the_attention_weights():
    torch.manual_seed(0)
    batch, heads, length = 2, 2, 128
    encoder = CrossModalEncoder(8, heads, layers=2, attn_dropout=0.3, causal=True).train()
    x = torch.randn(batch, length, 8)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, 100:] = False
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = encoder(x, mask)
    out.sum().backward()
    assert saved and max(saved) < batch * heads * length * length / 4
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters() if p.grad is not None)


def test_key_mask_of_an_unpadded_non_causal_stack_is_no_mask():
    full = torch.ones(2, 5, dtype=torch.bool)
    allowed, empty = attention_masks(full, full, causal=False)
    assert allowed is None and not empty.any()
