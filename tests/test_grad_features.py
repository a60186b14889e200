"""The training loop's gradient features: clipping by value, gradient accumulation and the models'
own optimiser groups (`MSAModel.parameter_groups`)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from msakit.data import synthetic_dataset
from msakit.data.batching import training_shards
from msakit.errors import MsakitError
from msakit.models import create_model
from msakit.models.base import ParameterGroup
from msakit.training import distributed
from msakit.training.precision import MixedPrecision
from msakit.training.settings import Stage, TrainConfig
from msakit.training.trainer import (
    Trainer,
    build_optimizer,
    build_scheduler,
    seed_everything,
    set_stage_rates,
)
from resume_check import assert_same_fit, fit_until_interrupted

FEATURES = {"text_source": "features", "hidden": 16, "dropout": 0.0}


def _trainer(dataset, **settings) -> Trainer:
    seed_everything(0)
    model = create_model("text_only", FEATURES, dataset.dims)
    config = TrainConfig(**{"epochs": 1, "batch_size": 8, "lr": 1e-2, "device": "cpu", "state_every": 1,
                            "patience": None, **settings})
    return Trainer(model, config, dataset.metric_family, progress=False)


def _recorded_steps(trainer: Trainer, dataset, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Fit one epoch and keep every gradient as each optimiser step reads it."""
    steps = []
    original = torch.optim.AdamW.step

    def record(optimizer, *args, **kwargs):
        steps.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
        return original(optimizer, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", record)
        trainer.fit(dataset.train, dataset.valid, seed=seed)
    return steps


def _by_hand(model: nn.Module, dataset, batch_size: int, groups: int, accumulate: int, seed: int = 1,
             clip_value: float | None = None) -> list[dict[str, torch.Tensor]]:
    """MMSA's loop written out: per group, zero the gradients, then for each batch the mean L1 loss's
    backward followed by clip_grad_value_ on the running sum."""
    generator = torch.Generator().manual_seed(seed)
    batches = [b for b, _ in training_shards(dataset.train, batch_size, generator)]
    model.train()
    steps = []
    for group in range(groups):
        model.zero_grad(set_to_none=True)
        for batch in batches[group * accumulate:(group + 1) * accumulate]:
            nn.functional.l1_loss(model(batch).pred, batch.labels).backward()
            if clip_value is not None:
                nn.utils.clip_grad_value_([p for p in model.parameters() if p.requires_grad], clip_value)
        steps.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return steps


def _assert_same_steps(ours: list[dict], theirs: list[dict], rtol: float = 0.0, atol: float = 0.0) -> None:
    assert len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs, strict=True):
        for name in reference:
            torch.testing.assert_close(mine[name], reference[name], rtol=rtol, atol=atol, msg=name)


def test_clip_by_value_is_clip_grad_value_after_each_backward(tiny_dataset):
    # one batch per step: the step reads clip_grad_value_ of the batch's gradient; the bound is small
    # enough that most elements sit on it
    trainer = _trainer(tiny_dataset, grad_clip_value=1e-3, lr=0.0)
    reference = copy.deepcopy(trainer.model)
    steps = _recorded_steps(trainer, tiny_dataset)
    assert len(steps) == 6  # 48 samples in batches of 8
    _assert_same_steps(steps, _by_hand(reference, tiny_dataset, 8, groups=6, accumulate=1, clip_value=1e-3))
    clipped = sum(int((g.abs() == 1e-3).sum()) for g in steps[0].values())
    assert clipped > 0


def test_accumulation_clips_the_running_sum_after_every_batch(tiny_dataset):
    # MMSA clips after each backward, so a group's second batch adds to an already clipped gradient
    trainer = _trainer(tiny_dataset, grad_clip_value=2e-3, accumulate_steps=2, batch_size=10, lr=0.0)
    reference = copy.deepcopy(trainer.model)
    steps = _recorded_steps(trainer, tiny_dataset)
    # 48 samples in batches of 10: 5 batches, 2 complete groups, the fifth batch dropped
    assert len(steps) == 2 and trainer.config.accumulate_steps == 2
    _assert_same_steps(steps, _by_hand(reference, tiny_dataset, 10, groups=2, accumulate=2, clip_value=2e-3))
    # the step reads clamp(clamp(g1) + g2), within the bound (a clamp per batch would reach twice it)
    assert max(float(g.abs().max()) for g in steps[0].values()) == pytest.approx(2e-3)


def test_accumulated_batches_equal_one_step_over_their_concatenation(tiny_dataset):
    # batches of 8 drawn from the same order as batches of 24: three accumulated batch means sum to
    # three times the mean over the 24 samples (MMSA's sum; AdamW's update ignores the factor up to
    # its eps, which on gradients near 1e-8 is not small: the weights are not compared)
    accumulated = _trainer(tiny_dataset, batch_size=8, accumulate_steps=3)
    whole = _trainer(tiny_dataset, batch_size=24)
    steps_accumulated = _recorded_steps(accumulated, tiny_dataset)
    steps_whole = _recorded_steps(whole, tiny_dataset)
    assert len(steps_accumulated) == len(steps_whole) == 2
    # the first step's gradients (the second's differ by what eps made of the first update)
    _assert_same_steps(steps_accumulated[:1], [{n: 3 * g for n, g in steps_whole[0].items()}],
                       rtol=1e-5, atol=1e-7)


def _mmsa_tfr_net_steps(model: nn.Module, dataset, config: TrainConfig, seed: int) -> list[dict]:
    """MMSA's TFR-Net loop written out (update_epochs = accumulate_steps): zero_grad when a group
    starts, then per batch backward, clip_grad_value_, step; a second step when the group completes;
    `left` restarts every epoch. Keeps each step's weights, gradients and rate as the step reads them."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = build_optimizer(model, config)
    # 5 batches an epoch: 5 steps, and one more for the one complete group of 4
    scheduler = build_scheduler(optimizer, config, config.epochs * (5 + 1))
    model.train()
    steps = []

    def step() -> None:
        steps.append({"lr": optimizer.param_groups[0]["lr"],
                      **{n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}})
        optimizer.step()
        scheduler.step()

    for _ in range(config.epochs):
        left = config.accumulate_steps
        for batch, _ in training_shards(dataset.train, config.batch_size, generator):
            if left == config.accumulate_steps:
                optimizer.zero_grad()
            left -= 1
            nn.functional.l1_loss(model(batch).pred, batch.labels).backward()
            nn.utils.clip_grad_value_([p for p in model.parameters() if p.requires_grad],
                                      config.grad_clip_value)
            step()
            if not left:
                step()
                left = config.accumulate_steps
    return steps


def test_step_every_batch_follows_mmsa_tfr_nets_sequence(tiny_dataset):
    # 48 samples in batches of 10, groups of 4: per epoch a complete group (steps after batches
    # 1, 2, 3 and twice after 4) and an incomplete one (a step after batch 5); two epochs show that
    # the incomplete group's sum does not reach the next epoch
    trainer = _trainer(tiny_dataset, epochs=2, batch_size=10, accumulate_steps=4, step_every_batch=True,
                       grad_clip_value=0.05, schedule="linear")
    reference = copy.deepcopy(trainer.model)
    ours = []
    original = torch.optim.AdamW.step

    def record(optimizer, *args, **kwargs):
        ours.append({"lr": optimizer.param_groups[0]["lr"], **{
            n: (p.detach().clone(), p.grad.clone()) for n, p in trainer.model.named_parameters()}})
        return original(optimizer, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", record)
        trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=1)
    theirs = _mmsa_tfr_net_steps(reference, tiny_dataset, trainer.config, seed=1)
    assert len(ours) == len(theirs) == 12
    for k, (mine, reference_step) in enumerate(zip(ours, theirs, strict=True)):
        assert mine["lr"] == reference_step["lr"], k
        for name in reference_step.keys() - {"lr"}:
            for got, expected in zip(mine[name], reference_step[name], strict=True):
                torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"step {k} {name}")
    # the weights move at every step, the double step included (it reads the same gradients)
    first = next(n for n in ours[0] if n != "lr")
    assert torch.equal(ours[3][first][1], ours[4][first][1])
    assert not torch.equal(ours[3][first][0], ours[4][first][0])


@pytest.mark.parametrize("step_every_batch", [False, True])
def test_a_fit_interrupted_between_epochs_with_a_dropped_group_resumes_exactly(tiny_dataset, tmp_path,
                                                                              step_every_batch):
    # 48 samples in batches of 10, groups of 2: every epoch ends with a batch whose gradient is
    # dropped (step_every_batch: stepped on, then dropped), and the schedule counts 2 steps an
    # epoch (step_every_batch: 7)
    def trainer() -> Trainer:
        seed_everything(3)
        model = create_model("text_only", {**FEATURES, "dropout": 0.3}, tiny_dataset.dims)
        config = TrainConfig(epochs=4, batch_size=10, accumulate_steps=2, lr=1e-2, device="cpu",
                             warmup_ratio=0.3, schedule="linear", grad_clip_value=0.05, patience=None,
                             state_every=1, step_every_batch=step_every_batch)
        return Trainer(model, config, "mosi", progress=False)

    straight = trainer()
    straight_fit = straight.fit(tiny_dataset.train, tiny_dataset.valid, seed=3)
    state = tmp_path / "seed-3.state.pt"
    fit_until_interrupted(trainer(), tiny_dataset, 3, state, 2)
    resumed = trainer()
    resumed_fit = resumed.fit(tiny_dataset.train, tiny_dataset.valid, seed=3, state_file=state)
    assert_same_fit(straight, straight_fit, resumed, resumed_fit)


def test_accumulating_more_batches_than_an_epoch_has_is_refused(tiny_dataset):
    trainer = _trainer(tiny_dataset, batch_size=16, accumulate_steps=4)
    with pytest.raises(MsakitError, match=r"accumulate_steps=4 .* \(3 of 16 from 48 training samples\)"):
        trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=1)


@pytest.mark.parametrize(("key", "value"), [("grad_clip_value", -1), ("grad_clip_value", "big"),
                                            ("accumulate_steps", 0), ("accumulate_steps", 1.5),
                                            ("step_every_batch", "yes")])
def test_bad_gradient_settings_are_named(key, value):
    with pytest.raises(MsakitError, match=f"training.{key} must be"):
        TrainConfig(**{key: value})


def test_step_every_batch_refuses_fp16():
    with pytest.raises(MsakitError, match="training.step_every_batch needs precision fp32 or bf16"):
        TrainConfig(step_every_batch=True, precision="fp16")


def test_fp16_clips_the_scaled_gradients_as_the_unscaled_ones_and_keeps_overflow_visible():
    precision = MixedPrecision("fp32", torch.device("cpu"))
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    param = nn.Parameter(torch.zeros(5))
    true_gradient = torch.tensor([-3.0, -0.2, 0.0, 0.7, 1e-3])
    param.grad = true_gradient * 2.0**10
    precision.clip_values([param], 0.5)
    torch.testing.assert_close(param.grad / 2.0**10, true_gradient.clamp(-0.5, 0.5), rtol=0, atol=0)
    param.grad = torch.tensor([1.0, float("inf"), 1e9, 0.0, 0.0])
    precision.clip_values([param], 0.5)
    assert torch.isinf(param.grad[1]) and param.grad[2] == 1e9  # left for the scaler to skip the step


def _grouped(dataset, groups: tuple[ParameterGroup, ...]):
    model = create_model("text_only", FEATURES, dataset.dims)
    model.parameter_groups = lambda: groups
    return model


def test_the_models_groups_reach_the_optimiser_with_their_rates(tiny_dataset):
    first_layer = next(n for n, _ in _grouped(tiny_dataset, ()).named_parameters()).rsplit(".", 1)[0]
    group = ParameterGroup("first", (first_layer + ".",), lr=5e-3, weight_decay=0.02)
    model = _grouped(tiny_dataset, (group,))
    config = TrainConfig(lr=1e-3, weight_decay=0.1, decay_norms_and_biases=True)
    optimizer = build_optimizer(model, config)
    names = {id(p): n for n, p in model.named_parameters()}
    rates = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert set(rates) == set(names.values())
    for name, rate in rates.items():
        assert rate == ((5e-3, 0.02) if name.startswith(first_layer + ".") else (1e-3, 0.1)), name
    # a later stage's rate replaces the rest's, not a group's own
    set_stage_rates(optimizer, config, Stage(name="b", epochs=1, lr=1e-4))
    assert sorted(g["lr"] for g in optimizer.param_groups) == [1e-4, 5e-3]
    # a group without a rate of its own follows training.lr (and the stage's)
    model = _grouped(tiny_dataset, (ParameterGroup("first", (first_layer + ".",), weight_decay=0.0),))
    optimizer = build_optimizer(model, config, lr=2e-3)
    assert sorted((g["lr"], g["weight_decay"]) for g in optimizer.param_groups) == [(2e-3, 0.0), (2e-3, 0.1)]


def test_a_group_that_names_no_parameter_is_refused(tiny_dataset):
    model = _grouped(tiny_dataset, (ParameterGroup("audio", ("audio_net.",), lr=1e-3),))
    with pytest.raises(MsakitError, match="optimiser group 'audio' holds no parameter"):
        build_optimizer(model, TrainConfig())


def _data():
    return synthetic_dataset(n_train=48, n_valid=16, n_test=24, text_len=16, audio_len=40, audio_dim=5,
                             vision_len=30, vision_dim=20, text_dim=32, seed=0)


def _accumulated_epoch(clip_value: float | None) -> dict[str, torch.Tensor]:
    """text_only's weights after one epoch in groups of 2 batches of 10 (the fifth batch dropped), by
    plain gradient descent (AdamW would turn rounding noise into steps), on as many processes as
    the open process group has."""
    data = _data()
    seed_everything(0)
    model = create_model("text_only", FEATURES, data.dims)
    config = TrainConfig(batch_size=10, accumulate_steps=2, grad_clip_value=clip_value, device="cpu")
    trainer = Trainer(model, config, data.metric_family, progress=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer.train_epoch(data.train, optimizer, scheduler, torch.Generator().manual_seed(0), epoch=1)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rank(rank: int, init_file: str, out_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    weights = [_accumulated_epoch(clip) for clip in (None, 2e-2)]
    if rank == 0:
        torch.save(weights, out_file)
    distributed.close()


@pytest.mark.slow  # two spawned processes, each importing torch and msakit
def test_two_ranks_accumulate_and_clip_as_one_process(tmp_path):
    """Without a clip by value the ranks average only before each step (DDP's no_sync in between);
    with one, after every backward pass, so the clip sees the whole batch's gradient, as one
    process's does."""
    files = (str(tmp_path / "init"), str(tmp_path / "weights.pt"))
    torch.multiprocessing.spawn(_rank, args=files, nprocs=2)
    ranks = torch.load(tmp_path / "weights.pt")
    for clip, weights in zip((None, 2e-2), ranks, strict=True):
        alone = _accumulated_epoch(clip)
        for name, value in alone.items():
            torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6, msg=f"{clip} {name}")
    assert any(not torch.allclose(a, b) for a, b in zip(ranks[0].values(), ranks[1].values(), strict=True))
