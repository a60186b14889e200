"""Missing-data protocols: the field's conditions, that they really hurt a clean model, training noise
and selection under missing data (every model under every protocol: tests/contract)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from msakit import api
from msakit.data import synthetic_dataset
from msakit.data.batching import make_batch
from msakit.errors import MsakitError
from msakit.evaluation.protocols import conditions, run_protocol
from msakit.missing import MissingSpec, apply_missing, build_noise
from msakit.models import create_model
from msakit.models.layers.text import special_token_ids
from msakit.models.text_only import TextOnlyConfig
from msakit.training.checkpoint import load_checkpoint
from msakit.training.config import resolve_config, training_config
from msakit.training.settings import TrainConfig
from msakit.training.trainer import Trainer, seed_everything
from tiny_bert import make_tiny_bert


def _small_model(name: str, dims):
    # each model's CPU-sized synthetic settings, reading the precomputed text features
    config = resolve_config(name, "synthetic", ["model.text_source=features"])
    seed_everything(0)
    return create_model(name, config["model"], dims)


def test_default_conditions_follow_the_field():
    assert [c for c, _ in conditions("intra", None, None)] == [f"{r / 10:.2f}" for r in range(10)]
    assert [c for c, _ in conditions("inter", None, None)] == [f"{r / 10:.2f}" for r in range(1, 8)]
    assert [c for c, _ in conditions("fixed", None, None)] == ["t", "a", "v", "ta", "tv", "av", "tav"]


@pytest.mark.slow
def test_intra_modal_missing_bites_a_clean_baseline():
    data = synthetic_dataset(n_train=400, n_valid=100, n_test=200, text_len=20, audio_len=40,
                             vision_len=40, text_dim=64, seed=5)
    config = resolve_config("lmf", "synthetic", ["training.epochs=12"])
    seed_everything(0)
    model = create_model("lmf", config["model"], data.dims)
    trainer = Trainer(model, training_config(config["training"]), data.metric_family, progress=False)
    trainer.fit(data.train, data.valid, seed=0)
    result = run_protocol(trainer, data, "intra", rates=[0.0, 0.5, 0.9], seeds=[0, 1])
    mae = [row["metrics"]["mae"] for row in result["rows"]]
    acc = [row["metrics"]["acc2_non0"] for row in result["rows"]]
    assert mae[0] < mae[1] < mae[2]
    assert acc[2] < acc[0] - 0.05
    assert result["mean"]["mae"] == pytest.approx(np.mean(mae))


def test_training_noise_reaches_the_model_and_changes_each_epoch(tiny_dataset):
    seen: list[tuple[int, float]] = []
    model = _small_model("lmf", tiny_dataset.dims)
    forward = model.forward

    def spy(batch):
        if model.training:
            zero_frames = (batch.audio.abs().sum(-1) == 0) & batch.audio_mask
            seen.append((len(seen), float(zero_frames.sum() / batch.audio_mask.sum())))
        return forward(batch)

    model.forward = spy
    noise = build_noise("lnln", 0.0, seed=3)
    trainer = Trainer(model, TrainConfig(epochs=2, batch_size=100, device="cpu"), "mosi",
                      train_transform=noise, progress=False)
    trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=0)
    assert len(seen) == 2 and seen[0][1] != seen[1][1]
    assert all(z > 0.05 for _, z in seen), "LNLN noise zeroes frames of about half the samples"


def test_encoder_models_mask_with_their_tokenizers_ids(tiny_dataset, tmp_path):
    encoder = str(make_tiny_bert(tmp_path / "bert"))
    config = TextOnlyConfig(text_encoder=encoder, hidden=8)
    tokens = special_token_ids(config)
    assert tokens["unk_id"] == 100 and {0, 101, 102} <= set(tokens["special_ids"])
    assert special_token_ids(TextOnlyConfig(text_source="features")) == {}
    batch = make_batch(tiny_dataset.test, np.arange(8))
    dropped = apply_missing(batch, MissingSpec("intra", rate=0.9, seed=0), **tokens)
    changed = dropped.text_ids[:, 0] != batch.text_ids[:, 0]
    assert changed.any() and (dropped.text_ids[:, 0][changed] == tokens["unk_id"]).all()


def test_training_noise_set_in_the_config_changes_training(tiny_dataset):
    common = ["model.text_source=features", "training.batch_size=16"]
    clean = api.train("lmf", tiny_dataset, seeds=[1], epochs=2, overrides=common, progress=False)
    noisy = api.train("lmf", tiny_dataset, seeds=[1], epochs=2, progress=False,
                      overrides=[*common, "training.noise=lnln"])
    assert noisy["config"]["training"]["noise"] == "lnln"
    assert clean["seeds"][0]["history"][0]["train_loss"] != noisy["seeds"][0]["history"][0]["train_loss"]


def test_selection_under_missing_data_scores_validation_under_the_seeds_masks(tiny_dataset, tmp_path):
    common = ["model.text_source=features", "training.batch_size=16", "training.patience=null"]
    selected = ["training.select_protocol=intra", "training.select_rate=0.5"]
    result = api.train("lmf", tiny_dataset, seeds=[1], epochs=3, overrides=[*common, *selected],
                       output=tmp_path, progress=False)
    assert "under intra-modal missing at rate 0.5" in result["selection"]
    run = result["seeds"][0]

    model, _ = load_checkpoint(tmp_path / "seed-1.pt")
    trainer = Trainer(model, TrainConfig(device="cpu"), "mosi", progress=False)
    spec, tokens = MissingSpec("intra", rate=0.5, seed=1), special_token_ids(model.config)
    masked = trainer.evaluate(tiny_dataset.valid, lambda batch: apply_missing(batch, spec, **tokens))
    assert masked["mae"] == pytest.approx(run["valid"]["mae"])
    assert trainer.evaluate(tiny_dataset.valid)["mae"] != pytest.approx(run["valid"]["mae"])

    # training itself is unchanged: only what validation sees differs
    clean = api.train("lmf", tiny_dataset, seeds=[1], epochs=3, overrides=common, progress=False)
    assert clean["seeds"][0]["history"][0]["train_loss"] == run["history"][0]["train_loss"]
    assert clean["seeds"][0]["history"][0]["valid"]["mae"] != run["history"][0]["valid"]["mae"]


@pytest.mark.parametrize("setting, message", [
    ({"select_protocol": "fixed"}, "training.select_protocol must be one of none, intra, inter"),
    ({"select_rate": 1.5}, "training.select_rate must be a number in [0, 1]"),
    ({"select_rate": 1.0}, "training.select_rate must be below 1"),
])
def test_selection_under_missing_data_rejects_bad_settings(setting, message):
    with pytest.raises(MsakitError, match=re.escape(message)):
        TrainConfig(**setting)
