"""MIDG (models/midg.py), beyond the model contract (tests/contract): the invariance objective is
zero exactly when per-domain risks are equal and matches an independent reference, the gate's
weights sum to one (dense and top-k), the prediction is the gate-weighted mean of the experts'
predictions, the adapters inject the other modalities and ignore absent ones, gradients reach every
parameter, a short multi-domain run reduces the loss and a strong invariance weight evens out the
per-domain risks, settings are checked."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from model_inputs import N
from msakit.data.batching import iterate_batches, make_batch
from msakit.errors import MsakitError
from msakit.missing import MissingSpec, apply_missing, drop_whole_modalities
from msakit.models import create_model
from msakit.models.midg import MIDG, domain_risk_variance, gate_balance
from msakit.models.registry import build_config
from msakit.training.config import resolve_config
from msakit.training.settings import TrainConfig
from msakit.training.trainer import Trainer, seed_everything

TINY = {"text_source": "features", "hidden": 8, "heads": 2, "adapter_dim": 4, "adapter_heads": 2,
        "num_experts": 3, "expert_hidden": 8, "embed_dropout": 0.0, "dropout": 0.0}
DOMAINS = torch.tensor([0, 1, 0, 2, 1, 2])


def _model(dims, seed: int = 0, **settings) -> MIDG:
    torch.manual_seed(seed)
    return create_model("midg", {**TINY, **settings}, dims)


def _reference_variance(losses: np.ndarray, domains: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Per column: population variance over domains of the weighted mean risk (loops, numpy)."""
    weights = np.ones_like(losses) if weights is None else weights
    out = []
    for c in range(losses.shape[1]):
        risks = []
        for e in np.unique(domains):
            w, loss = weights[domains == e, c], losses[domains == e, c]
            if w.sum() > 0:
                risks.append((w * loss).sum() / w.sum())
        out.append(np.var(risks) if len(risks) >= 2 else 0.0)
    return np.array(out)


# the invariance objective ----------------------------------------------------------------------

def test_risk_variance_is_zero_for_equal_domain_risks_and_positive_otherwise():
    domains = torch.tensor([0, 0, 1, 1, 1, 2])
    # different samples, equal per-domain means (1.0 each)
    equal = torch.tensor([[0.5], [1.5], [0.0], [1.0], [2.0], [1.0]])
    assert domain_risk_variance(equal, domains).item() == pytest.approx(0.0, abs=1e-7)
    unequal = equal.clone()
    unequal[5] = 1.3
    variance = domain_risk_variance(unequal, domains).item()
    assert variance > 0
    assert variance == pytest.approx(np.var([1.0, 1.0, 1.3]))
    # one domain, or a batch whose samples all share a domain: nothing to compare
    assert domain_risk_variance(unequal, torch.zeros(6, dtype=torch.long)).item() == 0.0


@pytest.mark.parametrize("weighted", [False, True])
def test_risk_variance_matches_a_reference_on_random_inputs(weighted):
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        losses = torch.rand(40, 3, generator=generator, dtype=torch.float64)
        domains = torch.randint(0, 4, (40,), generator=generator) * 7  # ids need not be 0..E-1
        weights = None
        if weighted:
            weights = torch.rand(40, 3, generator=generator, dtype=torch.float64)
            weights[domains == 0, 1] = 0.0  # domain 0 never routed to expert 1: no risk there
        expected = _reference_variance(losses.numpy(), domains.numpy(),
                                       None if weights is None else weights.numpy())
        np.testing.assert_allclose(domain_risk_variance(losses, domains, weights).numpy(), expected,
                                   rtol=1e-10, atol=1e-12)


def test_a_column_with_one_routed_domain_has_no_variance():
    losses = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    weights = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    variance = domain_risk_variance(losses, torch.tensor([0, 1]), weights)
    assert variance[0] == pytest.approx(1.0) and variance[1] == 0.0


def test_the_model_penalty_is_the_weighted_variance_of_routed_expert_risks(dims, batch):
    model = _model(dims, invariance_weight=2.5).train()
    with_domains = batch.with_updates(domains=DOMAINS)
    out = model(with_domains)
    expert_losses = (out.features["experts"] - batch.labels.unsqueeze(1)).abs()
    expected = domain_risk_variance(expert_losses, DOMAINS, out.features["gate"]).mean()
    torch.testing.assert_close(out.losses["invariance"], 2.5 * expected)
    assert out.losses["invariance"] > 0
    mixture = _model(dims, invariance="mixture", risk="mse").train()(with_domains)
    squared = (mixture.pred - batch.labels).pow(2).unsqueeze(1)
    torch.testing.assert_close(mixture.losses["invariance"], domain_risk_variance(squared, DOMAINS)[0])


def test_no_domains_or_one_domain_means_no_invariance_term(dims, batch):
    model = _model(dims).train()
    assert batch.domains is None and model(batch).losses["invariance"] == 0
    one = batch.with_updates(domains=torch.full((N,), 3))
    assert model(one).losses["invariance"] == 0


def test_the_invariance_term_waits_for_its_warmup(dims, batch):
    model = _model(dims, invariance_warmup=2).train()
    with_domains = batch.with_updates(domains=DOMAINS)
    seen = []
    for epoch in range(1, 5):
        model.on_train_epoch_start(epoch, lambda: iter([]))
        seen.append(model(with_domains).losses["invariance"].item())
    assert seen[0] == seen[1] == 0 and seen[2] > 0 and seen[3] > 0


def test_the_invariance_gradient_leaves_the_gate_alone(dims, batch):
    """Routing weights are detached inside the penalty: the gate cannot hide an expert's errors."""
    model = _model(dims, balance_weight=0.0).train()
    model(batch.with_updates(domains=DOMAINS)).losses["invariance"].backward()
    assert model.mixture.gate.weight.grad is None or model.mixture.gate.weight.grad.abs().sum() == 0
    assert model.mixture.experts[0][0].weight.grad.abs().sum() > 0


# the gate and the experts ---------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_gate_weights_sum_to_one(dims, batch, top_k):
    model = _model(dims, top_k=top_k).eval()
    with torch.no_grad():
        out = model(batch)
    gates = out.features["gate"]
    assert gates.shape == (N, 3) and (gates >= 0).all()
    torch.testing.assert_close(gates.sum(dim=1), torch.ones(N))
    assert ((gates > 0).sum(dim=1) == (top_k or 3)).all()
    # the linear head makes the prediction the gate-weighted mean of the experts' predictions
    torch.testing.assert_close(out.pred, (gates * out.features["experts"]).sum(dim=1))


def test_experts_read_the_modalities_and_their_pairwise_products(dims, batch):
    model = _model(dims).eval()
    seen = []
    model.mixture.experts[1].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    with torch.no_grad():
        out = model(batch)
    t, a, v = out.features["unimodal"].split(TINY["hidden"], dim=1)
    torch.testing.assert_close(seen[0], torch.cat([t, a, v, t * a, t * v, a * v], dim=1))


def test_gate_balance_is_zero_for_even_use_and_grows_with_collapse():
    even = torch.tensor([[0.5, 0.25, 0.25], [0.0, 0.5, 0.5], [0.5, 0.25, 0.25]])
    assert gate_balance(even).item() == pytest.approx(0.0, abs=1e-6)
    collapsed = torch.tensor([[1.0, 0.0, 0.0]] * 4)
    assert gate_balance(collapsed).item() == pytest.approx(2.0)
    assert 0 < gate_balance(torch.tensor([[0.6, 0.2, 0.2]] * 4)).item() < 2.0


# the cross-modal adapter and the inputs -------------------------------------------------------

def test_the_adapter_injects_the_other_modalities(dims, batch):
    """Text's pooled representation changes with the audio; with audio and vision absent it is the
    plain masked mean of the encoded text (nothing to inject)."""
    model = _model(dims).eval()
    d = TINY["hidden"]
    other_audio = batch.with_updates(audio=batch.audio + 1.0)
    with torch.no_grad():
        text = model(batch).features["unimodal"][:, :d]
        assert not torch.allclose(model(other_audio).features["unimodal"][:, :d], text)
        text_only = apply_missing(batch, MissingSpec("fixed", subset="t"))
        tokens, masks = model.encode(text_only)
        plain = (tokens["text"] * masks["text"].unsqueeze(-1)).sum(1) / masks["text"].sum(1, keepdim=True)
        torch.testing.assert_close(model(text_only).features["unimodal"][:, :d], plain)


def test_an_absent_modality_is_ignored_whatever_it_holds(dims, batch):
    model = _model(dims).eval()
    no_audio = apply_missing(batch, MissingSpec("fixed", subset="tv"))
    scrambled = no_audio.with_updates(audio=torch.randn_like(batch.audio))
    with torch.no_grad():
        kept = model(no_audio).pred
        torch.testing.assert_close(model(scrambled).pred, kept)
        assert not torch.allclose(kept, model(batch).pred)


def test_shapes_and_gradients_reach_every_parameter(dims, batch):
    model = _model(dims).train()  # dense gate: with top_k an unchosen expert rightly gets nothing
    keep = torch.ones(N, 3, dtype=torch.bool)
    keep[0, 1] = keep[1, 2] = keep[2, 0] = keep[3, 1] = keep[3, 2] = False  # sample 3: text only
    out = model(drop_whole_modalities(batch, keep).with_updates(domains=DOMAINS))
    assert out.pred.shape == (N,) and out.features["fused"].shape == (N, 8)
    assert set(out.losses) == {"invariance", "balance"}
    (out.pred.abs().mean() + sum(out.losses.values())).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"zero gradient for {name}"
    with torch.no_grad():
        assert model.eval()(batch).losses == {}


# training ---------------------------------------------------------------------------------------

def _two_domains(dataset, noise: float):
    """The tiny training split as two alternating domains; domain 1's labels carry extra noise of
    std `noise`, the label function is otherwise shared."""
    train = dataset.train
    domains = (np.arange(len(train)) % 2).astype(np.int64)
    rng = np.random.default_rng(0)
    labels = train.labels + (domains == 1) * rng.normal(0, noise, len(train)).astype(np.float32)
    return dataclasses.replace(train, domains=domains, labels=labels.astype(np.float32))


def test_short_multi_domain_training_reduces_the_loss(tiny_dataset):
    seed_everything(0)
    model = create_model("midg", {**TINY, "hidden": 16, "adapter_dim": 8}, tiny_dataset.dims)
    config = TrainConfig(epochs=8, batch_size=16, lr=3e-3, loss="l1", device="cpu", patience=None)
    trainer = Trainer(model, config, tiny_dataset.metric_family, progress=False)
    fit = trainer.fit(_two_domains(tiny_dataset, 0.5), tiny_dataset.valid, seed=0)
    losses = [record.train_loss for record in fit.history]
    assert model.epoch == 8  # the trainer's epoch hook reached the model
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2])


def test_a_strong_invariance_weight_evens_out_the_domain_risks(tiny_dataset):
    """Label noise on one domain makes its risk larger; V-REx on the prediction narrows the gap
    between the two domains' training risks (measured: 0.307 without, 0.105 with weight 10)."""
    train = _two_domains(tiny_dataset, 2.0)
    whole = make_batch(train, np.arange(len(train)))

    def gap(weight: float) -> float:
        # a plain loop: the trainer would restore the epoch with the best validation MAE
        torch.manual_seed(0)
        model = create_model("midg", {**TINY, "hidden": 16, "adapter_dim": 8, "invariance": "mixture",
                                      "invariance_weight": weight}, tiny_dataset.dims)
        optimizer = torch.optim.AdamW(model.parameters(), 3e-3)
        generator = torch.Generator().manual_seed(0)
        for _ in range(20):
            for batch in iterate_batches(train, 24, shuffle=True, generator=generator):
                out = model.train()(batch)
                loss = (out.pred - batch.labels).abs().mean() + sum(out.losses.values())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            error = (model.eval()(whole).pred - whole.labels).abs()
        return abs(error[whole.domains == 1].mean() - error[whole.domains == 0].mean()).item()

    assert gap(10.0) < 0.5 * gap(0.0)


# settings ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["mosi", "mosei", "sims", "synthetic"])
def test_yaml_resolves_for_every_dataset(family, dims, batch):
    resolved = resolve_config("midg", family)
    config = build_config("midg", resolved["model"])
    assert config.invariance == "experts" and resolved["training"]["loss"] == "l1"
    if family == "synthetic":
        assert config.text_source == "features" and config.hidden == 32
        model = create_model("midg", resolved["model"], dims).eval()
        with torch.no_grad():
            assert torch.isfinite(model(batch).pred).all()
    else:
        assert config.text_source == "encoder" and config.finetune_text


@pytest.mark.parametrize(
    ("settings", "key"),
    [({"hidden": 10, "heads": 4}, "heads"), ({"adapter_dim": 6, "adapter_heads": 4}, "adapter_heads"),
     ({"top_k": 0}, "top_k"), ({"top_k": 5, "num_experts": 4}, "top_k"),
     ({"invariance": "irm"}, "invariance"), ({"risk": "huber"}, "risk"),
     ({"invariance_weight": -1}, "invariance_weight"), ({"balance_weight": "x"}, "balance_weight"),
     ({"invariance_warmup": -1}, "invariance_warmup"), ({"num_experts": 0}, "num_experts"),
     ({"dropout": 1.0}, "dropout")],
)
def test_bad_settings_are_user_errors(settings, key):
    with pytest.raises(MsakitError, match=key):
        build_config("midg", settings)
