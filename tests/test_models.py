"""The classic baselines (TFN, LMF, MulT) beyond the model contract (tests/contract), plus their
shared layers: LMF's low-rank identity, TFN's bound, MulT's non-causal mask, the published settings.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from model_inputs import N, pad_noise, padded_longer, without
from msakit.data.schema import FeatureDims, MultimodalDataset
from msakit.errors import MsakitError
from msakit.models import create_model, get_model_class, list_models
from msakit.models.layers.pooling import last_valid, masked_mean, valid_lengths
from msakit.models.layers.transformer import (
    CrossModalEncoder,
    attention_masks,
    sinusoidal_positions,
)
from msakit.models.lmf import LMFConfig
from msakit.models.mult import MulTConfig
from msakit.models.registry import build_config
from msakit.models.tfn import TFNConfig
from msakit.training.config import resolve_config

TINY = {
    "tfn": {"text_hidden": 8, "audio_hidden": 4, "vision_hidden": 3, "text_out": 4,
            "post_fusion_dim": 8},
    "lmf": {"text_hidden": 8, "audio_hidden": 4, "vision_hidden": 3, "text_out": 4, "rank": 2},
    "mult": {"embed_dim": 8, "num_heads": 2, "layers": 1, "memory_layers": 1},
}
MODELS = sorted(TINY)
FAMILIES = ["mosi", "mosei", "sims", "simsv2", "synthetic"]


def _model(name: str, dims: FeatureDims, seed: int = 0, **settings):
    torch.manual_seed(seed)
    return create_model(name, {"text_source": "features", **TINY[name], **settings}, dims)


def _assert_grads(model, skip: set[int] = frozenset()) -> None:
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in skip:
            continue
        assert param.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(param.grad).all(), f"non-finite gradient for {name}"


def test_the_three_baselines_are_registered():
    assert {"tfn", "lmf", "mult"} <= set(list_models())
    assert get_model_class("tfn").config_class is TFNConfig
    assert get_model_class("lmf").config_class is LMFConfig
    assert get_model_class("mult").config_class is MulTConfig


@pytest.mark.parametrize("name", MODELS)
def test_the_baselines_add_no_auxiliary_loss_and_expose_their_fusion(name, dims, batch):
    out = _model(name, dims).train()(batch)
    assert out.losses == {}
    assert out.features["fused"].shape[0] == N


def test_padding_changes_nothing_without_mults_causal_mask(dims, batch):
    """The contract test checks MulT's default (causal) attention; this its other mask."""
    model = _model("mult", dims, causal_mask=False).eval()
    missing = without(without(without(batch, "audio", [0, 2]), "vision", [1, 2]), "text", [3])
    with torch.no_grad():
        torch.testing.assert_close(model(pad_noise(batch)).pred, model(batch).pred)
        torch.testing.assert_close(model(padded_longer(batch)).pred, model(batch).pred)
        torch.testing.assert_close(model(pad_noise(missing)).pred, model(missing).pred)
    model.train()
    model(missing).pred.sum().backward()
    _assert_grads(model)


def test_lmf_equals_a_full_rank_r_weight_tensor(dims, batch):
    """LMF's factorised sum is W . ([1;z_t] (x) [1;z_a] (x) [1;z_v]) for the rank-r tensor W."""
    model = _model("lmf", dims).eval()
    with torch.no_grad():
        out = model(batch)
        one = torch.ones(N, 1)
        z = [torch.cat([one, out.features[m]], dim=1) for m in ("text", "audio", "vision")]
        weights = torch.einsum(
            "ir,jr,kr,r->ijk", model.text_factor, model.audio_factor, model.vision_factor,
            model.rank_weights.squeeze(-1),
        )
        expected = torch.einsum("ijk,bi,bj,bk->b", weights, *z) + model.bias
    torch.testing.assert_close(out.pred, expected)


def test_tfn_keeps_predictions_inside_its_bound(dims, batch):
    model = _model("tfn", dims, output_bound=0.5).eval()
    with torch.no_grad():
        model.out.bias.fill_(100.0)  # a huge logit saturates at the bound, never beyond
        pred = model(batch).pred
    assert (pred.abs() <= 0.5).all()
    assert pred.min() > 0.49


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("family", FAMILIES)
def test_yaml_resolves_for_every_family(name, family):
    resolved = resolve_config(name, family)
    config = build_config(name, resolved["model"])
    assert config.text_source == "features"
    assert resolved["training"]["loss"] == "l1"
    assert resolved["training"]["batch_size"] > 0


@pytest.mark.parametrize("name", MODELS)
def test_the_synthetic_settings_build_and_run(name, dims, batch):
    resolved = resolve_config(name, "synthetic")
    model = create_model(name, resolved["model"], dims).eval()
    with torch.no_grad():
        assert torch.isfinite(model(batch).pred).all()


def test_yaml_holds_mmsa_values():
    """Spot checks against MMSA's config_regression.json."""
    tfn = resolve_config("tfn", "mosei")
    assert (tfn["model"]["text_out"], tfn["model"]["post_fusion_dim"]) == (128, 16)
    assert (tfn["training"]["batch_size"], tfn["training"]["lr"]) == (128, 5e-3)
    lmf = resolve_config("lmf", "sims")
    assert [lmf["model"][k] for k in ("rank", "text_hidden", "text_out")] == [4, 64, 32]
    mult = resolve_config("mult", "mosi")
    assert (mult["model"]["embed_dim"], mult["model"]["num_heads"]) == (50, 10)
    # MMSA's MULT trainer: clip_grad_value_(0.6) after every backward, a step every update_epochs = 8
    assert (mult["training"]["grad_clip_value"], mult["training"]["accumulate_steps"]) == (0.6, 8)
    assert "grad_clip" not in mult["training"]
    assert resolve_config("mult", "sims")["model"]["memory_layers"] == 3


@pytest.mark.parametrize(
    ("name", "settings", "key"),
    [
        ("tfn", {"text_hidden": 0}, "text_hidden"),
        ("tfn", {"post_fusion_dropout": 1.5}, "post_fusion_dropout"),
        ("tfn", {"output_bound": -1.0}, "output_bound"),
        ("lmf", {"rank": "3"}, "rank"),
        ("mult", {"embed_dim": 10, "num_heads": 3}, "num_heads"),
        ("mult", {"conv_kernel_audio": 0}, "conv_kernel_audio"),
    ],
)
def test_bad_config_values_are_user_errors(name, settings, key):
    with pytest.raises(MsakitError, match=key):
        build_config(name, settings)


def test_models_need_audio_and_vision(split):
    text_only = dataclasses.replace(split, audio=None, audio_lengths=None)
    dims = MultimodalDataset("t", "synthetic", text_only, text_only, text_only).dims
    for name in MODELS:
        with pytest.raises(MsakitError, match="audio"):
            _model(name, dims)


# --- shared layers ----------------------------------------------------------------------------


def test_masked_pooling_reads_only_valid_steps():
    x = torch.arange(24, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    expected = torch.stack([x[0, :2].mean(0), torch.zeros(3)])
    torch.testing.assert_close(masked_mean(x, mask), expected)
    gap = torch.tensor([[True, False, True, False], [False, False, False, False]])
    assert valid_lengths(gap).tolist() == [3, 0]
    torch.testing.assert_close(last_valid(x, gap), torch.stack([x[0, 2], torch.zeros(3)]))


def test_sinusoidal_positions():
    table = sinusoidal_positions(5, 7)
    assert table.shape == (5, 7)
    torch.testing.assert_close(table[0, :3], torch.zeros(3))  # sin(0)
    torch.testing.assert_close(table[0, 3:6], torch.ones(3))  # cos(0)
    assert (table[:, 6] == 0).all()  # odd width: one zero channel
    torch.testing.assert_close(table[:, 0], torch.sin(torch.arange(5.0)))


def test_causal_mask_offsets_and_empty_rows():
    query_mask = torch.tensor([[True, True, False], [True, True, True]])
    key_mask = torch.tensor([[True, True, True, True], [False, False, False, False]])
    allowed, empty = attention_masks(query_mask, key_mask, causal=True)
    assert allowed.shape == (2, 1, 3, 4)
    # sample 0 has 2 valid queries and 4 valid keys: query t may see keys 0 .. t + 2
    assert allowed[0, 0].tolist() == [
        [True, True, True, False], [True, True, True, True], [True, True, True, True]
    ]
    assert empty[:, :, 0].tolist() == [[False, False, False], [True, True, True]]
    assert allowed.any(-1).all(), "no row may be fully masked (softmax would give NaN)"


def test_causal_encoder_does_not_look_ahead():
    torch.manual_seed(0)
    encoder = CrossModalEncoder(8, 2, layers=2, causal=True).eval()
    x = torch.randn(1, 5, 8)
    mask = torch.ones(1, 5, dtype=torch.bool)
    later = x.clone()
    later[:, 3:] = torch.randn(1, 2, 8)
    with torch.no_grad():
        a, b = encoder(x, mask), encoder(later, mask)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def _plain_stack(encoder, target, target_mask, source=None, source_mask=None):
    """`encoder` (eval mode) written out: a plain softmax over the keys each query may see, the
    keys chosen by looping over every sample's valid lengths (up to its last valid step)."""
    dim, heads = encoder.dim, encoder.num_heads

    def length(mask):
        return int(mask.nonzero().max()) + 1 if mask.any() else 0

    def embed(x, mask):
        return math.sqrt(dim) * x * mask.unsqueeze(-1) + sinusoidal_positions(x.shape[1], dim)

    x = embed(target, target_mask)
    source, key_mask = (None, target_mask) if source is None else (embed(source, source_mask), source_mask)
    batch, query_len, key_len = x.shape[0], x.shape[1], key_mask.shape[1]
    allowed = torch.zeros(batch, query_len, key_len, dtype=torch.bool)
    for b in range(batch):
        offset = abs(length(key_mask[b]) - length(target_mask[b]))
        for t in range(query_len):
            for j in range(key_len):
                allowed[b, t, j] = bool(key_mask[b, j]) and (not encoder.causal or j <= t + offset)
    nothing_to_see = ~allowed.any(dim=-1, keepdim=True)

    def split(h):
        return h.view(batch, h.shape[1], heads, -1).transpose(1, 2)

    for layer in encoder.layers:
        query = layer.attn_norm(x)
        keys = query if source is None else layer.attn_norm(source)
        weight, bias = layer.attn.in_proj_weight, layer.attn.in_proj_bias
        q, k, v = (h @ weight[i * dim:(i + 1) * dim].T + bias[i * dim:(i + 1) * dim]
                   for i, h in enumerate((query, keys, keys)))
        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(dim // heads)
        weights = scores.masked_fill(~allowed.unsqueeze(1), float("-inf")).softmax(dim=-1)
        mixed = torch.nan_to_num(weights) @ split(v)
        attended = layer.attn.out_proj(mixed.transpose(1, 2).reshape(batch, query_len, dim))
        x = x + attended.masked_fill(nothing_to_see, 0.0)
        x = x + layer.fc2(torch.relu(layer.fc1(layer.ffn_norm(x))))
    return encoder.norm(x) * target_mask.unsqueeze(-1)


@pytest.mark.parametrize("causal", [True, False])
def test_crossmodal_stack_equals_plain_softmax_attention(causal):
    torch.manual_seed(0)
    encoder = CrossModalEncoder(8, 2, layers=2, attn_dropout=0.3, causal=causal).eval()
    target, source = torch.randn(3, 5, 8), torch.randn(3, 7, 8)
    target_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] * 4 + [False]])
    # sample 1's source has a hole; sample 2 has no source at all
    source_mask = torch.tensor([[True] * 7, [True, True, False, True, False, False, False], [False] * 7])
    with torch.no_grad():
        torch.testing.assert_close(encoder(target, target_mask, source, source_mask),
                                   _plain_stack(encoder, target, target_mask, source, source_mask))
        torch.testing.assert_close(encoder(target, target_mask), _plain_stack(encoder, target, target_mask))
    # a training pass with its dropout off is the same function
    for layer in encoder.layers:
        layer.attn.dropout = 0.0
    encoder.train()
    torch.testing.assert_close(encoder(target, target_mask, source, source_mask),
                               _plain_stack(encoder, target, target_mask, source, source_mask))


def test_cross_encoder_ignores_padded_source_and_zeroes_padded_target():
    torch.manual_seed(0)
    encoder = CrossModalEncoder(8, 2, layers=1).eval()
    target, source = torch.randn(2, 4, 8), torch.randn(2, 6, 8)
    target_mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    source_mask = torch.tensor([[True, True, False, False, False, False], [False] * 6])
    noisy = source.clone()
    noisy[~source_mask] = 1e4
    with torch.no_grad():
        a = encoder(target, target_mask, source, source_mask)
        b = encoder(target, target_mask, noisy, source_mask)
    torch.testing.assert_close(a, b)
    assert torch.isfinite(a).all()
    assert (a[0, 3] == 0).all()
