"""Mixed precision and compilation (`training.precision`, `training.compile`) on every registered model.

Every model is built as the contract test builds it (its YAML's `tiny:` section, the 6 hand-made
clips, its side inputs) and its predicting stage's eval-mode forward pass is compared with fp32
eager:

- under bf16 autocast. bf16 keeps 8 significant bits, so each rounded matrix product is off by up
  to 2^-8 (0.4%) of its magnitude, and a tiny model's prediction passes through 5-15 of them.
  Measured (torch 2.13, CPU): at most 5 * 2^-8 of the prediction's largest magnitude (DashFusion;
  most models 1-3). The bound is 16 * 2^-8 of it (floored at 0.1, so that a model predicting near
  zero is judged on the scale of a sentiment score): a dtype slip, a mask filled with a value bf16
  cannot hold, or a branch left out of autocast's fp32 list is off by far more, or not finite.
- compiled. Every model is compiled with the "eager" backend (TorchDynamo captures the graphs and
  replays them with the same kernels, so it must agree to the bit): that every model can be
  compiled at all is what breadth buys, at ~1-15 s a model. The generated code of the default
  backend (inductor: C++ kernels, fused and reordered) is checked once, through
  `training.compile: true`, on the smallest model; reordered float sums agree to about 1e-6.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters as compiled_graphs  # what TorchDynamo captured

from contract import test_models as contract
from contract.test_models import assert_stage_trains, batches_of, build, predict, stage_names
from msakit import api
from msakit.data.schema import Batch, FeatureDims
from msakit.errors import MsakitError
from msakit.models import create_model
from msakit.training.precision import MixedPrecision
from msakit.training.settings import TrainConfig
from msakit.training.trainer import Trainer, seed_everything
from resume_check import assert_resumed_fit_is_the_straight_fit

# the contract test's fixtures, under the names the tests below ask for: every registered model
# (`name`) with its side inputs (`needs`), on the 6 hand-made clips (`clips`, `data`, `batch`)
name, needs, clips, data, batch = contract.name, contract.needs, contract.clips, contract.data, contract.batch

BF16_STEPS = 16  # the bound on bf16's deviation, in bf16 rounding steps (2^-8) of the prediction
SCALE_FLOOR = 0.1


def predicting_model(name: str, dims: FeatureDims, needs, batch: Batch):
    """The model in its last (predicting) stage, its epoch hooks run (memory banks, indexes)."""
    model = build(name, dims, needs)
    model.on_train_epoch_start(1, batches_of(batch))
    model.set_stage(stage_names(name)[-1])
    return model


def test_bf16_autocast_predicts_as_fp32_within_bf16_rounding(name, data, batch, needs):
    model = predicting_model(name, data.dims, needs, batch)
    reference = predict(model, batch)
    with MixedPrecision("bf16", torch.device("cpu")).autocast():
        low = predict(model, batch)
    assert torch.isfinite(low).all()
    assert low.float().sub(reference).abs().max() <= (
        BF16_STEPS * 2**-8 * max(reference.abs().max().item(), SCALE_FLOOR))
    assert all(p.dtype == torch.float32 for p in model.parameters()), "autocast leaves weights alone"


def test_every_stage_trains_under_bf16_autocast(name, data, batch, needs):
    """Training-time branches (noise, auxiliary losses, stage switches) under autocast: finite
    losses and gradients, every trainable parameter reached in the last stage, fp32 gradients."""
    model = build(name, data.dims, needs)
    model.on_train_epoch_start(1, batches_of(batch))
    stages = stage_names(name)
    with MixedPrecision("bf16", torch.device("cpu")).autocast():
        for index, stage in enumerate(stages):
            model.set_stage(stage)
            assert_stage_trains(model, batch, every_parameter=index == len(stages) - 1)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


@pytest.mark.slow
def test_every_model_compiles_and_predicts_as_eager(name, data, batch, needs):
    torch.compiler.reset()  # each model's graphs from scratch, within the recompile limit
    model = predicting_model(name, data.dims, needs, batch)
    reference = predict(model, batch)
    model.compile(backend="eager")
    torch.testing.assert_close(predict(model, batch), reference, rtol=0, atol=0)


@pytest.mark.slow
def test_training_compile_runs_inductor_and_agrees_with_eager(tiny_dataset):
    torch.compiler.reset()
    compiled_graphs.clear()
    predictions = {}
    for compiled in (False, True):
        seed_everything(0)
        model = create_model("lmf", {"text_source": "features"}, tiny_dataset.dims)
        trainer = Trainer(model, TrainConfig(device="cpu", compile=compiled), "mosi", progress=False)
        predictions[compiled] = trainer.predict(tiny_dataset.test)[0]
    assert compiled_graphs["stats"]["unique_graphs"] >= 1, "the model ran compiled"
    # compiled in place: checkpoints and training states keep the weights' own names
    assert not any(key.startswith("_orig_mod") for key in trainer.model.state_dict())
    torch.testing.assert_close(predictions[True], predictions[False], rtol=1e-5, atol=1e-6)


def test_a_bf16_run_trains_and_writes_fp32_weights(tiny_dataset, tmp_path: Path):
    results = api.train("tfn", tiny_dataset, epochs=2, seeds=[1], output=tmp_path, progress=False,
                        overrides=["training.precision=bf16", "training.batch_size=16"])
    assert results["config"]["training"]["precision"] == "bf16"
    checkpoint = torch.load(tmp_path / "seed-1.pt", map_location="cpu", weights_only=True)
    weights = checkpoint["state_dict"]
    assert weights and all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point())
    assert checkpoint["training_config"]["precision"] == "bf16"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_half_precision_fit_resumes_to_exactly_the_straight_fit(tiny_dataset, tmp_path, precision):
    """With fp16, the loss scale is part of the state: here it starts so high that the first
    epoch's steps overflow and are skipped while it is halved, so a resumed run that started over
    from the initial scale would skip steps of the second epoch too."""

    def trainer() -> Trainer:
        seed_everything(3)
        model = create_model("text_only", {"text_source": "features", "hidden": 16, "dropout": 0.3},
                             tiny_dataset.dims)
        config = TrainConfig(epochs=3, batch_size=8, lr=1e-2, device="cpu", patience=None,
                             state_every=1, precision=precision, grad_clip=1.0)
        made = Trainer(model, config, "mosi", progress=False)
        if precision == "fp16":
            made.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=10**6)
        return made

    assert_resumed_fit_is_the_straight_fit(trainer, tiny_dataset, seed=3,
                                           state_file=tmp_path / "state.pt", epochs=1)


def test_precision_settings_are_checked():
    with pytest.raises(MsakitError, match="training.precision must be one of fp32, bf16, fp16, not 'fp8'"):
        TrainConfig(precision="fp8")
    with pytest.raises(MsakitError, match="training.compile must be true or false, not 'yes'"):
        TrainConfig(compile="yes")
    config = dataclasses.replace(TrainConfig(), precision="bf16")
    assert config.tf32 and not config.compile


def test_a_precision_autocast_cannot_run_on_the_device_is_a_one_line_error():
    with pytest.raises(MsakitError, match="training.precision=bf16 is not supported by autocast on "
                                          "device meta") as error:
        MixedPrecision("bf16", torch.device("meta"))
    assert "\n" not in str(error.value)
