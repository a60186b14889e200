"""LNLN (models/lnln.py): every branch trains, the clean-input targets are right, the gradient
reversal reverses, the speed-ups change nothing, and a short noisy training run learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model_inputs import N
from msakit.data.batching import make_batch
from msakit.data.schema import Batch
from msakit.errors import MsakitError
from msakit.missing import LNLNNoise, MissingSpec, apply_missing, build_noise
from msakit.models import create_model
from msakit.models.layers.prenorm import TokenTransformer
from msakit.models.lnln import LNLN, reverse_gradient, widths_of
from msakit.models.registry import build_config
from msakit.training.config import resolve_config
from msakit.training.settings import TrainConfig
from msakit.training.trainer import Trainer, seed_everything

TINY = {"hidden_dim": 8, "num_tokens": 2, "heads": 2, "dim_head": 4, "mlp_dim": 8,
        "embed_depth": 1, "checker_depth": 1, "proxy_depth": 1, "reconstructor_depth": 1,
        "language_depth": 1, "fusion_depth": 1, "discriminator_hidden": 4, "checker_hidden": 4}


def _lnln(dims, seed: int = 0, **settings) -> LNLN:
    torch.manual_seed(seed)
    return create_model("lnln", {"text_source": "features", **TINY, **settings}, dims)


def _noisy(batch: Batch, epoch: int = 1) -> Batch:
    """A training batch as the trainer builds it: LNLN's noise, the clean batch attached."""
    return LNLNNoise(seed=3)(batch, epoch).with_updates(clean=batch)


def _total(out) -> torch.Tensor:
    return out.pred.pow(2).mean() + sum(out.losses.values())


@pytest.mark.parametrize("reversal", ["proxy", "discriminator"])
def test_every_branch_gets_a_gradient(dims, batch, reversal):
    model = _lnln(dims, gradient_reversal=reversal).train()
    out = model(_noisy(batch))
    assert out.pred.shape == (N,)
    assert set(out.losses) == {"completeness", "adversarial", "reconstruction"}
    assert out.features["completeness"].shape == (N,)
    assert out.features["fused"].shape == (N, 8)
    assert all(torch.isfinite(v) and v > 0 for v in out.losses.values())
    _total(out).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(param.grad).all(), name
        # the learned H0_hyper starts as ones (official init), a row LayerNorm maps to zeros
        if name != "hyper.0.norm_hyper.weight":
            assert param.grad.abs().sum() > 0, f"zero gradient for {name}"


def test_evaluation_needs_no_clean_batch_and_returns_no_losses(dims, batch):
    model = _lnln(dims)
    model.train()
    assert model(batch).losses == {}  # no clean batch: nothing to compare with
    model.eval()
    with torch.no_grad():
        out = model(_noisy(batch))
    assert out.losses == {}


def test_a_one_sample_batch_keeps_its_batch_dimension(dims, split):
    model = _lnln(dims).train()
    out = model(_noisy(make_batch(split, np.array([2]))))
    assert out.pred.shape == (1,)
    assert out.features["completeness"].shape == (1,)
    _total(out).backward()


def test_completeness_target_is_the_kept_fraction_of_droppable_tokens(dims, batch):
    model = _lnln(dims)
    torch.testing.assert_close(model.text_completeness(batch), torch.ones(N))
    # sample i keeps [CLS] at 0 and [SEP] at length - 1; drop chosen real tokens by hand
    lengths = batch.text_mask.sum(1)
    dropped = torch.zeros_like(batch.text_mask)
    dropped[0, 1:4] = True  # 3 of the 6 real tokens of a length-8 sample
    dropped[1, 1] = True  # 1 of 3
    dropped[3, 1:5] = True  # 4 of 4
    hand_made = batch.with_updates(dropped={"text": dropped}, clean=batch)
    expected = torch.ones(N)
    expected[0], expected[1], expected[3] = 1 - 3 / 6, 1 - 1 / 3, 0.0
    assert lengths.tolist()[:4] == [8, 5, 3, 6]
    torch.testing.assert_close(model.text_completeness(hand_made), expected)
    # a sample with no droppable token ([CLS] [SEP] only) counts as complete
    assert model.text_completeness(hand_made)[5] == 1.0


def test_completeness_target_follows_the_protocols(dims, batch):
    model = _lnln(dims)
    whole = apply_missing(batch, MissingSpec("fixed", subset="av")).with_updates(clean=batch)
    torch.testing.assert_close(model.text_completeness(whole), torch.zeros(N))
    at_half = apply_missing(batch, MissingSpec("intra", rate=0.5, seed=4)).with_updates(clean=batch)
    droppable = (batch.text_mask.sum(1) - 2).clamp(min=1).float()  # minus [CLS] and [SEP]
    kept = 1 - at_half.dropped["text"].sum(1).float() / droppable
    torch.testing.assert_close(model.text_completeness(at_half), kept)


def test_gradient_reversal_multiplies_the_gradient_by_minus_strength():
    x = torch.randn(4, 3, requires_grad=True)
    weights = torch.randn(4, 3)
    (reverse_gradient(x, 0.5) * weights).sum().backward()
    torch.testing.assert_close(x.grad, -0.5 * weights)
    torch.testing.assert_close(reverse_gradient(x, 0.5), x)


def test_proxy_reversal_flips_the_sentiment_gradient_into_the_proxy_generator(dims, batch):
    """The official placement (on H1_p) reverses every downstream loss reaching the generator;
    with the reversal in front of the discriminator the sentiment loss reaches it unchanged."""
    grads = {}
    for place in ("proxy", "discriminator"):
        model = _lnln(dims, seed=5, gradient_reversal=place).eval()
        model(batch).pred.sum().backward()
        grads[place] = torch.cat([p.grad.flatten() for p in model.proxy.parameters()])
    assert grads["proxy"].abs().sum() > 0
    torch.testing.assert_close(grads["proxy"], -grads["discriminator"])


def test_discriminator_reversal_flips_the_adversarial_gradient_into_the_embedding(dims, batch):
    grads = {}
    noisy = _noisy(batch)
    for place in ("proxy", "discriminator"):
        model = _lnln(dims, seed=5, gradient_reversal=place).train()
        model(noisy).losses["adversarial"].backward()
        grads[place] = {
            "discriminator": torch.cat([p.grad.flatten() for p in model.discriminator.parameters()]),
            "audio": torch.cat([p.grad.flatten() for p in model.project["audio"].parameters()]),
            "text": torch.cat([p.grad.flatten() for p in model.project["text"].parameters()]),
        }
    # the discriminator itself always descends its loss; what feeds it ascends it only when the
    # reversal sits in front of it (audio reaches D only through the proxy, reversed either way)
    torch.testing.assert_close(grads["proxy"]["discriminator"], grads["discriminator"]["discriminator"])
    torch.testing.assert_close(grads["proxy"]["audio"], grads["discriminator"]["audio"])
    assert grads["proxy"]["text"].abs().sum() > 0
    torch.testing.assert_close(grads["proxy"]["text"], -grads["discriminator"]["text"])


def test_keeping_only_the_first_positions_of_the_last_block_changes_nothing(dims):
    config = build_config("lnln", {"text_source": "features", **TINY, "embed_depth": 2})
    torch.manual_seed(0)
    encoder = TokenTransformer(10, 3, 2, **widths_of(config))
    x, mask = torch.randn(4, 10, 8), torch.rand(4, 10) > 0.3
    full = encoder(x, mask)[-1][:, :3]
    torch.testing.assert_close(encoder(x, mask, keep=3)[-1], full)


def test_clean_tokens_reuse_only_samples_that_lost_nothing(dims, batch):
    model = _lnln(dims).eval()
    spec = MissingSpec("intra", rate=0.6, seed=1)
    noisy = apply_missing(batch, spec).with_updates(clean=batch)
    keep_audio = noisy.dropped["audio"].clone()
    keep_audio[[1, 4]] = False  # two samples whose audio came through untouched
    noisy = noisy.with_updates(
        audio=torch.where(keep_audio.unsqueeze(-1), 0.0, batch.audio),
        dropped={**noisy.dropped, "audio": keep_audio},
    )
    with torch.no_grad():
        fast = model.clean_tokens(noisy, model.embed_tokens(noisy))
        slow = model.embed_tokens(batch)
    for modality in ("text", "audio", "vision"):
        torch.testing.assert_close(fast[modality], slow[modality])


def test_a_longer_valid_sequence_than_built_for_is_a_user_error(dims, batch):
    model = _lnln(dims).eval()
    audio = torch.cat([batch.audio, batch.audio], dim=1)
    mask = torch.ones(audio.shape[:2], dtype=torch.bool)
    with pytest.raises(MsakitError, match="longer"):
        model(batch.with_updates(audio=audio, audio_mask=mask))


def test_short_noisy_training_reduces_the_loss(tiny_dataset):
    seed_everything(0)
    model = create_model("lnln", {"text_source": "features", **TINY, "hidden_dim": 16},
                         tiny_dataset.dims)
    config = TrainConfig(epochs=12, batch_size=16, lr=3e-3, loss="mse", device="cpu", patience=None)
    noise = build_noise("lnln", 0.0, seed=0)
    trainer = Trainer(model, config, tiny_dataset.metric_family, train_transform=noise, progress=False)
    fit = trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=0)
    losses = [record.train_loss for record in fit.history]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2])


@pytest.mark.parametrize("family", ["mosi", "mosei", "sims", "simsv2", "synthetic"])
def test_yaml_resolves_for_every_family(family):
    resolved = resolve_config("lnln", family)
    config = build_config("lnln", resolved["model"])
    assert resolved["training"]["loss"] == "mse"
    assert resolved["training"]["noise"] == "lnln"
    assert config.hidden_dim == 128 and config.num_tokens == 8


def test_yaml_holds_the_published_values():
    """Spot checks against Haoyu-ha/LNLN configs/train_{mosi,mosei,sims}.yaml."""
    mosi, mosei, sims = (resolve_config("lnln", f) for f in ("mosi", "mosei", "sims"))
    assert [c["model"]["fusion_depth"] for c in (mosi, mosei, sims)] == [2, 4, 4]
    assert [c["model"]["adversarial_weight"] for c in (mosi, mosei, sims)] == [0.8, 0.8, 0.6]
    assert (mosi["model"]["completeness_weight"], mosi["model"]["reconstruction_weight"]) == (0.9, 0.1)
    training = mosi["training"]
    assert (training["lr"], training["weight_decay"], training["batch_size"]) == (1e-4, 1e-4, 64)
    assert (training["epochs"], training["warmup_ratio"], training["schedule"]) == (200, 0.1, "cosine")


@pytest.mark.parametrize(
    ("settings", "key"),
    [({"gradient_reversal": "head"}, "gradient_reversal"),
     ({"hidden_dim": 10, "heads": 4}, "heads"),
     ({"adversarial_weight": -1.0}, "adversarial_weight"),
     ({"num_tokens": 0}, "num_tokens")],
)
def test_bad_settings_are_user_errors(settings, key):
    with pytest.raises(MsakitError, match=key):
        build_config("lnln", settings)


