"""Every registered model on raw, unnormalised features (the `synthetic-raw` test bed), and the
settings and outputs that real data needs: input normalisation, the dataset family, strict JSON."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

from msakit import api
from msakit.cues import attach_cues, generate_cues, make_backend
from msakit.data import synthetic_dataset
from msakit.data.batching import make_batch
from msakit.data.normalize import (
    DataConfig,
    fit_normalization,
    normalize_split,
    scale_warnings,
)
from msakit.data.synthetic import generate_synthetic
from msakit.errors import MsakitError
from msakit.metrics import prediction_warnings
from msakit.models import create_model, get_model_class, list_models
from msakit.training.config import parse_overrides, resolve_config, training_config
from msakit.training.raw_scale import shuffle_probe, silence_warnings, silenced_modalities
from msakit.training.settings import TrainConfig
from msakit.training.trainer import Trainer, seed_everything

SIZES = {"n_train": 96, "n_valid": 32, "n_test": 32, "text_len": 12, "audio_len": 20,
         "vision_len": 16, "text_dim": 32}


@pytest.fixture(scope="module")
def raw_scale():
    return synthetic_dataset(real_scale=True, seed=0, **SIZES)


@pytest.fixture(scope="module")
def raw_cues(raw_scale, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cues") / "cues.jsonl"
    generate_cues(raw_scale, make_backend("offline", raw_scale), path, progress=False)
    return str(path)


def _settings(name: str, cues: str, tiny_bert: str, *extra: str) -> dict:
    overrides = ["model.text_source=features", *extra]
    if name == "mag_bert":  # its gate sits inside the encoder: the tiny BERT, on unaligned clips
        overrides = [f"model.text_encoder={tiny_bert}", "model.unaligned_input=resample", *extra]
    if name == "mmslf":
        overrides += [f"model.cues={cues}", f"model.prompt_encoder={tiny_bert}", "model.prompt_max_len=64"]
    return resolve_config(name, "synthetic", overrides)


def test_the_real_scale_test_bed_has_raw_mixed_scales_and_small_labels(raw_scale):
    train = raw_scale.train
    assert np.abs(train.vision).max() > 100 and np.abs(train.audio).max() > 100
    assert 0.05 < train.labels.std() < 0.2
    assert raw_scale.replaced_nonfinite > len(train)  # -inf in most clips' first audio dim
    plain = generate_synthetic(seed=0, **SIZES)
    scaled = generate_synthetic(seed=0, real_scale=True, **SIZES)
    np.testing.assert_array_equal(plain["train"]["text"], scaled["train"]["text"])
    np.testing.assert_array_equal(np.sign(plain["test"]["regression_labels"]),
                                  np.sign(scaled["test"]["regression_labels"]))
    assert any("raw scale" in line for line in scale_warnings(train, DataConfig()))
    assert scale_warnings(synthetic_dataset(seed=0, **SIZES).train, DataConfig()) == []


@pytest.mark.parametrize("name", list_models())
def test_every_model_has_a_finite_first_loss_on_inputs_a_thousand_times_larger(
        name, raw_scale, raw_cues, tiny_bert):
    config = _settings(name, raw_cues, tiny_bert)
    seed_everything(0)
    model = create_model(name, config["model"], raw_scale.dims)
    model.train()
    batch = make_batch(synthetic_dataset(seed=1, **SIZES).train, np.arange(16))
    batch = batch.with_updates(**{m: getattr(batch, m) * 1e3 for m in ("text", "audio", "vision")},
                               side={"cues": ["Visual cues: a smile. Language cues: warm words."] * 16})
    out = model(batch)
    loss = torch.nn.functional.l1_loss(out.pred, batch.labels) + sum(out.losses.values())
    assert torch.isfinite(loss), {k: v.item() for k, v in out.losses.items()}


SILENCE_PAIRS = [(name, modality) for name in list_models() for modality in get_model_class(name).modalities]
# MOSI's sequence lengths: a recurrent branch saturates over hundreds of raw frames, not twenty
MOSI_LENGTHS = {"n_train": 64, "n_valid": 8, "n_test": 8, "text_len": 12, "text_dim": 32}


@pytest.fixture(scope="module")
def raw_mosi_lengths(tmp_path_factory):
    data = synthetic_dataset(real_scale=True, seed=0, **MOSI_LENGTHS)
    path = tmp_path_factory.mktemp("cues") / "cues.jsonl"
    generate_cues(data, make_backend("offline", data), path, progress=False)
    return attach_cues(data, str(path))[0], str(path)


@pytest.mark.parametrize("name,modality", SILENCE_PAIRS)
def test_raw_scales_do_not_silence_a_modality_at_initialisation(name, modality, raw_mosi_lengths,
                                                                tiny_bert):
    data, cues = raw_mosi_lengths
    probe = shuffle_probe(data.train)
    assert modality in probe.standardised or modality == "text"  # every feature modality is raw
    silenced = silenced_modalities(name, _settings(name, cues, tiny_bert)["model"], data.dims, probe, seed=0)
    assert modality not in silenced, f"{name}: {silence_warnings(silenced, probe)}"


def test_a_run_warns_when_the_raw_scale_silences_a_modality_and_trains_as_without_the_check(
        raw_mosi_lengths, tmp_path, monkeypatch):
    data, _ = raw_mosi_lengths
    overrides = ["model.text_source=features", "training.batch_size=16"]
    # seed 0 initialises MMSA's MISA (no LayerNorm before the LSTMs) with its audio LSTMs saturated
    mmsa_misa = [*overrides, "model.input_norm=none"]
    run = api.train("misa", data, seeds=[0], epochs=1, output=tmp_path / "misa", overrides=mmsa_misa,
                    progress=False)
    silenced = [line for line in run["seeds"][0]["warnings"] if "do not reach" in line]
    assert len(silenced) == 1 and silenced[0].startswith("audio features on their raw scale")
    assert "data.normalize=zscore" in silenced[0]
    saved = json.loads((tmp_path / "misa" / "results.json").read_text())
    assert saved["seeds"][0]["warnings"][0] == silenced[0]
    for remedy in ("data.normalize=zscore", "model.input_norm=layernorm"):
        remedied = api.train("misa", data, seeds=[0], epochs=1, overrides=[*mmsa_misa, remedy],
                             progress=False)
        assert not any("do not reach" in line for line in remedied["seeds"][0]["warnings"]), remedy
    # the check builds and scores its own model: the training after it is the same without it
    checked = api.train("lmf", data, seeds=[1], epochs=1, overrides=overrides, progress=False)
    monkeypatch.setattr("msakit.training.runs.silenced_modalities", lambda *args: {})
    unchecked = api.train("lmf", data, seeds=[1], epochs=1, overrides=overrides, progress=False)
    assert checked["seeds"] == unchecked["seeds"]


@pytest.mark.parametrize("name", list_models())
def test_every_model_trains_on_raw_features_to_a_finite_non_constant_prediction(
        name, raw_scale, raw_cues, tiny_bert):
    config = _settings(name, raw_cues, tiny_bert, "training.epochs=2", "training.batch_size=16",
                       "training.device=cpu")
    # a staged model runs one epoch per stage, two in all
    stages = [{**s, "epochs": 1} for s in config["training"].get("stages") or []][:2]
    data, _ = attach_cues(raw_scale, raw_cues)  # what a run gives a model that reads side inputs
    seed_everything(0)
    model = create_model(name, config["model"], data.dims)
    trainer = Trainer(model, training_config({**config["training"], "stages": stages}), "mosi",
                      progress=False)
    fit = trainer.fit(data.train, data.valid, 0)
    assert all(math.isfinite(r.train_loss) for r in fit.history)
    preds, labels = trainer.predict(data.valid)
    assert np.isfinite(preds).all()
    assert preds.std() > 0.01 * labels.std(), f"{name}: constant predictions"


def test_a_nonfinite_first_loss_names_the_input_scales_not_the_learning_rate(raw_scale):
    config = resolve_config("tfn", "synthetic", ["model.text_source=features"])
    model = create_model("tfn", config["model"], raw_scale.dims)
    with torch.no_grad():
        model.out.bias.fill_(float("nan"))
    trainer = Trainer(model, TrainConfig(epochs=1, device="cpu"), "mosi", progress=False)
    with pytest.raises(MsakitError) as info:
        trainer.fit(raw_scale.train, raw_scale.valid, 0)
    message = str(info.value)
    assert "initialisation" in message and "vision max |x|" in message and "data.normalize" in message
    assert "lower training.lr" not in message


def test_zscore_statistics_come_from_the_training_split_and_keep_padding_zero(raw_scale):
    stats = fit_normalization(raw_scale.train, DataConfig(normalize={"vision": "zscore"}))
    assert set(stats) == {"vision"}
    train = normalize_split(raw_scale.train, stats)
    valid = train.vision_lengths[:, None] > np.arange(train.vision.shape[1])
    frames = train.vision[valid]
    np.testing.assert_allclose(frames.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(frames.std(0), 1, atol=1e-3)
    assert (train.vision[~valid] == 0).all()
    np.testing.assert_array_equal(train.audio, raw_scale.train.audio)  # left raw
    with pytest.raises(MsakitError, match="data.normalize must be one of"):
        DataConfig(normalize="minmax")
    with pytest.raises(MsakitError, match="unknown modality 'face'"):
        DataConfig(normalize={"face": "zscore"})


def test_a_normalised_run_keeps_its_statistics_and_evaluate_applies_them(raw_scale, tmp_path):
    run = api.train("lmf", raw_scale, seeds=[1], epochs=1, output=tmp_path,
                    overrides=["model.text_source=features", "data.normalize=zscore"], progress=False)
    assert run["config"]["data"] == {"normalize": "zscore", "label_range": None}
    assert not any("raw scale" in line for line in run["warnings"])
    checkpoint = torch.load(tmp_path / "seed-1.pt", weights_only=True)
    assert set(checkpoint["normalization"]) == {"text", "audio", "vision"}
    scored = api.evaluate(tmp_path / "seed-1.pt", raw_scale, split="test")
    assert scored["metrics"] == pytest.approx(run["seeds"][0]["test"])


def test_raw_scales_and_constant_predictions_are_warned_about_in_the_results(raw_scale, tmp_path):
    run = api.train("tfn", raw_scale, seeds=[1], epochs=1, output=tmp_path,
                    overrides=["model.text_source=features", "training.lr=0"], progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["warnings"] == run["warnings"]
    assert any(line.startswith("vision features are on a raw scale") for line in run["warnings"])
    assert any("seed 1: the selected model's validation MAE" in line for line in run["warnings"])
    constant = prediction_warnings(np.full(5, 0.2), np.arange(5.0), np.arange(5.0))
    assert "constant" in constant[0] and len(constant) == 2
    assert prediction_warnings(np.arange(5.0), np.arange(5.0), np.arange(5.0)) == []


def _strict(text: str):
    def refuse(token: str):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_robustness_json_is_strict_when_a_subset_has_no_defined_corr(raw_scale, tmp_path):
    api.train("text_only", raw_scale, seeds=[1], epochs=1, output=tmp_path / "run",
              overrides=["model.text_source=features"], progress=False)
    # without its text, a text-only model predicts one constant: Corr is undefined under "a"
    result = api.robustness(tmp_path / "run" / "seed-1.pt", raw_scale, protocol="fixed",
                            subsets=["a", "tav"], output=tmp_path / "fixed")
    assert math.isnan(result["rows"][0]["metrics"]["corr"]) and math.isnan(result["mean"]["corr"])
    saved = _strict((tmp_path / "fixed" / "robustness.json").read_text())
    assert saved["rows"][0]["metrics"]["corr"] is None
    assert "constant" in saved["rows"][0]["metrics"]["corr_null"]
    assert saved["mean"]["corr"] is None and saved["rows"][1]["metrics"]["corr"] is not None


def test_a_mean_over_rows_with_an_undefined_metric_is_undefined_and_written_as_null(tmp_path):
    from msakit.evaluation.report import mean_std
    from msakit.fileio import atomic_write_json

    mean, _ = mean_std([{"corr": 0.5, "mae": 1.0}, {"corr": math.nan, "mae": 2.0}])
    assert math.isnan(mean["corr"]) and mean["mae"] == 1.5
    atomic_write_json(tmp_path / "r.json", {"mean": mean}, {"corr": "undefined here"})
    assert _strict((tmp_path / "r.json").read_text())["mean"] == {
        "corr": None, "corr_null": "undefined here", "mae": 1.5}


@pytest.mark.parametrize("spelling,value", [("5e-4", 0.0005), ("1E3", 1000.0), (".5", 0.5),
                                            ("2", 2), ("1.5e+2", 150.0)])
def test_numbers_in_set_parse_whatever_their_spelling(spelling, value):
    assert parse_overrides([f"training.lr={spelling}"])["training"]["lr"] == value
    assert training_config(parse_overrides([f"training.lr={spelling}"])["training"]).lr == value


def test_a_mosei_like_pickle_named_x_gets_the_family_it_is_recognised_as(tmp_path):
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps(generate_synthetic(audio_dim=74, vision_dim=35, **SIZES)))
    run = api.train("lmf", str(path), seeds=[1], epochs=1, progress=False,
                    overrides=["model.text_source=features"])
    assert run["dataset"]["family"] == "mosei"
    assert "widths 74 and 35" in run["dataset"]["family_source"]
    assert run["config"]["training"] == training_config(
        resolve_config("lmf", "mosei", ["training.epochs=1"])["training"]).__dict__
    other = tmp_path / "y.pkl"
    other.write_bytes(pickle.dumps(generate_synthetic(audio_dim=7, vision_dim=9, **SIZES)))
    custom = api.train("lmf", str(other), seeds=[1], epochs=1, progress=False,
                       overrides=["model.text_source=features"])
    assert custom["dataset"]["family"] == "custom"
    assert "default settings" in custom["dataset"]["family_source"]
    chosen = api.train("lmf", str(other), family="sims", seeds=[1], epochs=1, progress=False,
                       overrides=["model.text_source=features", "data.label_range=-3,3"])  # MOSI's labels
    assert (chosen["dataset"]["family"], chosen["dataset"]["metric_family"]) == ("sims", "sims")
