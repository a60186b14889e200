"""CENet (models/cenet.py): what its injection does to BERT's hidden states (against the plain
encoder), its reading of padded and empty non-verbal streams, the frozen embeddings, the encoder
checks and MMSA's settings in the YAML."""

from __future__ import annotations

import pytest
import torch

from msakit.data.schema import Batch
from msakit.errors import MsakitError
from msakit.models import create_model
from msakit.models.cenet import CENet, FrameAttention
from msakit.models.registry import build_config
from msakit.training.config import resolve_config
from msakit.training.trainer import seed_everything


def _cenet(dims, **settings) -> CENet:
    seed_everything(0)
    return create_model("cenet", {"text_source": "features", **settings}, dims)


def _on_bert(dims, tiny_bert: str, **settings) -> CENet:
    return _cenet(dims, **{"text_source": "encoder", "text_encoder": tiny_bert, "injection_layer": 0,
                           **settings})


def _zero_nonverbal(batch: Batch) -> Batch:
    return batch.with_updates(audio=torch.zeros_like(batch.audio), vision=torch.zeros_like(batch.vision))


def _plain_states(model: CENet, batch: Batch, shift: torch.Tensor | None = None) -> torch.Tensor:
    """The encoder's last states without the enhancement; with `shift`, that vector added to the
    input of the injection layer (written independently of the model's own hook)."""
    encoder = model.text_encoder.model
    layer = encoder.encoder.layer[model.config.injection_layer]

    def add_shift(_module, args, kwargs):
        if args:
            return (args[0] + shift, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + shift}

    hook = layer.register_forward_pre_hook(add_shift, with_kwargs=True) if shift is not None else None
    try:
        ids = batch.text_ids
        states = encoder(input_ids=ids[:, 0], attention_mask=ids[:, 1], token_type_ids=ids[:, 2])
        return states.last_hidden_state
    finally:
        if hook is not None:
            hook.remove()


def test_zero_nonverbal_input_leaves_the_initial_text_path_unchanged(dims, batch, tiny_bert):
    """At initialisation (the enhancement's biases 0, as MMSA's init_weights leaves them) all-zero
    audio and vision give the plain encoder's states at every token; real ones do not."""
    model = _on_bert(dims, tiny_bert).eval()
    with torch.no_grad():
        plain = _plain_states(model, batch)
        torch.testing.assert_close(model.text_states(_zero_nonverbal(batch)), plain, rtol=0, atol=0)
        assert (model.text_states(batch) - plain).abs().max() > 1e-4


def test_zero_nonverbal_input_later_shifts_every_token_by_one_vector(dims, batch, tiny_bert):
    """With trained (non-zero) biases, zero audio and vision add the same vector
    s_0 = W_c [W_v^v T_v(0) + b_v^v; W_v^a T_a(0) + b_v^a] + b_c to every token's layer input."""
    model = _on_bert(dims, tiny_bert).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.enhancement.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator))
        ce = model.enhancement
        zero_v = ce.vision_transform(torch.zeros(dims.vision))
        zero_a = ce.audio_transform(torch.zeros(dims.audio))
        shift = ce.combine(torch.cat([ce.vision_attention.value(zero_v), ce.audio_attention.value(zero_a)]))
        assert shift.abs().max() > 0.1
        expected = _plain_states(model, batch, shift)
        torch.testing.assert_close(model.text_states(_zero_nonverbal(batch)), expected)
        assert (expected - _plain_states(model, batch)).abs().max() > 1e-3


def test_layers_before_the_injection_are_the_plain_encoders(dims, batch):
    """The packaged MiniLM (6 layers), injected before layer 1 as in MMSA: layer 0's output is the
    plain encoder's whatever the non-verbal input, layer 1's is not."""
    model = _cenet(dims, text_source="encoder", text_encoder="minilm").eval()
    assert model.enhancement.combine.out_features == 384
    layers = model.text_encoder.model.encoder.layer
    outputs: dict[int, torch.Tensor] = {}
    hooks = [layers[i].register_forward_hook(
        lambda _m, _a, out, i=i: outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out))
        for i in (0, 1)]
    with torch.no_grad():
        _plain_states(model, batch)
        plain = dict(outputs)
        model(batch)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(outputs[0], plain[0], rtol=0, atol=0)
    assert (outputs[1] - plain[1]).abs().max() > 1e-4


def test_the_folded_frame_attention_is_mmsas_attention_over_the_transformed_frames():
    """softmax(8 Q K^T) V with K, V computed from every transformed frame (MMSA's order), against
    the model's folded form, with weights large enough for peaked attention; padded frames unread."""
    torch.manual_seed(0)
    width, frames = 6, 9
    attention = FrameAttention(width).double()
    projection = torch.nn.Linear(width, width).double()
    with torch.no_grad():
        for param in (*attention.parameters(), *projection.parameters()):
            param.normal_(std=1.0)
    text = torch.randn(2, 4, width, dtype=torch.float64)
    hidden = torch.randn(2, frames, width, dtype=torch.float64)
    mask = torch.ones(2, frames, dtype=torch.bool)
    mask[1, 5:] = False
    transformed = projection(hidden)
    scores = 8 * attention.query(text) @ attention.key(transformed).transpose(1, 2)
    scores[1, :, 5:] = float("-inf")
    weights = torch.softmax(scores, dim=-1)
    assert weights.max() > 0.9, "the check needs peaked attention"
    expected = weights @ attention.value(transformed)
    torch.testing.assert_close(attention(text, hidden, projection, mask), expected, rtol=1e-10, atol=1e-10)


def _frames(batch: Batch, modality: str, values: torch.Tensor, mask: torch.Tensor) -> Batch:
    return batch.with_updates(**{modality: values, f"{modality}_mask": mask})


def test_padded_frames(dims, batch):
    """Masked (msakit): padded frames are never read. MMSA's reading (`mask_nonverbal_padding:
    false`): padded frames are read as zero frames, whatever they hold."""
    masked, mmsa = _cenet(dims), _cenet(dims, mask_nonverbal_padding=False)
    padded = batch.with_updates(
        audio=torch.cat([batch.audio, torch.full((len(batch), 3, dims.audio), float("inf"))], dim=1),
        audio_mask=torch.cat([batch.audio_mask, torch.zeros(len(batch), 3, dtype=torch.bool)], dim=1))
    full = batch.audio_mask.all(dim=1)
    assert full.any() and not full.all(), "the clips mix full and padded audio"
    as_zeros = padded.with_updates(audio=padded.audio.masked_fill(~padded.audio_mask.unsqueeze(-1), 0.0),
                                   audio_mask=torch.ones_like(padded.audio_mask))
    with torch.no_grad():
        torch.testing.assert_close(masked.eval()(padded).pred, masked(batch).pred)
        reads_zeros = mmsa.eval()(padded).pred
        torch.testing.assert_close(reads_zeros, mmsa(as_zeros).pred, rtol=0, atol=0)
        assert (reads_zeros - masked(padded).pred).abs().min() > 0  # every clip now reads padding


def test_an_empty_stream_reads_as_a_zeroed_one(dims, batch):
    """No valid audio frame gives the enhancement of all-zero audio (what a missing-data protocol
    leaves), not a NaN."""
    model = _cenet(dims).eval()
    empty = batch.with_updates(audio_mask=torch.zeros_like(batch.audio_mask))
    zeroed = batch.with_updates(audio=torch.zeros_like(batch.audio),
                                audio_mask=torch.ones_like(batch.audio_mask))
    with torch.no_grad():
        torch.testing.assert_close(model(empty).pred, model(zeroed).pred)
        assert (model(empty).pred != model(batch).pred).all()


def test_embeddings_are_frozen_as_in_mmsa_and_a_frozen_encoder_still_trains_the_injection(
        dims, batch, tiny_bert):
    for freeze in (True, False):
        model = _on_bert(dims, tiny_bert, freeze_embeddings=freeze).train()
        model(batch).pred.abs().mean().backward()
        embeddings = list(model.text_encoder.model.embeddings.parameters())
        assert all((p.grad is None) == freeze and p.requires_grad != freeze for p in embeddings)
        assert model.text_encoder.model.encoder.layer[0].intermediate.dense.weight.grad is not None
    frozen = _on_bert(dims, tiny_bert, finetune_text=False).train()
    frozen(batch).pred.abs().mean().backward()
    assert all(p.grad is None for p in frozen.text_encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in frozen.enhancement.parameters())


def test_the_injection_layer_must_exist(dims, tiny_bert):
    with pytest.raises(MsakitError, match=r"model.injection_layer \(7\).*layer count") as error:
        _on_bert(dims, tiny_bert, injection_layer=7)
    assert "\n" not in str(error.value)


# MMSA's config_regression.json @ a94e65d, key "cenet": (learning_rate, weight_decay, batch_size)
MMSA_SETTINGS = {"mosi": (1e-5, 1e-4, 64), "mosei": (1e-5, 1e-4, 64), "sims": (2e-6, 0.0, 32),
                 "simsv2": (3e-5, 0.0, 64)}


@pytest.mark.parametrize("family", sorted(MMSA_SETTINGS))
def test_yaml_holds_mmsas_settings(family):
    resolved = resolve_config("cenet", family)
    model, training = build_config("cenet", resolved["model"]), resolved["training"]
    lr, decay, batch_size = MMSA_SETTINGS[family]
    assert (training["lr"], training["encoder_lr"]) == (lr, lr)
    assert (training["weight_decay"], training["encoder_weight_decay"]) == (decay, decay)
    assert (training["batch_size"], training["grad_clip"], training["loss"], training["patience"]) == (
        batch_size, 2.0, "l1", 8)
    assert model.text_source == "encoder" and model.finetune_text and model.freeze_embeddings
    assert (model.injection_layer, model.head_dropout) == (1, 0.1)


def test_the_synthetic_settings_build_and_run(dims, batch):
    model = create_model("cenet", resolve_config("cenet", "synthetic")["model"], dims).eval()
    with torch.no_grad():
        assert torch.isfinite(model(batch).pred).all()
