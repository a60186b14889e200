"""MISA (models/misa.py): its CMD and difference losses against the paper's equations written out
here, its recipe's clipping by value in the training loop (fp16 included), the sequence lengths
its LSTMs read, and the packaged MiniLM as its text encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msakit.data.schema import Batch
from msakit.errors import MsakitError
from msakit.models import create_model
from msakit.models.misa import MISA, cmd, difference
from msakit.models.registry import build_config
from msakit.training.config import resolve_config
from msakit.training.settings import TrainConfig
from msakit.training.trainer import Trainer, seed_everything

TINY = {"text_source": "features", "hidden_size": 4, "fusion_ff_dim": 8}


def _misa(dims, seed: int = 0, **settings) -> MISA:
    seed_everything(seed)
    return create_model("misa", {**TINY, **settings}, dims)


def _codes(seed: int, batch: int = 7, width: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, width, generator=generator, dtype=torch.float64),
            torch.rand(batch, width, generator=generator, dtype=torch.float64) ** 2)


def paper_cmd(x: np.ndarray, y: np.ndarray, moments: int) -> float:
    """Zellinger et al.'s central moment discrepancy for codes in [0, 1] (MISA eq. 7), one
    dimension and one moment at a time: ||E(X) - E(Y)||_2 + sum_k ||C_k(X) - C_k(Y)||_2."""
    n, width = x.shape
    mean_x = [sum(x[i, j] for i in range(n)) / n for j in range(width)]
    mean_y = [sum(y[i, j] for i in range(len(y))) / len(y) for j in range(width)]
    total = sum((mean_x[j] - mean_y[j]) ** 2 for j in range(width)) ** 0.5
    for k in range(2, moments + 1):
        central_x = [sum((x[i, j] - mean_x[j]) ** k for i in range(n)) / n for j in range(width)]
        central_y = [sum((y[i, j] - mean_y[j]) ** k for i in range(len(y))) / len(y) for j in range(width)]
        total += sum((central_x[j] - central_y[j]) ** 2 for j in range(width)) ** 0.5
    return total


def paper_difference(x: np.ndarray, y: np.ndarray) -> float:
    """MISA eq. 8, ||X^T Y||_F^2, on batch-centred codes whose rows have unit norm (plus MMSA's 1e-6),
    divided by the number of entries of X^T Y (MMSA takes their mean)."""
    def unit(z: np.ndarray) -> np.ndarray:
        z = z - z.mean(axis=0)
        return np.stack([row / (np.sqrt((row ** 2).sum()) + 1e-6) for row in z])

    product = unit(x).T @ unit(y)
    return float(sum(v ** 2 for v in product.ravel()) / product.size)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cmd_is_the_papers_central_moment_discrepancy(seed):
    x, y = _codes(seed)
    assert cmd(x, y).item() == pytest.approx(paper_cmd(x.numpy(), y.numpy(), 5), rel=1e-10)
    assert cmd(x, y, moments=2).item() == pytest.approx(paper_cmd(x.numpy(), y.numpy(), 2), rel=1e-10)
    assert cmd(x, x).item() == 0.0
    shifted = cmd(x, x + 0.25).item()  # a shift moves the mean only: sqrt(width) * 0.25
    assert shifted == pytest.approx(0.25 * np.sqrt(x.shape[1]), rel=1e-10)


def test_cmd_has_finite_gradients_where_moments_agree():
    """A batch of one: every central moment is 0 on both sides, whose norm MMSA differentiates to NaN."""
    x = torch.rand(1, 4, requires_grad=True)
    cmd(x, torch.rand(1, 4)).backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_difference_is_the_papers_soft_orthogonality(seed):
    x, y = _codes(seed)
    assert difference(x, y).item() == pytest.approx(paper_difference(x.numpy(), y.numpy()), rel=1e-10)


def test_difference_vanishes_for_orthogonal_codes_and_ignores_scale():
    """X^T Y = 0 when the batch-centred columns of X are orthogonal to those of Y (over the batch)."""
    across_batch_x = torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64)
    across_batch_y = torch.tensor([0.0, 0.0, 1.0, -1.0], dtype=torch.float64)
    x = 0.5 + 0.1 * torch.outer(across_batch_x, torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64))
    y = 0.3 + 0.2 * torch.outer(across_batch_y, torch.tensor([0.5, -1.0, 3.0], dtype=torch.float64))
    assert difference(x, y).item() == pytest.approx(0.0, abs=1e-20)
    assert difference(x, x).item() > 0.1
    a, b = _codes(4)
    assert difference(3 * a, b).item() == pytest.approx(difference(a, b).item(), rel=1e-5)


def test_losses_are_weighted_and_only_in_training(dims, batch):
    plain, weighted = (_misa(dims, diff_weight=w, sim_weight=w, recon_weight=w) for w in (1.0, 0.5))
    plain.train()
    weighted.train()
    torch.manual_seed(0)
    one = plain(batch).losses
    torch.manual_seed(0)
    half = weighted(batch).losses
    assert set(one) == {"similarity", "difference", "reconstruction"}
    for name in one:
        assert one[name] > 0
        torch.testing.assert_close(half[name], 0.5 * one[name])
    plain.eval()
    assert plain(batch).losses == {}


def test_the_recipes_clip_by_value_holds_under_fp16_loss_scaling(tiny_dataset):
    """MMSA clips after backward; the loop clips the true gradients even when fp16 scales them (the
    shared encoder, used three times, included), so the recipe trains under fp16."""
    seed_everything(0)
    model = create_model("misa", TINY, tiny_dataset.dims)
    config = TrainConfig(epochs=1, batch_size=12, accumulate_steps=2, grad_clip_value=1e-3,
                         precision="fp16", device="cpu", patience=None)
    trainer = Trainer(model, config, "mosi", progress=False)
    trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # no overflow here
    largest = []
    original = torch.optim.AdamW.step

    def record(optimizer, *args, **kwargs):  # the gradients as the step reads them, unscaled
        largest.append(max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None))
        largest.append(float(model.shared[0].weight.grad.abs().max()))
        return original(optimizer, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", record)
        trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=0)
    assert len(largest) == 2 * 2  # 4 batches of 12, two per step
    assert largest == [pytest.approx(1e-3, rel=1e-6)] * 4


def _with_frames(batch: Batch, modality: str, start: int, stop: int) -> Batch:
    x = getattr(batch, modality).clone()
    x[:, start:stop] += 5.0
    return batch.with_updates(**{modality: x})


def test_rnn_lengths(dims, batch):
    """`own` reads each modality's valid frames; `text` (MMSA) reads as many frames as there are
    text tokens, valid or padded, and none beyond."""
    own, text = _misa(dims), _misa(dims, rnn_lengths="text")
    for model in (own, text):
        model.eval()
    # sample 2: 3 text tokens, 1 valid audio frame, 5 valid vision frames
    sample = batch.with_updates(**{k: getattr(batch, k)[2:3] for k in (
        "labels", "index", "presence", "text", "text_ids", "text_mask", "audio", "audio_mask",
        "vision", "vision_mask")}, ids=batch.ids[2:3])
    with torch.no_grad():
        for model, reads_padding in ((own, False), (text, True)):
            before = model(sample).pred
            assert (model(_with_frames(sample, "audio", 1, 3)).pred != before).item() == reads_padding
            assert (model(_with_frames(sample, "vision", 1, 3)).pred != before).item()
        assert text(_with_frames(sample, "vision", 3, 5)).pred == text(sample).pred
        assert own(_with_frames(sample, "vision", 3, 5)).pred != own(sample).pred


def test_settings_are_checked(dims):
    with pytest.raises(MsakitError, match="model.rnn_lengths"):
        _misa(dims, rnn_lengths="audio")
    with pytest.raises(MsakitError, match=r"model.hidden_size \(5\).*model.fusion_heads"):
        _misa(dims, hidden_size=5)


def test_the_packaged_minilm_encodes_the_text(dims, batch):
    model = _misa(dims, text_source="encoder", text_encoder="minilm")
    assert model.project["text"][0].in_features == 384
    model.train()
    out = model(batch)
    (out.pred.pow(2).mean() + sum(out.losses.values())).backward()
    assert all(p.grad is not None for p in model.text_encoder.model.encoder.parameters())


# MMSA's config_regression.json @ a94e65d, key "misa": (hidden_size, dropout, diff, sim, recon,
# grad_clip, batch_size), and update_epochs 2 for all
MMSA_SETTINGS = {
    "mosi": (128, 0.2, 0.1, 0.3, 1.0, 0.8, 16), "mosei": (128, 0.5, 0.3, 0.8, 1.0, 0.8, 64),
    "sims": (128, 0.0, 0.3, 1.0, 0.8, 1.0, 64), "simsv2": (64, 0.5, 0.5, 1.0, 0.5, 0.8, 16),
}


@pytest.mark.parametrize("family", sorted(MMSA_SETTINGS))
def test_yaml_holds_mmsas_settings(family):
    resolved = resolve_config("misa", family)
    model, training = build_config("misa", resolved["model"]), resolved["training"]
    hidden, dropout, diff, sim, recon, clip, batch_size = MMSA_SETTINGS[family]
    assert (model.hidden_size, model.dropout, model.diff_weight, model.sim_weight,
            model.recon_weight) == (hidden, dropout, diff, sim, recon)
    assert (training["grad_clip_value"], training["batch_size"], training["accumulate_steps"]) == (
        clip, batch_size, 2)
    assert (training["lr"], training["encoder_lr"], training["weight_decay"]) == (1e-4, 1e-4, 0.0)
    assert (training["loss"], training["patience"], training["grad_clip"]) == ("mse", 8, None)
    assert model.text_source == "encoder" and model.finetune_text


def test_the_synthetic_settings_build_and_run(dims, batch):
    model = create_model("misa", resolve_config("misa", "synthetic")["model"], dims).eval()
    with torch.no_grad():
        assert torch.isfinite(model(batch).pred).all()
