"""The model contract (models/base.py), checked for every registered model.

Each model is built from the `tiny:` section of its YAML (plus the files it reads, from fixtures) on
the 6 hand-made clips of `model_inputs` (with the side inputs it reads attached, as a run attaches
them), and trained the way the trainer does it: its recipe's stages, its training noise, its epoch
hooks, the clean batch when it asks for one. A model's own test file keeps only what is specific
to it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model_inputs import N, pad_noise, padded_longer, without, write_cues
from msakit.data.batching import make_batch
from msakit.data.schema import Batch, FeatureDims, MultimodalDataset, Split
from msakit.errors import MsakitError
from msakit.missing import MissingSpec, apply_missing, build_noise
from msakit.models import create_model, get_model_class, list_models
from msakit.models.base import ModelConfig, MSAModel
from msakit.models.registry import build_config
from msakit.training.checkpoint import load_checkpoint, save_checkpoint
from msakit.training.config import TINY, model_yaml, resolve_config, training_config
from msakit.training.runs import side_inputs
from msakit.training.settings import TrainConfig
from msakit.training.trainer import Trainer, seed_everything

MODELS = list_models()
# models that fuse inside the text encoder: their tiny section runs it (the tiny random BERT of `needs`)
FUSE_INSIDE_THE_ENCODER = {"mag_bert"}
PROTOCOL_CASES = [
    MissingSpec("intra", rate=0.5, seed=1),
    MissingSpec("inter", rate=0.5, seed=1),
    MissingSpec("fixed", subset="a"),
    MissingSpec("fixed", subset="tv"),
]


@pytest.fixture(scope="module")
def needs(split: Split, tiny_dataset: MultimodalDataset, tiny_bert: str,
          tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Model settings naming the files a model reads besides the data, by model name: cues for
    the contract's clips and the tiny dataset's."""
    folder = tmp_path_factory.mktemp("cues")
    cues = write_cues(folder / "cues.jsonl", {s: tiny_dataset.split(s) for s in ("train", "valid", "test")})
    with open(cues, "a") as f:
        f.write(Path(write_cues(folder / "clips.jsonl", {"train": split})).read_text())
    return {"mmslf": {"cues": cues, "prompt_encoder": tiny_bert},
            "mag_bert": {"text_encoder": tiny_bert}}


@pytest.fixture(scope="module")
def clips(split: Split) -> MultimodalDataset:
    """The 6 clips as every split of a dataset."""
    return MultimodalDataset("tiny", "synthetic", split, split, split)


def tiny_settings(name: str, needs: dict[str, dict[str, Any]], **settings: Any) -> dict[str, Any]:
    return {**resolve_config(name, TINY)["model"], **needs.get(name, {}), **settings}


def with_side_inputs(name: str, data: MultimodalDataset, needs: dict[str, dict[str, Any]]
                     ) -> MultimodalDataset:
    """`data` with the side inputs the model reads (MMSLF's cues) attached, as a run attaches them."""
    config = {"model": tiny_settings(name, needs), "training": resolve_config(name, TINY)["training"]}
    return side_inputs(name, config, data)[0]


@pytest.fixture(params=MODELS)
def name(request: pytest.FixtureRequest) -> str:
    """Every test of this module runs for every registered model."""
    return request.param


@pytest.fixture
def data(name: str, clips: MultimodalDataset, needs: dict[str, dict[str, Any]]) -> MultimodalDataset:
    return with_side_inputs(name, clips, needs)


@pytest.fixture
def batch(data: MultimodalDataset) -> Batch:
    """The 6 clips as one batch, with the model's side inputs."""
    return make_batch(data.train, np.arange(N))


def build(name: str, dims: FeatureDims, needs: dict[str, dict[str, Any]], seed: int = 0,
          **settings: Any) -> MSAModel:
    seed_everything(seed)
    return create_model(name, tiny_settings(name, needs, **settings), dims)


def recipe(name: str) -> TrainConfig:
    return training_config(resolve_config(name, TINY)["training"])


def stage_names(name: str) -> list[str]:
    return [stage.name for stage in recipe(name).stages] or ["main"]


def batches_of(batch: Batch) -> Callable[[], Iterator[Batch]]:
    """The `train_batches` argument of the epoch hooks: the whole (here: one-batch) training split."""
    return lambda: iter([batch])


def training_batch(model: MSAModel, batch: Batch, epoch: int = 1) -> Batch:
    """A batch as the trainer hands it to the model: the recipe's noise, and the clean batch when asked."""
    config = recipe(model.registry_name)
    noise = build_noise(config.noise, config.noise_rate, seed=0)
    noisy = batch if noise is None else noise(batch, epoch)
    return noisy.with_updates(clean=batch) if model.needs_clean_input else noisy


def total_loss(out, batch: Batch) -> torch.Tensor:
    return torch.nn.functional.l1_loss(out.pred, batch.labels) + sum(out.losses.values())


def trainable(model: MSAModel) -> Iterator[tuple[str, torch.nn.Parameter]]:
    # a Hugging Face encoder's pooler sits after last_hidden_state, which is all a model reads
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad and ".pooler." not in n)


def assert_stage_trains(model: MSAModel, batch: Batch, every_parameter: bool) -> None:
    """Forward and backward in training mode: shapes, finite values and finite gradients; with
    `every_parameter`, every trainable parameter gets one."""
    model.zero_grad(set_to_none=True)
    model.train()
    out = model(training_batch(model, batch))
    assert out.pred.shape == (len(batch),)
    assert torch.isfinite(out.pred).all()
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out.losses.values()), out.losses
    total_loss(out, batch).backward()
    # an extra optimisation phase's parameters may train on terms a first step lacks (MMIM's)
    phase_owned = tuple(prefix for phase in model.extra_phases() for prefix in phase.parameters)
    for name, param in trainable(model):
        if param.grad is None:
            assert not every_parameter or name.startswith(phase_owned), (
                f"no gradient for {name} in stage {model.stage}")
        else:
            assert torch.isfinite(param.grad).all(), f"non-finite gradient for {name}"


def predict(model: MSAModel, batch: Batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(batch).pred


# the YAML ------------------------------------------------------------------------------------------

def test_every_model_ships_a_tiny_section(name):
    assert TINY in model_yaml(name)
    config = build_config(name, resolve_config(name, TINY)["model"])
    assert config.text_source == "features" or name in FUSE_INSIDE_THE_ENCODER, \
        "the contract runs on precomputed text features"
    assert set(stage_names(name)) <= set(get_model_class(name).stages or ["main"])


# shapes, gradients, stages ------------------------------------------------------------------------

def test_every_stage_trains_with_finite_gradients(name, dims, batch, needs):
    """In every stage of the recipe the loss and its gradients are finite; in the last one (the
    model that predicts) every trainable parameter gets a gradient."""
    model = build(name, dims, needs)
    stages = stage_names(name)
    model.on_train_epoch_start(1, batches_of(batch))
    for index, stage in enumerate(stages):
        model.set_stage(stage)
        assert model.stage == stage
        assert_stage_trains(model, batch, every_parameter=index == len(stages) - 1)
    model.on_train_epoch_end(1, batches_of(batch))
    pred = predict(model, batch)
    assert pred.shape == (N,) and torch.isfinite(pred).all()
    with torch.no_grad():
        assert model(batch).losses == {}, "auxiliary losses are training terms"


def test_an_unknown_stage_is_a_one_line_error(name, dims, needs):
    model = build(name, dims, needs)
    if not model.stages:
        model.set_stage("warm-up")  # a model with one network trains the same in any stage
        return
    with pytest.raises(MsakitError, match="'warm-up'") as error:
        model.set_stage("warm-up")
    assert "\n" not in str(error.value)


def test_a_batch_of_one(name, dims, data, batch, needs):
    model = build(name, dims, needs)
    model.on_train_epoch_start(1, batches_of(batch))
    one = make_batch(data.train, np.array([2]))
    assert_stage_trains(model, one, every_parameter=False)
    pred = predict(model, one)
    assert pred.shape == (1,) and torch.isfinite(pred).all()


def test_the_recipe_runs_in_the_training_loop(name, data, dims, needs):
    """The tiny recipe through `Trainer.fit`: every stage in order, with the model's noise and hooks."""
    model = build(name, dims, needs)
    config = dataclasses.replace(recipe(name), device="cpu", patience=None)
    noise = build_noise(config.noise, config.noise_rate, seed=0)
    trainer = Trainer(model, config, "mosi", train_transform=noise, progress=False)
    fit = trainer.fit(data.train, data.valid, seed=0)
    assert [r.stage for r in fit.history] == [s.name for s in trainer.stages() for _ in range(s.epochs)]
    assert all(np.isfinite(r.train_loss) for r in fit.history)
    assert model.stage == stage_names(name)[-1]
    assert np.isfinite(trainer.predict(data.test)[0]).all()


# what the masks hide ------------------------------------------------------------------------------

def test_padding_changes_nothing(name, dims, batch, needs):
    """Values in padded steps (even infinities) and longer padding change no prediction, in any
    stage, also with a modality missing; a modality with no valid step at all gives a finite
    prediction, whatever it holds, and finite gradients."""
    model = build(name, dims, needs)
    model.on_train_epoch_start(1, batches_of(batch))
    empty = without(without(without(batch, "audio", [0, 2]), "vision", [1, 2]), "text", [3])
    no_vision = apply_missing(batch, MissingSpec("fixed", subset="ta"))
    for stage in stage_names(name):
        model.set_stage(stage)
        reference = predict(model, batch)
        torch.testing.assert_close(predict(model, pad_noise(batch)), reference)
        torch.testing.assert_close(predict(model, padded_longer(batch)), reference)
        torch.testing.assert_close(predict(model, padded_longer(no_vision)), predict(model, no_vision))
        kept = predict(model, empty)
        assert torch.isfinite(kept).all()
        torch.testing.assert_close(predict(model, pad_noise(empty)), kept)
        assert_stage_trains(model, empty, every_parameter=stage == stage_names(name)[-1])


@pytest.mark.parametrize("spec", PROTOCOL_CASES, ids=lambda s: s.label)
def test_every_missing_protocol_runs(name, spec, tiny_dataset, needs):
    """Under each protocol a model predicts finite values that differ from the clean ones exactly
    when the protocol drops an input the model reads, and trains with finite gradients."""
    data = with_side_inputs(name, tiny_dataset, needs)
    model = build(name, data.dims, needs)
    train = make_batch(data.train, np.arange(12))
    model.on_train_epoch_start(1, batches_of(train))
    trainer = Trainer(model, TrainConfig(device="cpu", eval_batch_size=9), "mosi", progress=False)
    clean, _ = trainer.predict(data.test)
    missing, _ = trainer.predict(data.test, transform=lambda b: apply_missing(b, spec))
    assert np.isfinite(missing).all()
    drops_an_input = spec.protocol != "fixed" or any(m[0] not in spec.subset for m in model.modalities)
    assert np.array_equal(clean, missing) != drops_an_input
    assert_stage_trains(model, apply_missing(train, spec), every_parameter=False)


# checkpoints and seeds ----------------------------------------------------------------------------

def test_a_checkpoint_predicts_as_the_model_did(name, dims, batch, needs, tmp_path):
    model = build(name, dims, needs)
    model.on_train_epoch_start(1, batches_of(batch))  # memory banks and indexes built
    save_checkpoint(tmp_path / "model.pt", model, training={}, dataset={})
    loaded, meta = load_checkpoint(tmp_path / "model.pt")
    assert meta["model_name"] == name and type(loaded) is type(model)
    assert loaded.config == model.config and loaded.stage == model.stage
    torch.testing.assert_close(predict(loaded, batch), predict(model, batch), rtol=0, atol=0)


def test_the_same_seed_gives_the_same_model(name, dims, batch, needs):
    a, b, other = (build(name, dims, needs, seed=seed) for seed in (3, 3, 4))
    for model in (a, b):
        model.on_train_epoch_start(1, batches_of(batch))
    torch.testing.assert_close(predict(a, batch), predict(b, batch), rtol=0, atol=0)
    train = {}
    for key, model in (("a", a), ("b", b)):
        torch.manual_seed(7)  # dropout and sampling at training time draw from the global stream
        train[key] = model.train()(training_batch(model, batch)).pred
    torch.testing.assert_close(train["a"], train["b"], rtol=0, atol=0)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), other.parameters(), strict=True))


# a pretrained text encoder ------------------------------------------------------------------------

def test_a_fine_tuned_text_encoder(name, dims, batch, needs, tiny_bert):
    """With `text_source: encoder` the encoder's weights are the model's pretrained parameters (their
    own learning rate) and get gradients; token ids under a zero attention mask change nothing."""
    model = build(name, dims, needs, text_source="encoder", text_encoder=tiny_bert)
    pretrained = {id(p) for p in model.pretrained_parameters()}
    assert pretrained and pretrained < {id(p) for p in model.parameters()}
    ids = batch.text_ids.clone()
    ids[:, 0][ids[:, 1] == 0] = 2000  # any real token where attention_mask is 0
    model.on_train_epoch_start(1, batches_of(batch))
    for stage in stage_names(name):
        model.set_stage(stage)
        torch.testing.assert_close(predict(model, batch.with_updates(text_ids=ids)), predict(model, batch))
    assert_stage_trains(model, batch, every_parameter=True)
    frozen = build(name, dims, needs, text_source="encoder", text_encoder=tiny_bert, finetune_text=False)
    assert not any(p.requires_grad for p in frozen.pretrained_parameters())


# settings -----------------------------------------------------------------------------------------

def _int_fields(config: ModelConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(config)
            if isinstance(getattr(config, f.name), int) and not isinstance(getattr(config, f.name), bool)]


def test_bad_settings_are_one_line_errors_naming_the_key(name, needs):
    settings = tiny_settings(name, needs)
    for where in ("model.not_a_setting=1", "training.not_a_setting=1"):
        with pytest.raises(MsakitError, match="not_a_setting") as error:
            resolve_config(name, TINY, [where])
        assert "\n" not in str(error.value)
    config = build_config(name, settings)
    assert _int_fields(config), "every model has sizes"
    for key in _int_fields(config):
        with pytest.raises(MsakitError, match=f"model.{key}") as error:
            build_config(name, {**settings, key: -1})
        assert "\n" not in str(error.value)
