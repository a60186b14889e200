"""TFR-Net (models/tfr_net.py): its reconstruction loss against MMSA's definition written out here,
the positions it removes and reconstructs, when the losses join, its settings and MMSA's values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msakit.data.schema import MODALITIES
from msakit.errors import MsakitError
from msakit.missing import MissingSpec, apply_missing
from msakit.models import create_model
from msakit.models.registry import build_config
from msakit.models.tfr_net import TFRNet, reconstruction_loss
from msakit.training.config import resolve_config
from msakit.training.trainer import seed_everything

TINY = {"text_source": "features", "dim": 4, "heads": 2, "layers": 1, "memory_layers": 1,
        "temporal_heads": 1, "fusion_hidden_text": 3, "fusion_hidden_audio": 3,
        "fusion_hidden_vision": 3, "fusion_gru_layers": 1, "head_hidden": 4, "missing_rate": 0.3}


def _tfr(dims, seed: int = 0, **settings) -> TFRNet:
    seed_everything(seed)
    return create_model("tfr_net", {**TINY, **settings}, dims)


def mmsa_reconstruction(pred: np.ndarray, target: np.ndarray, removed: np.ndarray, weight: float) -> float:
    """MMSA's RECLoss ("combine"), element by element: over the removed positions, the summed
    smooth L1 (beta 1) plus `weight` times the 3-moment CMD of all rows of the masked tensors,
    each divided by (number of removed positions x width + 1e-4)."""
    batch, steps, width = pred.shape
    cells = [(b, t) for b in range(batch) for t in range(steps)]
    p = {(b, t): [pred[b, t, j] * removed[b, t] for j in range(width)] for b, t in cells}
    y = {(b, t): [target[b, t, j] * removed[b, t] for j in range(width)] for b, t in cells}
    count = sum(removed[b, t] for b, t in cells) * width + 1e-4

    def smooth_l1(a: float, b: float) -> float:
        return 0.5 * (a - b) ** 2 if abs(a - b) < 1 else abs(a - b) - 0.5

    huber = sum(smooth_l1(p[cell][j], y[cell][j]) for cell in cells for j in range(width))
    rows_p, rows_y = [p[cell] for cell in cells], [y[cell] for cell in cells]
    n = len(rows_p)
    mean_p = [sum(r[j] for r in rows_p) / n for j in range(width)]
    mean_y = [sum(r[j] for r in rows_y) / n for j in range(width)]
    cmd = sum((mean_p[j] - mean_y[j]) ** 2 for j in range(width)) ** 0.5
    for k in (2, 3):
        moment_p = [sum((r[j] - mean_p[j]) ** k for r in rows_p) / n for j in range(width)]
        moment_y = [sum((r[j] - mean_y[j]) ** k for r in rows_y) / n for j in range(width)]
        cmd += sum((moment_p[j] - moment_y[j]) ** 2 for j in range(width)) ** 0.5
    return huber / count + weight * cmd / count


@pytest.mark.parametrize("seed", [0, 1])
def test_reconstruction_loss_is_mmsas_recloss(seed):
    generator = torch.Generator().manual_seed(seed)
    pred = 2 * torch.randn(3, 5, 4, generator=generator, dtype=torch.float64)
    target = torch.randn(3, 5, 4, generator=generator, dtype=torch.float64)
    removed = torch.rand(3, 5, generator=generator) < 0.4
    for weight in (0.0, 5.0):
        expected = mmsa_reconstruction(pred.numpy(), target.numpy(), removed.numpy(), weight)
        assert reconstruction_loss(pred, target, removed, weight).item() == pytest.approx(expected, rel=1e-9)
    # what lies outside the removed positions never counts
    changed = torch.where(removed.unsqueeze(-1), target, target + 10.0)
    assert reconstruction_loss(pred, changed, removed, 5.0) == reconstruction_loss(pred, target, removed, 5.0)


def test_it_removes_only_valid_content_and_the_same_positions_whatever_the_batch(dims, batch):
    model = _tfr(dims)
    seen, removed = model.remove(batch)
    for m in MODALITIES:
        valid = getattr(batch, f"{m}_mask")
        assert removed[m].any() and not (removed[m] & ~valid).any()
        x, kept = getattr(seen, m), ~removed[m]
        assert (x[removed[m]] == 0).all()
        torch.testing.assert_close(x[kept], getattr(batch, m)[kept], rtol=0, atol=0)
    ids = seen.text_ids[:, 0]
    assert (ids[removed["text"]] == 100).all()  # [UNK]
    assert not removed["text"][torch.isin(batch.text_ids[:, 0], torch.tensor([0, 101, 102]))].any()
    share = sum(int(r.sum()) for r in removed.values()) / sum(
        int(getattr(batch, f"{m}_mask").sum()) for m in MODALITIES)
    assert 0.1 < share < 0.5  # missing_rate 0.3 of the droppable positions
    # samples 3..5 alone lose what they lose in the whole batch (one mask per sample, every epoch)
    part = batch.with_updates(**{k: getattr(batch, k)[3:] for k in (
        "labels", "index", "presence", "text", "text_ids", "text_mask", "audio", "audio_mask",
        "vision", "vision_mask")}, ids=batch.ids[3:])
    _, part_removed = model.remove(part)
    for m in MODALITIES:
        assert torch.equal(part_removed[m], removed[m][3:])


def test_the_losses_reconstruct_what_the_model_removed(dims, batch):
    """Each modality's loss is the weighted MMSA RECLoss of its generator's output against the
    complete input, over exactly the positions `remove` took away."""
    model = _tfr(dims, recon_weight_text=2.0, recon_weight_audio=3.0, recon_weight_vision=0.5)
    model.train()
    generated = {}
    for m in MODALITIES:
        model.generator[m].register_forward_hook(
            lambda _module, _inputs, output, m=m: generated.__setitem__(m, output.detach()))
    losses = model(batch).losses
    _, removed = model.remove(batch)
    weights = {"text": 2.0, "audio": 3.0, "vision": 0.5}
    for m in MODALITIES:
        expected = mmsa_reconstruction(generated[m].double().numpy(), getattr(batch, m).double().numpy(),
                                       removed[m].numpy(), 5.0)
        assert losses[f"reconstruction_{m}"].item() == pytest.approx(weights[m] * expected, rel=1e-4)


def test_positions_a_protocol_removed_are_no_targets(dims, batch):
    model = _tfr(dims)
    dropped = apply_missing(batch, MissingSpec("intra", rate=0.5, seed=3))
    seen, removed = model.remove(dropped)
    for m in MODALITIES:
        assert dropped.dropped[m].any()
        assert not (removed[m] & dropped.dropped[m]).any()
        assert torch.equal(seen.dropped[m], dropped.dropped[m] | removed[m])


def test_the_losses_join_at_reconstruction_from_epoch_and_only_in_training(dims, batch):
    model = _tfr(dims, reconstruction_from_epoch=2)
    model.train()
    model.on_train_epoch_start(1, lambda: iter([batch]))
    assert model(batch).losses == {}
    model.on_train_epoch_start(2, lambda: iter([batch]))
    losses = model(batch).losses
    assert set(losses) == {f"reconstruction_{m}" for m in MODALITIES} and all(v > 0 for v in losses.values())
    model.eval()
    with torch.no_grad():
        assert model(batch).losses == {}
    assert _tfr(dims, missing_rate=0.0).train()(batch).losses == {}  # nothing removed, nothing to rebuild


def test_evaluation_reads_the_batch_as_given(dims, batch):
    """Predictions never depend on the model's own removal, nor on the rest of the batch."""
    model = _tfr(dims).eval()
    with torch.no_grad():
        whole = model(batch).pred
        one = model(batch.with_updates(**{k: getattr(batch, k)[4:5] for k in (
            "labels", "index", "presence", "text", "text_ids", "text_mask", "audio", "audio_mask",
            "vision", "vision_mask")}, ids=batch.ids[4:5])).pred
    torch.testing.assert_close(one, whole[4:5], rtol=1e-5, atol=1e-6)


def test_temporal_heads_must_divide_the_lengths(dims):
    with pytest.raises(MsakitError, match=r"model.temporal_heads \(3\).*text length \(8\)") as error:
        _tfr(dims, temporal_heads=3)
    assert "\n" not in str(error.value)


def test_a_bert_encoder_is_read_for_the_input_and_the_target(dims, batch, tiny_bert):
    model = _tfr(dims, text_source="encoder", text_encoder=tiny_bert)
    model.train()
    out = model(batch)
    assert "reconstruction_text" in out.losses
    (out.pred.pow(2).mean() + sum(out.losses.values())).backward()
    assert all(p.grad is not None for p in model.text_encoder.model.encoder.parameters())


# MMSA's config_regression.json @ a94e65d, key "tfr_net": (nlevels, relu_dropout, embed_dropout,
# cls_dropout, weight_gen_loss, batch_size, learning_rate_other, learning_rate_bert)
MMSA_SETTINGS = {
    "mosi": (3, 0.2, 0.2, 0.0, (5, 2, 20), 24, 1e-3, 2e-6),
    "mosei": (3, 0.2, 0.2, 0.0, (5e-6, 2e-6, 2e-5), 24, 2e-3, 1e-5),
    "sims": (2, 0.0, 0.1, 0.1, (1, 0.01, 1e-4), 16, 2e-3, 1e-5),
}


@pytest.mark.parametrize("family", sorted(MMSA_SETTINGS))
def test_yaml_holds_mmsas_settings(family):
    resolved = resolve_config("tfr_net", family)
    model, training = build_config("tfr_net", resolved["model"]), resolved["training"]
    layers, relu, embed, head, weights, batch_size, lr, bert_lr = MMSA_SETTINGS[family]
    assert (model.layers, model.relu_dropout, model.embed_dropout, model.head_dropout) == (
        layers, relu, embed, head)
    assert (model.recon_weight_text, model.recon_weight_audio, model.recon_weight_vision) == weights
    assert (model.dim, model.heads, model.memory_layers, model.similarity_weight) == (30, 6, 3, 5.0)
    assert (model.missing_rate, model.missing_seed, training["grad_clip_value"]) == (0.2, 1111, 0.8)
    # MMSA's update_epochs 4: cleared every 4 batches, a step after each and one more after the 4th
    assert (training["accumulate_steps"], training["step_every_batch"]) == (4, True)
    assert (training["batch_size"], training["lr"], training["encoder_lr"]) == (batch_size, lr, bert_lr)
    assert (training["weight_decay"], training["encoder_weight_decay"]) == (1e-3, 1e-4)
    assert (training["loss"], training["patience"], training["grad_clip"]) == ("l1", 6, None)
    assert model.text_source == "encoder" and model.finetune_text


def test_the_synthetic_settings_build_and_run(dims, batch):
    resolved = resolve_config("tfr_net", "synthetic")
    # one step per batch on its own gradient, as before the MMSA sections stepped as MMSA does
    assert resolved["training"].get("accumulate_steps", 1) == 1
    assert not resolved["training"].get("step_every_batch", False)
    model = create_model("tfr_net", resolved["model"], dims).train()
    out = model(batch)
    assert torch.isfinite(out.pred).all() and all(torch.isfinite(v) for v in out.losses.values())


def test_mask_padding_false_lets_padding_reach_the_prediction(dims, batch):
    """Sample 2 has 1 valid audio frame of 10: what its padded frames hold matters only to MMSA's
    reading (`mask_padding: false`)."""
    audio = batch.audio.clone()
    audio[2, 1:] += 5.0
    changed = batch.with_updates(audio=audio)
    for mask_padding in (True, False):
        model = _tfr(dims, mask_padding=mask_padding).eval()
        with torch.no_grad():
            before, after = model(batch).pred[2], model(changed).pred[2]
        assert (before != after).item() != mask_padding
