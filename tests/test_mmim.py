"""MMIM (models/mmim.py): its CPC, Gaussian log-likelihood and mixture-entropy bounds against
computations written out here, the entropy memory across batches, and its two optimisation phases
per epoch in the training loop (the trainer's `extra_phases` hook)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model_inputs import N, contract_split
from msakit.data.batching import make_batch
from msakit.data.schema import Batch
from msakit.errors import MsakitError
from msakit.models import create_model
from msakit.models.mmim import MMIM, contrastive_loss, gaussian_log_likelihood, mixture_entropy
from msakit.models.registry import build_config
from msakit.training.config import resolve_config
from msakit.training.settings import TrainConfig
from msakit.training.trainer import Trainer, build_optimizer, build_phase_optimizers, seed_everything
from resume_check import assert_resumed_fit_is_the_straight_fit

TINY = {"text_source": "features", "audio_hidden": 3, "vision_hidden": 3, "audio_out": 8,
        "vision_out": 8, "fusion_hidden": 6}


def _mmim(dims, seed: int = 0, **settings) -> MMIM:
    seed_everything(seed)
    return create_model("mmim", {**TINY, **settings}, dims)


def _random(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cpc_is_infonce_over_the_batch_of_unit_vectors(seed):
    x, prediction = _random(seed, 5, 3), _random(seed + 10, 5, 3)
    def unit(rows: torch.Tensor) -> list[list[float]]:
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in rows.tolist()]

    unit_x, unit_p = unit(x), unit(prediction)

    def score(i: int, j: int) -> float:
        return sum(a * b for a, b in zip(unit_x[i], unit_p[j], strict=True))

    # -log of the softmax probability of the matching prediction among the batch's, averaged
    expected = -sum(math.log(math.exp(score(i, i)) / sum(math.exp(score(i, j)) for j in range(5)))
                    for i in range(5)) / 5
    assert contrastive_loss(x, prediction).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_lld_is_the_gaussian_log_likelihood_without_constants_or_log_variance(seed):
    mu, logvar, y = _random(seed, 4, 3), _random(seed + 1, 4, 3), _random(seed + 2, 4, 3)
    normal = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    # log N(y; mu, sigma^2) = -(y - mu)^2 / (2 sigma^2) - log sigma - log sqrt(2 pi)
    expected = (normal.log_prob(y) + 0.5 * logvar + 0.5 * math.log(2 * math.pi)).sum(-1).mean()
    assert gaussian_log_likelihood(mu, logvar, y).item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_is_a_quarter_of_the_two_components_log_determinants(seed):
    positive, negative = _random(seed, 9, 3), _random(seed + 5, 7, 3) * 2 + 1
    _, logdet_p = np.linalg.slogdet(np.cov(positive.numpy(), rowvar=False, bias=True))
    _, logdet_n = np.linalg.slogdet(np.cov(negative.numpy(), rowvar=False, bias=True))
    assert mixture_entropy(positive, negative).item() == pytest.approx(0.25 * (logdet_p + logdet_n),
                                                                       rel=1e-10)


def test_entropy_needs_more_samples_than_dimensions():
    """Three samples in three dimensions have a singular covariance (log det -inf in MMSA)."""
    assert mixture_entropy(_random(0, 3, 3), _random(1, 9, 3)) is None
    assert mixture_entropy(_random(0, 4, 3), _random(1, 4, 3)) is not None


def _signed_split():
    """The contract split with labels of both signs in every pair of clips."""
    split = contract_split()
    split.labels[:] = np.array([1.5, -2.0, 0.7, -0.3, 2.2, -1.1], dtype=np.float32)
    return split


def test_the_entropy_term_enters_once_the_memory_is_full_and_reads_the_last_batches(dims):
    """entropy_memory 1: batch 0 fills the memory, batch 1 reads it but adds no term (as MMSA),
    batch 2 adds -beta H over batch 1's projections and its own; a new epoch starts empty."""
    split = _signed_split()
    model = _mmim(dims, audio_out=4, vision_out=4, entropy_memory=1).train()
    model.on_train_epoch_start(1, lambda: iter(()))
    batches = [make_batch(split, np.arange(N)) for _ in range(3)]
    losses = [model(b).losses for b in batches]
    assert [("entropy" in x) for x in losses] == [False, False, True]
    with torch.no_grad():
        h = {"audio": model.audio(batches[0].audio, batches[0].audio_mask),
             "vision": model.vision(batches[0].vision, batches[0].vision_mask)}
    labels = batches[0].labels
    expected = 0.0
    for pair, y in (("tv", "vision"), ("ta", "audio")):
        p = model.bounds[pair].entropy_projection(h[y]).detach()  # width 1: one sample suffices
        both = torch.cat([p, p])  # the memory (batch 1) and batch 2, the same clips (no dropout here)
        both_labels = torch.cat([labels, labels])
        positive, negative = both[both_labels > 0], both[both_labels < 0]
        variances = positive.var(0, unbiased=False), negative.var(0, unbiased=False)
        expected += 0.25 * (torch.log(variances[0]) + torch.log(variances[1])).sum()
    model.eval()
    torch.testing.assert_close(losses[2]["entropy"], -0.1 * expected)
    model.train().on_train_epoch_start(2, lambda: iter(()))
    assert model.memory == [] and "entropy" not in model(batches[0]).losses


def test_the_bound_phase_returns_only_the_negative_lld(dims, batch):
    model = _mmim(dims).train()
    main = model(batch).losses
    model.phase = "bound"
    bound = model(batch).losses
    assert set(main) == {"nce", "lld"} and set(bound) == {"bound"}
    torch.testing.assert_close(bound["bound"], main["lld"] / 0.1)
    assert model.extra_phases()[0].parameters == ("bounds.",)
    assert _mmim(dims, contrast=False).extra_phases() == ()


def test_the_main_optimiser_never_holds_the_bound_estimators(dims):
    model = _mmim(dims, va_bound=True)
    held = {id(p) for group in build_optimizer(model, TrainConfig()).param_groups for p in group["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in held}
    assert names and not any(name.startswith("bounds.") for name in names)
    assert {name for name, p in model.named_parameters() if p.requires_grad} - names == {
        name for name, p in model.named_parameters() if name.startswith("bounds.") and p.requires_grad}


def _trainer(dims, batch_size: int, lr: float, **settings) -> Trainer:
    model = _mmim(dims, **settings)
    config = TrainConfig(epochs=1, batch_size=batch_size, lr=lr, encoder_lr=lr, weight_decay=0.0,
                         device="cpu", patience=None, grad_clip=1.0)
    return Trainer(model, config, "mosi", progress=False)


def test_each_epoch_runs_the_bound_phase_then_the_main_phase(dims, monkeypatch):
    """Three batches of two: the bound phase over the first ceil(0.5 x 3) = 2 (MMSA's MOSEI
    share), then the main phase over all 3; the bound phase steps only the estimators."""
    split = _signed_split()
    trainer = _trainer(dims, batch_size=2, lr=1e-2, bound_share=0.5)
    model = trainer.model
    phases: list[str] = []
    forward = MMIM.forward
    monkeypatch.setattr(MMIM, "forward", lambda self, b: phases.append(self.phase) or forward(self, b))
    optimizer = build_optimizer(model, trainer.config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    phase_optimizers = build_phase_optimizers(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.phase = "bound"
    trainer._train_pass(split, phase_optimizers["bound"], None, torch.Generator().manual_seed(0), 1,
                        [optimizer, *phase_optimizers.values()], share=0.5)
    model.phase = "main"
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("bounds.") and ".entropy_projection." not in k for k in changed)
    phases.clear()
    trainer.train_epoch(split, optimizer, scheduler, torch.Generator().manual_seed(0), epoch=1,
                        phase_optimizers=phase_optimizers)
    assert phases == ["bound", "bound", "main", "main", "main"]
    assert model.phase == "main"


def test_the_phase_optimiser_survives_a_resume(tiny_dataset, tmp_path):
    def trainer() -> Trainer:
        seed_everything(0)
        model = create_model("mmim", TINY, tiny_dataset.dims)
        config = TrainConfig(epochs=2, batch_size=16, lr=3e-3, device="cpu", patience=None)
        return Trainer(model, config, tiny_dataset.metric_family, progress=False)

    assert_resumed_fit_is_the_straight_fit(trainer, tiny_dataset, 0, tmp_path / "state.pt", epochs=1)


def test_fp16_is_refused_in_one_line(dims):
    model = _mmim(dims)
    with pytest.raises(MsakitError, match="fp16"):
        Trainer(model, TrainConfig(device="cpu", precision="fp16"), "mosi", progress=False)


def test_a_batch_of_one_and_zeroed_modalities_stay_finite(dims, batch: Batch):
    model = _mmim(dims).train()
    one = make_batch(contract_split(), np.array([2]))
    assert torch.isfinite(model(one).pred).all()
    zeroed = batch.with_updates(text=torch.zeros_like(batch.text))
    losses = model(zeroed).losses
    assert all(torch.isfinite(v) for v in losses.values())


def test_text_lengths_read_as_many_frames_as_the_text_has_tokens(dims, batch):
    """`rnn_lengths: text` (MMSA on word-aligned data): each clip's audio LSTM reads its first
    n_tokens frames, padded or not, capped at the padded length."""
    model = _mmim(dims, rnn_lengths="text").eval()
    tokens = batch.text_mask.sum(1)
    with torch.no_grad():
        out = model(batch).features["audio"]
        for i, n in enumerate(tokens.tolist()):
            frames = batch.audio[i:i + 1, :n]
            alone = model.audio(frames, torch.ones(frames.shape[:2], dtype=torch.bool))
            torch.testing.assert_close(out[i:i + 1], alone)
    assert not torch.equal(out, _mmim(dims).eval()(batch).features["audio"])


def test_the_packaged_minilm_encodes_the_text(dims, batch):
    """The [CLS] state of the packaged MiniLM (width 384) feeds the fusion, the text-vision and
    text-audio bounds and the text CPC; the bound loss reaches the encoder too (as in MMSA, whose
    bound phase backpropagates into BERT before clearing those gradients)."""
    model = _mmim(dims, text_source="encoder", text_encoder="minilm").train()
    assert model.bounds["tv"].mu[0].in_features == 384 and model.cpc["text"].net.out_features == 384
    out = model(batch)
    (out.pred.pow(2).mean() + sum(out.losses.values())).backward()
    assert all(p.grad is not None for p in model.text_encoder.model.encoder.parameters())


@pytest.mark.parametrize("family", ["mosi", "mosei", "sims", "simsv2", "synthetic"])
def test_yaml_resolves_for_every_family(family):
    resolved = resolve_config("mmim", family)
    build_config("mmim", resolved["model"])
    assert resolved["training"]["loss"] == "l1" and resolved["model"]["contrast"]


def test_yaml_holds_the_published_values():
    """Spot checks against MMSA's config_regression.json (mmim) @a94e65d."""
    mosi, mosei = resolve_config("mmim", "mosi"), resolve_config("mmim", "mosei")
    assert (mosi["model"]["bound_share"], mosei["model"]["bound_share"]) == (1.0, 0.5)
    assert mosi["model"]["fusion_hidden"] == 128 and mosi["model"]["audio_out"] == 16
    assert (mosi["model"]["nce_weight"], mosi["model"]["mi_weight"]) == (0.1, 0.1)
    training = mosi["training"]
    assert (training["lr"], training["encoder_lr"], training["batch_size"], training["grad_clip"]) == (
        1e-3, 5e-5, 32, 1.0)
