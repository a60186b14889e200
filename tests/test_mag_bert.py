"""MAG-BERT (models/mag_bert.py): its gate against the paper's equation written out here, the text
path it leaves alone when audio and vision are zero, the aligned input it needs (unaligned refused
in one line, or resampled onto the tokens when asked), and the packaged MiniLM as its encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msakit.data.schema import Batch
from msakit.errors import MsakitError
from msakit.models import create_model
from msakit.models.mag_bert import MAGBERT, MultimodalAdaptationGate, resample_frames
from msakit.models.registry import build_config
from msakit.training.runs import aligned_input
from msakit.training.trainer import seed_everything


def _mag_bert(dims, encoder: str, **settings) -> MAGBERT:
    seed_everything(0)
    return create_model("mag_bert", {"text_encoder": encoder, **settings}, dims)


def _aligned(batch: Batch, seed: int = 0, scale: float = 1.0) -> Batch:
    """`batch` with audio and vision at the token steps, every frame valid (MMSA's aligned pickles)."""
    generator = torch.Generator().manual_seed(seed)
    steps = batch.text_ids.shape[-1]
    changes = {}
    for modality in ("audio", "vision"):
        width = getattr(batch, modality).shape[-1]
        changes[modality] = scale * torch.randn(len(batch), steps, width, generator=generator)
        changes[f"{modality}_mask"] = torch.ones(len(batch), steps, dtype=torch.bool)
    return batch.with_updates(**changes)


def paper_gate(gate: MultimodalAdaptationGate, text: np.ndarray, audio: np.ndarray,
               vision: np.ndarray) -> np.ndarray:
    """Rahman et al. eq. 1-6 one token at a time, with MMSA's eps and its zero-norm rule."""
    p = {name: value.detach().double().numpy() for name, value in gate.state_dict().items()}
    out = np.zeros_like(text)
    for b in range(text.shape[0]):
        for i in range(text.shape[1]):
            e, a, v = text[b, i], audio[b, i], vision[b, i]
            g_v = np.maximum(p["gate_vision.weight"] @ np.concatenate([v, e]) + p["gate_vision.bias"], 0)
            g_a = np.maximum(p["gate_audio.weight"] @ np.concatenate([a, e]) + p["gate_audio.bias"], 0)
            h = (g_v * (p["shift_vision.weight"] @ v + p["shift_vision.bias"])
                 + g_a * (p["shift_audio.weight"] @ a + p["shift_audio.bias"]))
            h_norm = np.sqrt((h ** 2).sum()) or 1.0
            alpha = min(np.sqrt((e ** 2).sum()) / (h_norm + 1e-6) * gate.beta_shift, 1.0)
            z = e + alpha * h
            normed = (z - z.mean()) / np.sqrt(z.var() + gate.norm.eps)
            out[b, i] = normed * p["norm.weight"] + p["norm.bias"]
    return out


def test_the_gate_is_the_papers_equation():
    """Both branches of the scaling (alpha < 1 and alpha = 1) and a zero displacement."""
    torch.manual_seed(0)
    gate = MultimodalAdaptationGate(6, 3, 4, beta_shift=0.5, dropout=0.0, init_std=0.5).double().eval()
    with torch.no_grad():
        for layer in (gate.gate_vision, gate.gate_audio, gate.shift_vision, gate.shift_audio):
            layer.bias.normal_()
        gate.norm.weight.normal_()
        gate.norm.bias.normal_()
        gate.shift_audio.bias.zero_()
        gate.shift_vision.bias.zero_()
    text = torch.randn(3, 5, 6, dtype=torch.float64)
    audio = torch.randn(3, 5, 3, dtype=torch.float64) * torch.rand(3, 5, 1, dtype=torch.float64) * 2
    vision = torch.randn(3, 5, 4, dtype=torch.float64) * torch.rand(3, 5, 1, dtype=torch.float64) * 2
    audio[0, 0], vision[0, 0] = 0.0, 0.0  # no displacement: the zero-norm branch
    with torch.no_grad():
        shift = gate.displacement(text, audio, vision)
        got = gate(text, audio, vision).numpy()
    ratio = torch.linalg.vector_norm(shift, dim=-1) / torch.linalg.vector_norm(text, dim=-1)
    assert (ratio < 0.5 - 1e-6).any() and torch.isclose(ratio, torch.tensor(0.5, dtype=torch.float64)).any()
    assert ratio[0, 0] == 0 and ratio.max() <= 0.5 + 1e-9
    np.testing.assert_allclose(got, paper_gate(gate, text.numpy(), audio.numpy(), vision.numpy()),
                               rtol=1e-10, atol=1e-10)


def test_zero_audio_and_vision_leave_the_text_path_alone(dims, batch, tiny_bert):
    """As initialised (zero biases) zero non-verbal input shifts nothing: the prediction is BERT's own
    forward (its own attention masks) with the gate's LayerNorm after the embeddings; non-zero input
    changes it."""
    model = _mag_bert(dims, tiny_bert).eval()
    quiet = _aligned(batch, scale=0.0)
    bert = model.text_encoder.model
    hook = bert.embeddings.register_forward_hook(lambda module, inputs, output: model.gate.norm(output))
    try:
        with torch.no_grad():
            ids = quiet.text_ids
            pooled = bert(input_ids=ids[:, 0], attention_mask=ids[:, 1],
                          token_type_ids=ids[:, 2]).pooler_output
            text_only = model.head(pooled).squeeze(-1)
    finally:
        hook.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(quiet).pred, text_only)
        assert not torch.allclose(model(_aligned(batch, scale=1.0)).pred, text_only)


def test_the_gate_and_head_start_as_mmsas(dims, tiny_bert):
    """normal(0, initializer_range) weights and zero biases, as MMSA's from_pretrained leaves them."""
    model = _mag_bert(dims, tiny_bert)
    std = model.text_encoder.model.config.initializer_range
    for layer in (model.gate.gate_vision, model.gate.gate_audio, model.gate.shift_vision,
                  model.gate.shift_audio, model.head):
        assert torch.count_nonzero(layer.bias) == 0
        assert abs(layer.weight.std().item() - std) < 0.5 * std


def test_the_model_reads_aligned_input_and_refuses_the_rest_in_one_line(dims, batch, tiny_bert):
    assert MAGBERT.aligned_input and aligned_input("mag_bert", None)
    model = _mag_bert(dims, tiny_bert)  # unaligned_input: refuse, MMSA's
    refusal = r"audio has 10 steps for 8 tokens.*unaligned_input=resample"
    with pytest.raises(MsakitError, match=refusal) as error:
        model(batch)
    assert "\n" not in str(error.value)
    assert torch.isfinite(model(_aligned(batch)).pred).all()
    resampling = _mag_bert(dims, tiny_bert, unaligned_input="resample").eval()
    with torch.no_grad():
        torch.testing.assert_close(resampling(_aligned(batch)).pred, model.eval()(_aligned(batch)).pred)


def test_text_features_are_refused_in_one_line():
    with pytest.raises(MsakitError, match="model.text_source must be 'encoder'") as error:
        build_config("mag_bert", {"text_source": "features"})
    assert "\n" not in str(error.value)


def test_resampling_spreads_the_valid_frames_over_the_attended_tokens():
    frames = torch.arange(1.0, 7.0).view(1, 6, 1).repeat(3, 1, 1)  # frame j holds j + 1
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False  # two frames
    mask[1, 0] = False
    mask[2, 1] = False  # a dropped frame inside a span
    attention = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    got = resample_frames(frames.masked_fill(~mask.unsqueeze(-1), 0.0), mask, attention).squeeze(-1)
    expected = torch.tensor([
        [1.5, 3.5, 5.5, 0.0],  # 6 frames over 3 tokens: [0, 2), [2, 4), [4, 6)
        [0.0, 2.0, 3.0, 4.0],  # frames up to 4 over 4 tokens: one each, frame 0 dropped
        [1.0, 3.5, 5.5, 0.0],  # frame 1 dropped: token 0 reads frame 0 alone
    ])
    torch.testing.assert_close(got, expected)


def test_the_packaged_minilm_carries_the_gate(dims, batch):
    model = _mag_bert(dims, "minilm")
    assert model.gate.norm.normalized_shape == (model.text_encoder.model.config.hidden_size,)
    out = model.train()(_aligned(batch))
    out.pred.sum().backward()
    assert torch.isfinite(out.pred).all() and model.gate.shift_audio.weight.grad is not None
