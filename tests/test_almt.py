"""ALMT (models/almt.py): the hyper-modality learner against an independent computation, audio and
vision reach the prediction only through the attention that language guides, the padding switch
restores the official behaviour, and every parameter trains."""

from __future__ import annotations

import math

import numpy as np
import torch

from model_inputs import N
from msakit.data.schema import Batch
from msakit.models import create_model
from msakit.models.almt import ALMT
from msakit.models.layers.prenorm import HyperLayer

TINY = {"hidden_dim": 8, "num_tokens": 3, "heads": 2, "dim_head": 4, "hyper_dim_head": 3,
        "mlp_dim": 8, "embed_depth": 1, "hyper_depth": 3, "fusion_depth": 1}


def _almt(dims, seed: int = 0, **settings) -> ALMT:
    torch.manual_seed(seed)
    return create_model("almt", {"text_source": "features", **TINY, **settings}, dims)


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    centred = x - x.mean(-1, keepdim=True)
    return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight + norm.bias


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Per head and per sample, softmax(q k^T / sqrt(d_h)) v, written out with loops."""
    batch, length, inner = q.shape
    width = inner // heads
    out = torch.zeros(batch, length, inner, dtype=q.dtype)
    for b in range(batch):
        for h in range(heads):
            cols = slice(h * width, (h + 1) * width)
            scores = q[b, :, cols] @ k[b, :, cols].T / math.sqrt(width)
            out[b, :, cols] = torch.softmax(scores, dim=-1) @ v[b, :, cols]
    return out


def _hyper_step(layer: HyperLayer, language, audio, vision, hyper) -> torch.Tensor:
    """Eq. of Sec. 3.2: LN(H_hyper) + W_o (Attn(q, K_a, V_a) + Attn(q, K_v, V_v)), q from language."""
    q = _layer_norm(language, layer.norm_language) @ layer.to_q.weight.T
    a, v = _layer_norm(audio, layer.norm_audio), _layer_norm(vision, layer.norm_vision)
    read = (_attention(q, a @ layer.to_k_audio.weight.T, a @ layer.to_v_audio.weight.T, layer.heads)
            + _attention(q, v @ layer.to_k_vision.weight.T, v @ layer.to_v_vision.weight.T, layer.heads))
    return _layer_norm(hyper, layer.norm_hyper) + read @ layer.to_out.weight.T + layer.to_out.bias


def test_a_hyper_layer_matches_an_independent_computation():
    torch.manual_seed(0)
    layer = HyperLayer(dim=8, heads=2, dim_head=3)  # 6 wide inside: not dim / heads
    for norm in (layer.norm_language, layer.norm_audio, layer.norm_vision, layer.norm_hyper):
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    language, audio, vision, hyper = (torch.randn(2, 4, 8, dtype=torch.float64) for _ in range(4))
    layer = layer.double()
    assert layer.to_q.weight.shape == (6, 8)
    torch.testing.assert_close(layer(language, audio, vision, hyper),
                               _hyper_step(layer, language, audio, vision, hyper))


def test_the_hyper_modality_is_learned_from_each_language_state_in_turn(dims, batch):
    """The model's H_hyper: K steps from the ones-initialised H0_hyper, step i queried by the i-th
    language state (H1_l first), reading the embedded audio and vision tokens."""
    model = _almt(dims).eval()
    with torch.no_grad():
        out = model(batch)
        h1 = {m: model.embed_one(m, getattr(batch, m), getattr(batch, f"{m}_mask"))
              for m in ("text", "audio", "vision")}
        language = h1["text"] + model.language.positions
        hyper = torch.ones(N, TINY["num_tokens"], TINY["hidden_dim"])
        for i, layer in enumerate(model.hyper):
            hyper = _hyper_step(layer, language, h1["audio"], h1["vision"], hyper)
            if i < len(model.language.blocks):
                language = model.language.blocks[i](language)
        torch.testing.assert_close(out.features["hyper"], hyper, rtol=1e-5, atol=1e-5)
        # the prediction reads the fusion's extra token, the target being the last language state
        fused = model.fusion(hyper, language)[:, 0]
        torch.testing.assert_close(out.features["fused"], fused, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.pred, model.head(fused).squeeze(-1), rtol=1e-5, atol=1e-5)


def _other_audio_and_vision(batch: Batch) -> Batch:
    generator = torch.Generator().manual_seed(5)
    return batch.with_updates(audio=torch.randn(batch.audio.shape, generator=generator),
                              vision=torch.randn(batch.vision.shape, generator=generator))


def test_audio_and_vision_reach_the_prediction_only_through_the_hyper_attention(dims, batch):
    """With the text fixed, other audio and vision change the prediction; with the hyper layers'
    audio and vision values zeroed, nothing of them remains: the language-queried attention is
    their only path."""
    model = _almt(dims).eval()
    other = _other_audio_and_vision(batch)
    with torch.no_grad():
        assert not torch.allclose(model(batch).pred, model(other).pred, atol=1e-4)
        for layer in model.hyper:
            layer.to_v_audio.weight.zero_()
            layer.to_v_vision.weight.zero_()
        torch.testing.assert_close(model(batch).pred, model(other).pred)


def test_language_chooses_what_the_hyper_modality_reads(dims, batch):
    """The attention weights over the audio and vision tokens are language's: without a query
    (W_q = 0) every token is read equally, whatever the text; with it, other text reads otherwise."""
    model = _almt(dims).eval()
    generator = torch.Generator().manual_seed(3)
    other_text = batch.with_updates(text=torch.randn(batch.text.shape, generator=generator))
    with torch.no_grad():
        h1 = {m: model.embed_one(m, getattr(batch, m), getattr(batch, f"{m}_mask"))
              for m in ("text", "audio", "vision")}
        h1_other = model.embed_one("text", other_text.text, other_text.text_mask)
        layer, hyper = model.hyper[0], torch.ones(N, TINY["num_tokens"], TINY["hidden_dim"])
        read = layer(h1["text"], h1["audio"], h1["vision"], hyper)
        assert not torch.allclose(read, layer(h1_other, h1["audio"], h1["vision"], hyper), atol=1e-4)
        layer.to_q.weight.zero_()
        uniform = layer(h1["text"], h1["audio"], h1["vision"], hyper)
        torch.testing.assert_close(uniform, layer(h1_other, h1["audio"], h1["vision"], hyper))
        a, v = layer.norm_audio(h1["audio"]), layer.norm_vision(h1["vision"])
        mean_read = layer.to_v_audio(a).mean(1, keepdim=True) + layer.to_v_vision(v).mean(1, keepdim=True)
        expected = layer.norm_hyper(hyper) + layer.to_out(mean_read).expand_as(uniform)
        torch.testing.assert_close(uniform, expected)


def test_mask_padding_false_attends_to_padding_as_the_official_code(dims, batch):
    """Off, the padded frames are read as they are, exactly as if they were valid frames; on
    (default), they change nothing."""
    masked, official = _almt(dims), _almt(dims, mask_padding=False)
    official.load_state_dict(masked.state_dict())
    every_step_valid = batch.with_updates(**{f"{m}_mask": torch.ones_like(getattr(batch, f"{m}_mask"))
                                             for m in ("text", "audio", "vision")})
    with torch.no_grad():
        torch.testing.assert_close(official.eval()(batch).pred, masked.eval()(every_step_valid).pred)
        assert not torch.allclose(official(batch).pred, masked(batch).pred, atol=1e-4)
        shorter = batch.with_updates(audio=batch.audio[:, :4], audio_mask=batch.audio_mask[:, :4])
        assert np.isfinite(official(shorter).pred.numpy()).all()


def test_max_frames_reads_only_the_first_frames_of_audio_and_vision(dims, batch):
    """The 2023 release's input: audio and vision cut to their first frames, positions built for them."""
    model = _almt(dims, max_frames=3).eval()
    assert model.embed["audio"].positions.shape[1] == TINY["num_tokens"] + 3
    later = batch.with_updates(audio=torch.cat([batch.audio[:, :3], 50 + batch.audio[:, 3:]], 1),
                               vision=torch.cat([batch.vision[:, :3], 50 + batch.vision[:, 3:]], 1))
    earlier = batch.with_updates(audio=batch.audio + 1)
    with torch.no_grad():
        torch.testing.assert_close(model(batch).pred, model(later).pred)
        assert not torch.allclose(model(batch).pred, model(earlier).pred, atol=1e-4)


def test_every_parameter_trains(dims, batch):
    model = _almt(dims).train()
    out = model(batch)
    assert out.pred.shape == (N,) and out.losses == {}
    (out.pred - batch.labels).pow(2).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        # H0_hyper starts as ones (official init): a constant row that the first LayerNorm maps to
        # its bias, so that LayerNorm's weight has no gradient at the start
        if name != "hyper.0.norm_hyper.weight":
            assert param.grad.abs().sum() > 0, f"zero gradient for {name}"
