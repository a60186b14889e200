"""HME (models/hme.py): retrieval never returns the query or an absent modality, the uncertainty gate
favours the original representation when the enhanced one is uncertain, a single sample with a
missing modality is predicted from the memory bank (also after a checkpoint round trip), gradients
reach every branch, a short run under inter-modal training noise learns, settings are checked."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model_inputs import N, contract_split
from msakit.data.batching import iterate_batches, make_batch
from msakit.errors import MsakitError
from msakit.missing import MissingSpec, apply_missing, build_noise, drop_whole_modalities
from msakit.models import create_model
from msakit.models.hme import HME, UncertaintyGate, id_hashes, retrieve
from msakit.models.layers.transformer import sinusoidal_positions
from msakit.models.registry import build_config
from msakit.training.checkpoint import load_checkpoint, save_checkpoint
from msakit.training.config import resolve_config
from msakit.training.settings import TrainConfig
from msakit.training.trainer import Trainer, seed_everything
from resume_check import assert_resumed_fit_is_the_straight_fit

TINY = {"text_source": "features", "hidden": 8, "heads": 2, "encoder_layers": 1, "num_latents": 3,
        "latent_layers": 1, "hyper_depth": 1, "fusion_ffn": 8, "attn_dropout": 0.0, "relu_dropout": 0.0,
        "res_dropout": 0.0, "embed_dropout": 0.0, "gate_dropout": 0.0, "dropout": 0.0}

# a cross-attention over ONE context vector ignores its query (softmax over one key is 1): the
# official architecture has four such stacks per modality; nothing else may go without a gradient
SILENT = re.compile(
    r"(enhancers\.\w+\.cross|pair_hyper\.\w+\.blocks)\.\d+\.(norm\.weight|norm\.bias|attn\.to_q\.weight)"
)


def _model(dims, seed: int = 0, **settings) -> HME:
    torch.manual_seed(seed)
    return create_model("hme", {**TINY, **settings}, dims)


def _banked(dims, split, **settings) -> HME:
    """A model whose memory bank covers `split`, as after the trainer's epoch hook."""
    model = _model(dims, **settings)
    model.on_train_epoch_start(1, lambda: iter([make_batch(split, np.arange(N))]))
    return model


# encoders ----------------------------------------------------------------------------------------

def _encoder_reference(model: HME, batch, keys_from_input: bool) -> torch.Tensor:
    """H (B, 3, d) written out: X_{i+1} = X_i + Attn(LN(X_i), LN(K), LN(K)) + FFN, K = X_0 (the
    official `l2l(x, x, x)`: keys and values are the embedded input) or K = X_i (self-attention)."""
    pooled = []
    for column, m in enumerate(("text", "audio", "vision")):
        x, mask = getattr(batch, m), getattr(batch, f"{m}_mask")
        x = x.masked_fill(~(mask & batch.presence[:, column].unsqueeze(1)).unsqueeze(-1), 0.0)
        encoder = model.encoders[m]
        x0 = state = encoder._embed(model.project[m](x), mask)
        for layer in encoder.layers:
            keys = layer.attn_norm(x0 if keys_from_input else state)
            h, _ = layer.attn(layer.attn_norm(state), keys, keys, key_padding_mask=~mask, need_weights=False)
            state = state + h
            state = state + layer.fc2(F.relu(layer.fc1(layer.ffn_norm(state))))
        out = encoder.norm(state).masked_fill(~mask.unsqueeze(-1), float("-inf"))
        pooled.append(out.amax(dim=1))
    return torch.stack(pooled, dim=1)


@pytest.mark.parametrize("attention", ["input", "self"])
def test_each_encoder_layer_reads_the_embedded_input_as_keys_and_values(dims, batch, attention):
    """The default (`input`) is the official rule; a true self-attention encoder fails it."""
    model = _model(dims, encoder_layers=3, encoder_attention=attention).eval()
    dropped = apply_missing(batch, MissingSpec("inter", rate=0.4, seed=0))
    with torch.no_grad():
        h, _ = model.encode(dropped)
        official = _encoder_reference(model, dropped, keys_from_input=True)
        self_attention = _encoder_reference(model, dropped, keys_from_input=False)
    assert not torch.allclose(official, self_attention, atol=1e-3)
    torch.testing.assert_close(h, official if attention == "input" else self_attention)
    assert build_config("hme", {}).encoder_attention == "input"


def test_official_positions_skip_a_missing_modalitys_zero_steps(dims, batch):
    """Positions are numbered from 1; with position_zero_steps false a zeroed (missing) modality
    gets none, so every sample missing it has the very same all-zero embedded input."""
    no_audio = apply_missing(batch, MissingSpec("fixed", subset="tv"))
    for zero_steps, expect_zero in ((True, False), (False, True)):
        model = _model(dims, position_zero_steps=zero_steps).eval()
        encoder, mask = model.encoders["audio"], no_audio.audio_mask
        with torch.no_grad():
            embedded = encoder._embed(model.project["audio"](torch.zeros_like(no_audio.audio)), mask)
        assert bool((embedded == 0).all()) == expect_zero
    with torch.no_grad():
        steps = torch.ones(1, 2, dtype=torch.bool)
        first = _model(dims).encoders["audio"]._embed(torch.zeros(1, 2, 8), steps)
    torch.testing.assert_close(first[0, 0], sinusoidal_positions(2, 8)[1])


# retrieval ---------------------------------------------------------------------------------------

def _keys():
    """Query q; keys: q itself (same id), an absent copy of q, two near copies, one opposite."""
    q = torch.tensor([[1.0, 0.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.8, 0.0, 0.3],
                         [-1.0, 0.2, 0.0]])
    key_ids = id_hashes(["q", "absent", "near1", "near2", "far"])
    present = torch.tensor([True, False, True, True, True])
    return q, id_hashes(["q"]), keys, key_ids, present


@pytest.mark.parametrize("k", [None, 1, 2, 5])
def test_retrieval_skips_the_query_itself_and_absent_samples(k):
    q, q_id, keys, key_ids, present = _keys()
    means, counts = retrieve(q, q_id, torch.tensor([True]), keys, key_ids, present, 0.6, k)
    # the two identical keys (the query itself, an absent sample) are the most similar, yet excluded
    expected = keys[2:4].mean(0) if k != 1 else keys[2]
    torch.testing.assert_close(means[0], expected)
    assert counts.item() == min(2, k or 2)


def test_retrieval_falls_back_to_the_mean_of_the_other_present_samples():
    q, q_id, keys, key_ids, present = _keys()
    others = keys[[2, 3, 4]].mean(0)  # present and not the query
    for threshold, query_present in ((0.999, True), (0.6, False)):
        means, counts = retrieve(q, q_id, torch.tensor([query_present]), keys, key_ids, present,
                                 threshold, None)
        assert counts.item() == 0
        torch.testing.assert_close(means[0], others)


def test_the_official_fallback_averages_every_nonzero_key():
    q, q_id, keys, key_ids, present = _keys()
    keys = torch.cat([keys, torch.zeros(1, 3)])
    key_ids, present = torch.cat([key_ids, id_hashes(["zero"])]), torch.cat([present, torch.tensor([True])])
    means, counts = retrieve(q, q_id, torch.tensor([True]), keys, key_ids, present, 0.999, None,
                             fallback_all=True)
    assert counts.item() == 0
    # the query itself and the absent one included, the zero vector not
    torch.testing.assert_close(means[0], keys[:5].mean(0))


def test_retrieve_missing_makes_a_missing_query_retrieve_like_any_other(dims, split, batch):
    """Official rule: the samples missing audio (all of one length) share one encoding and
    retrieve each other; msakit's rule gives a missing query the fallback mean."""
    no_audio = apply_missing(batch, MissingSpec("fixed", subset="tv"))
    no_audio = no_audio.with_updates(audio_mask=torch.ones_like(no_audio.audio_mask))
    settings = {"retrieval": "batch", "retrieval_k": None, "similarity_threshold": 0.99}
    with torch.no_grad():
        for official in (False, True):
            model = _model(dims, retrieve_missing=official, **settings).eval()
            h, present = model.encode(no_audio)
            c = model.retrieved(h, present, no_audio.ids)
            others = h[1:, 1].mean(0)  # every other sample's (identical) audio encoding
            assert torch.allclose(c[0, 1], others, atol=1e-5) == official


def test_the_official_gate_multiplies_the_enhanced_logit():
    torch.manual_seed(0)
    gate = UncertaintyGate(8, lower=0.2, upper=1.0, dropout=0.0, rule="multiply")
    original, enhanced, sigma = torch.randn(16, 8), torch.randn(16, 8), torch.full((16, 8), 2.0)
    logits = gate.mlp(torch.cat([original, enhanced], dim=-1))
    expected = (logits * torch.tensor([1.0, 0.5]) / 8**0.5).softmax(dim=1)
    torch.testing.assert_close(gate.weights(original, enhanced, sigma), expected)


def test_sample_at_eval_makes_the_bottleneck_sample_in_evaluation(dims, split, batch):
    model = _banked(dims, split, sample_at_eval=True).eval()
    with torch.no_grad():
        assert not torch.allclose(model(batch).pred, model(batch).pred)


def test_retrieval_in_blocks_matches_one_block():
    torch.manual_seed(0)
    queries, keys = torch.randn(37, 6), torch.randn(50, 6)
    q_ids, k_ids = id_hashes([str(i) for i in range(37)]), id_hashes([str(i) for i in range(50)])
    q_ok, k_ok = torch.rand(37) > 0.2, torch.rand(50) > 0.3
    for k in (None, 4):
        whole = retrieve(queries, q_ids, q_ok, keys, k_ids, k_ok, 0.1, k, block_size=64)
        blocked = retrieve(queries, q_ids, q_ok, keys, k_ids, k_ok, 0.1, k, block_size=8)
        torch.testing.assert_close(blocked, whole)


def test_the_bank_never_gives_a_training_sample_itself(dims, split, batch):
    """Nearest bank neighbour (k=1, any similarity) of each sample of the bank's own split: never
    the sample itself, never a sample whose modality the bank marks absent, else the most similar."""
    model = _model(dims, retrieval_k=1, similarity_threshold=-1.0).eval()
    keep = torch.ones(N, 3, dtype=torch.bool)
    keep[1, 1] = keep[4, 2] = keep[0, 0] = False
    thinned = drop_whole_modalities(batch, keep)
    model.on_train_epoch_start(1, lambda: iter([thinned]))
    assert model.bank.shape == (3, N, 8) and model.bank_present.tolist() == keep.T.tolist()
    with torch.no_grad():
        h, present = model.encode(batch)
        c = model.retrieved(h, present, batch.ids)
    for m in range(3):
        bank = model.bank[m]
        similarity = F.normalize(h[:, m], dim=1) @ F.normalize(bank, dim=1).T
        for i in range(N):
            allowed = [j for j in range(N) if j != i and keep[j, m]]
            best = max(allowed, key=lambda j: similarity[i, j].item())
            torch.testing.assert_close(c[i, m], bank[best])


# the uncertainty-aware gate ----------------------------------------------------------------------

def test_higher_uncertainty_moves_the_mix_towards_the_original():
    torch.manual_seed(0)
    gate = UncertaintyGate(8, lower=0.2, upper=1.0, dropout=0.0)
    original, enhanced = torch.randn(64, 8), torch.randn(64, 8)
    weights = [gate.weights(original, enhanced, torch.full((64, 8), s))[:, 0]
               for s in (0.01, 1.0, 2.0, 4.0, 50.0)]
    # sigma <= 1: w is clamped at the upper bound 1; beyond, w = 1 / sigma until the lower bound 0.2
    torch.testing.assert_close(weights[0], weights[1])
    assert (weights[2] > weights[1]).all() and (weights[3] > weights[2]).all()
    torch.testing.assert_close(weights[4], gate.weights(original, enhanced, torch.full((64, 8), 5.0))[:, 0])
    # every sample, whatever the sign of its logits, moves the same way (the official rule does not)
    logits = gate.mlp(torch.cat([original, enhanced], dim=-1))
    assert (logits[:, 1] < 0).any() and (logits[:, 1] > 0).any()
    fused = gate(original, enhanced, torch.full((64, 8), 50.0))
    a = weights[4].unsqueeze(1)
    torch.testing.assert_close(fused, a * original + (1 - a) * enhanced)


def test_uncertainty_reaches_the_model_fusion(dims, split, batch):
    """Inflating the bottleneck's sigma inside the model raises every original-representation weight."""
    model = _banked(dims, split).eval()
    seen: list[torch.Tensor] = []
    gate = model.gates["audio"]
    weights = gate.weights
    gate.weights = lambda *args: seen.append(weights(*args)) or seen[-1]  # record the mix
    with torch.no_grad():
        model(batch)
        encode = model.bottlenecks["audio"].encode
        last = encode[-1]
        last.bias[8:] += 20.0  # s - 5 >> 0: sigma = softplus(s - 5) far above 1
        model(batch)
    assert (seen[1][:, 0] > seen[0][:, 0]).all()


# inference on its own ---------------------------------------------------------------------------

def test_one_sample_with_a_missing_modality_is_predicted_from_the_bank(dims, split, batch, tmp_path):
    model = _banked(dims, split).eval()
    test = contract_split(seed=1)
    test.ids[:] = [f"test-{i}" for i in range(N)]  # other samples than the bank's
    only_text = apply_missing(make_batch(test, np.arange(N)), MissingSpec("fixed", subset="t"))
    single = apply_missing(make_batch(test, np.array([2])), MissingSpec("fixed", subset="t"))
    with torch.no_grad():
        one = model(single).pred
        many = model(only_text).pred
    assert one.shape == (1,) and torch.isfinite(one).all()
    # retrieval from the bank does not depend on which samples share the batch
    torch.testing.assert_close(one, many[2:3])
    save_checkpoint(tmp_path / "hme.pt", model, training={}, dataset={})
    loaded, meta = load_checkpoint(tmp_path / "hme.pt")
    assert meta["model_name"] == "hme" and loaded.config == model.config
    torch.testing.assert_close(loaded.bank, model.bank)
    assert torch.equal(loaded.bank_ids, model.bank_ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded(single).pred, one)
        fresh = _model(dims, seed=0).eval()  # same weights, no bank: in-batch fallback only
        assert not torch.allclose(fresh(single).pred, one)


def test_in_batch_retrieval_depends_on_the_batch_and_needs_no_bank(dims, split, batch):
    model = _model(dims, retrieval="batch", retrieval_k=None, similarity_threshold=0.0).eval()
    model.on_train_epoch_start(1, lambda: iter([batch]))
    assert model.bank.shape[1] == 0  # nothing to refresh
    with torch.no_grad():
        alone = model(make_batch(split, np.array([2]))).pred
        together = model(batch).pred[2:3]
    assert torch.isfinite(alone).all() and not torch.allclose(alone, together)


def test_eval_is_deterministic_and_training_samples_the_bottleneck(dims, split, batch):
    model = _banked(dims, split)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(batch).pred, model(batch).pred)
        model.train()
        assert not torch.allclose(model(batch).pred, model(batch).pred)


# shapes, gradients, inputs -----------------------------------------------------------------------

@pytest.mark.parametrize("settings", [{}, {"retrieval": "batch", "retrieval_k": None}],
                         ids=["bank", "batch"])
def test_shapes_and_gradients_through_every_branch(dims, split, batch, settings):
    model = _banked(dims, split, **settings).train()
    torch.manual_seed(0)
    out = model(apply_missing(batch, MissingSpec("inter", rate=0.4, seed=0)))
    assert out.pred.shape == (N,) and out.features["fused"].shape == (N, 4 * 8)
    assert out.features["unimodal"].shape == (N, 3)
    assert set(out.losses) == {"unimodal", "kl"} and all(v > 0 for v in out.losses.values())
    (out.pred.abs().mean() + sum(out.losses.values())).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        if SILENT.fullmatch(name):
            assert param.grad.abs().sum() == 0, name
        else:
            assert param.grad.abs().sum() > 0, f"zero gradient for {name}"


def test_losses_are_the_published_terms(dims, split, batch):
    model = _banked(dims, split, unimodal_weight=0.5, kl_weight=2.0).train()
    out = model(batch)
    unimodal = (out.features["unimodal"] - batch.labels.unsqueeze(1)).abs().mean()
    torch.testing.assert_close(out.losses["unimodal"], 0.5 * unimodal)
    assert _banked(dims, split, kl_weight=0.0).train()(batch).losses["kl"] == 0
    with torch.no_grad():
        assert model.eval()(batch).losses == {}


def test_an_absent_modality_is_ignored_whatever_it_holds(dims, split, batch):
    model = _banked(dims, split).eval()
    no_audio = apply_missing(batch, MissingSpec("fixed", subset="tv"))
    scrambled = no_audio.with_updates(audio=torch.randn_like(batch.audio))
    with torch.no_grad():
        kept = model(no_audio).pred
        torch.testing.assert_close(model(scrambled).pred, kept)
        assert not torch.allclose(kept, model(batch).pred)


# training ---------------------------------------------------------------------------------------

def test_short_training_under_inter_modal_noise_reduces_the_loss(tiny_dataset):
    seed_everything(0)
    model = create_model("hme", {**TINY, "hidden": 16, "fusion_ffn": 16}, tiny_dataset.dims)
    config = TrainConfig(epochs=8, batch_size=16, lr=3e-3, loss="l1", device="cpu", patience=None,
                         noise="inter", noise_rate=0.3)
    noise = build_noise(config.noise, config.noise_rate, 0)
    refreshed = []
    refresh = model.refresh_bank
    model.refresh_bank = lambda batches: refreshed.append(1) or refresh(batches)
    trainer = Trainer(model, config, tiny_dataset.metric_family, train_transform=noise, progress=False)
    fit = trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=0)
    losses = [record.train_loss for record in fit.history]
    # built before epoch 1, refreshed after each of the 8 epochs
    assert len(refreshed) == 9 and model.bank.shape == (3, len(tiny_dataset.train), 16)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2])


def test_a_resumed_training_continues_with_the_bank_it_had(tiny_dataset, tmp_path):
    def trainer() -> Trainer:
        seed_everything(0)
        model = create_model("hme", {**TINY, "refresh_every": 2}, tiny_dataset.dims)
        config = TrainConfig(epochs=3, batch_size=16, lr=3e-3, device="cpu", patience=None,
                             noise="inter", noise_rate=0.3)
        return Trainer(model, config, tiny_dataset.metric_family, progress=False,
                       train_transform=build_noise(config.noise, config.noise_rate, 0))

    # killed after epoch 1: epoch 2 reuses epoch 1's bank
    assert_resumed_fit_is_the_straight_fit(trainer, tiny_dataset, 0, tmp_path / "state.pt", epochs=1)


def test_the_bank_is_built_before_the_first_epoch_and_refreshed_after_every_kth(dims, split):
    model = _model(dims, refresh_every=2)
    refreshed = []
    refresh = model.refresh_bank
    for epoch in range(1, 6):
        for when, hook in (("start", model.on_train_epoch_start), ("end", model.on_train_epoch_end)):
            model.refresh_bank = lambda batches, at=(when, epoch): refreshed.append(at) or refresh(batches)
            hook(epoch, lambda: iter([make_batch(split, np.arange(N))]))
    assert refreshed == [("start", 1), ("end", 2), ("end", 4)]


def test_validation_and_the_checkpoint_use_the_bank_of_their_own_weights(tiny_dataset):
    """The selected weights' bank is the training split encoded by those very weights, and their
    recorded validation score is what they score now (a bank one epoch old fails both)."""
    seed_everything(0)
    model = create_model("hme", {**TINY, "hidden": 16, "fusion_ffn": 16}, tiny_dataset.dims)
    config = TrainConfig(epochs=3, batch_size=16, lr=3e-3, device="cpu", patience=None,
                         noise="inter", noise_rate=0.3)
    trainer = Trainer(model, config, tiny_dataset.metric_family, progress=False,
                      train_transform=build_noise(config.noise, config.noise_rate, 0))
    fit = trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=0)
    saved = model.bank.clone()
    model.refresh_bank(iterate_batches(tiny_dataset.train, config.eval_batch_size))
    torch.testing.assert_close(model.bank, saved)
    assert trainer.evaluate(tiny_dataset.valid) == pytest.approx(fit.best_valid)


# settings ---------------------------------------------------------------------------------------

def test_yaml_holds_the_published_values():
    """Spot checks against YetZzzzzz/HME README commands and HME_main.py defaults."""
    mosi, mosei = resolve_config("hme", "mosi"), resolve_config("hme", "mosei")
    for resolved in (mosi, mosei):
        config = build_config("hme", resolved["model"])
        assert (config.hidden, config.heads, config.num_latents, config.hyper_depth) == (192, 16, 5, 3)
        assert (config.similarity_threshold, config.unimodal_weight, config.kl_weight) == (0.6, 0.8, 0.01)
        training = resolved["training"]
        assert (training["lr"], training["batch_size"], training["weight_decay"]) == (2e-5, 256, 1e-4)
        assert (training["loss"], training["noise"], training["patience"]) == ("l1", "inter", 10)
    assert [c["model"]["encoder_layers"] for c in (mosi, mosei)] == [4, 2]
    assert [c["model"]["latent_layers"] for c in (mosi, mosei)] == [4, 3]
    synthetic = build_config("hme", resolve_config("hme", "synthetic")["model"])
    assert synthetic.hidden == 32 and synthetic.text_source == "features"


@pytest.mark.parametrize(
    ("settings", "key"),
    [({"hidden": 10, "heads": 4}, "heads"), ({"retrieval": "index"}, "retrieval"),
     ({"retrieval_k": 0}, "retrieval_k"), ({"similarity_threshold": 1.5}, "similarity_threshold"),
     ({"uncertainty_lower": 0.0}, "uncertainty_lower"), ({"uncertainty_lower": 2.0}, "uncertainty_lower"),
     ({"kl_weight": -1}, "kl_weight"), ({"attn_dropout": 1.0}, "attn_dropout"),
     ({"latent_layers": 0}, "latent_layers"), ({"refresh_every": 0}, "refresh_every"),
     ({"encoder_attention": "cross"}, "encoder_attention"),
     ({"retrieval_fallback": "x"}, "retrieval_fallback"),
     ({"uncertainty_gate": "scale"}, "uncertainty_gate"), ({"retrieve_missing": 1}, "retrieve_missing"),
     ({"position_zero_steps": "no"}, "position_zero_steps"), ({"sample_at_eval": None}, "sample_at_eval")],
)
def test_bad_settings_are_user_errors(settings, key):
    with pytest.raises(MsakitError, match=key):
        build_config("hme", settings)


def test_an_empty_training_split_is_a_user_error(dims):
    with pytest.raises(MsakitError, match="memory bank"):
        _model(dims).on_train_epoch_start(1, lambda: iter([]))


# inputs: the paper trained on the word-aligned pickles ------------------------------------------

def test_hme_reads_the_aligned_pickle_unless_told_unaligned(tmp_path):
    from msakit import api

    folder = tmp_path / "MOSI" / "Processed"
    sizes = {"n_train": 12, "n_valid": 6, "n_test": 6, "text_len": 6, "audio_len": 9, "vision_len": 7,
             "text_dim": 8}
    for aligned, name in ((True, "aligned_50.pkl"), (False, "unaligned_50.pkl")):
        api.write_synthetic(folder / name, aligned=aligned, **sizes)
    tiny = [f"model.{k}={'null' if v is None else str(v).lower()}" for k, v in TINY.items()]
    common = {"data_dir": str(tmp_path), "epochs": 1, "overrides": tiny, "progress": False}
    trained = api.train("hme", "mosi", output=tmp_path / "run", **common)
    assert trained["dataset"]["source"].endswith("aligned_50.pkl")
    assert "unaligned" not in trained["dataset"]["source"]
    told = api.train("hme", "mosi", aligned=False, **common)
    assert told["dataset"]["source"].endswith("unaligned_50.pkl")
    # scoring the checkpoint reads what the model was trained on, too
    scored = api.evaluate(tmp_path / "run" / "seed-1111.pt", "mosi", data_dir=str(tmp_path))
    assert "unaligned" not in scored["dataset"]["source"]


# the paper's evaluation: one model per missing rate -----------------------------------------------

def test_reproduce_trains_selects_and_tests_one_model_per_rate(tiny_dataset, tmp_path, monkeypatch):
    """Each rate gets its own model: trained with inter-modal noise at that rate, selected on
    validation dropped at that rate, scored on test at that rate only (never selected on test)."""
    from msakit import api
    from msakit.training.config import model_yaml

    recipe = {**model_yaml("hme")["reproduce"], "rates": [0.2, 0.5], "seeds": [1111]}
    assert recipe["one_model_per_rate"] and not recipe["per_metric"]
    monkeypatch.setattr(api, "model_yaml", lambda name: {"reproduce": recipe})
    tiny = [f"model.{k}={str(v).lower()}" for k, v in TINY.items()]
    result = api.reproduce("hme", tiny_dataset, epochs=2, overrides=[*tiny, "training.batch_size=16"],
                           output=tmp_path, progress=False)
    assert [row["condition"] for row in result["rows"]] == ["0.20", "0.50"]
    assert "one model per inter-modal missing rate" in result["selection"]
    (run,) = result["seeds"]
    for row, rate in zip(run["rows"], (0.2, 0.5), strict=True):
        checkpoint = tmp_path / f"rate-{rate:g}" / "seed-1111.pt"
        training = load_checkpoint(checkpoint)[1]["training_config"]
        assert (training["noise"], training["noise_rate"]) == ("inter", rate)
        assert (training["select_protocol"], training["select_rate"]) == ("inter", rate)
        # the row is this model's own test score at this rate, and at no other
        alone = api.robustness(checkpoint, tiny_dataset, protocol="inter", rates=[rate])
        assert alone["rows"][0]["metrics"] == pytest.approx(row["metrics"], nan_ok=True)
    assert result["mean"]["mae"] == pytest.approx(np.mean([r["metrics"]["mae"] for r in run["rows"]]))
    assert [m["model"] for m in run["models"]] == ["rate-0.2", "rate-0.5"]
