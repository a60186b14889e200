"""Training settings as data: one dataclass, filled from a model's YAML and `--set` overrides."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from msakit.errors import MsakitError

SELECT_PROTOCOLS = ("none", "intra", "inter")  # the protocols a single rate describes
STATE_WRITE_SHARE = 0.05  # at most this share of training time goes to writing the training state
STAGE_STARTS = ("restore_best", "continue")
PRECISIONS = ("fp32", "bf16", "fp16")  # what forward passes compute in (msakit.training.precision)
LOGS = ("none", "tensorboard")  # where each epoch's scalars go besides the log lines
OPTIMIZERS = ("adamw", "adam")  # decoupled weight decay | L2 added to the gradient (torch's Adam)
PLATEAU_KEYS = ("factor", "patience")
# Settings added after runs and studies had been saved, each with the value that trains exactly as
# msakit did before it existed. A run saved without one is the same run as one with it at that value:
# `--resume` continues it, and a study keeps its record (`without_added_settings`).
ADDED_SETTINGS: dict[str, dict[str, Any]] = {
    "training": {"accumulate_steps": 1, "grad_clip_value": None, "step_every_batch": False,
                 "optimizer": "adamw", "plateau": None, "adam_eps": 1e-8,
                 "encoder_decay_norms_and_biases": False},
    "model": {"decay_enhancement_biases": False, "input_norm": "none"},
}


def without_added_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` (sections of settings) without the `ADDED_SETTINGS` that are at their listed value."""
    def kept(section: str, key: str, value: Any) -> bool:
        added = ADDED_SETTINGS.get(section, {})
        return not (key in added and value == added[key])

    return {section: {key: value for key, value in values.items() if kept(section, key, value)}
            if isinstance(values, Mapping) else values for section, values in config.items()}


def comparable_run(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A saved run's identity (`msakit.training.runs.run_meta`) as it is compared before resuming."""
    return {**meta, "config": without_added_settings(meta["config"])} if "config" in meta else dict(meta)


@dataclass
class Stage:
    """One stage of a multi-stage recipe: the same loop, run for `epochs` with these changes.

    `name` is handed to the model's `set_stage` hook (e.g. "teacher", "student"); `lr` and
    `encoder_lr` override the learning rates for this stage when given. `start` says what the stage
    begins from: "restore_best", the previous stage's best-validation weights and a fresh optimizer;
    "continue", the weights and the optimizer (its moments and step counts) exactly as the previous
    stage's last epoch left them, as one uninterrupted run (the schedule starts over for the stage).
    """

    name: str
    epochs: int
    lr: float | None = None
    encoder_lr: float | None = None
    start: str = "restore_best"


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float = 1e-3
    encoder_lr: float = 5e-5  # for the pretrained text encoder's weights
    weight_decay: float = 0.0
    encoder_weight_decay: float = 0.01
    # adamw: torch.optim.AdamW (decoupled decay, w <- w - lr wd w beside the Adam step); adam:
    # torch.optim.Adam, the same groups, rates and decays with the decay as L2 (g <- g + wd w, so
    # it passes through Adam's moments), as MMSA's trainers mostly use it
    optimizer: str = "adamw"
    # eps of either (and of a model's extra phases' optimisers), added to the root of the second
    # moment: w <- w - lr m^ / (sqrt(v^) + eps); torch's default (MMSA's CENet sets its own)
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.0  # fraction of all optimiser steps spent warming up linearly
    schedule: str = "constant"  # constant | linear | cosine (after warm-up)
    # {factor, patience}: torch's ReduceLROnPlateau (mode min, its other defaults) on the main
    # optimizer, stepped once per epoch after validation on the validation MAE: after more than
    # `patience` epochs without a relative improvement of 1e-4, every rate is multiplied by
    # `factor`, on top of the schedule (msakit.training.trainer.step_plateau); null = none
    plateau: dict[str, float] | None = None
    grad_clip: float | None = None  # max global gradient norm; None = no clipping
    # clip each gradient element to [-value, value] after every backward pass (MMSA's
    # clip_grad_value_ for MISA, TFR-Net, MulT); None = no clipping by value
    grad_clip_value: float | None = None
    # batches whose gradients are summed before each optimiser step (MMSA's update_epochs): each
    # batch's loss is its own mean, an epoch's last incomplete group is computed and dropped
    accumulate_steps: int = 1
    # with accumulate_steps: the gradients are still cleared at the start of each group, but the
    # optimiser steps after every batch on the group's running sum and once more on that sum when
    # the group completes (MMSA's TFR-Net trainer); an incomplete last group takes its batches' steps
    step_every_batch: bool = False
    loss: str = "l1"  # task loss: l1 | mse
    patience: int | None = 8  # epochs without validation improvement before stopping
    select_metric: str = "mae"  # validation metric that picks the checkpoint
    # validation scored under missing data when picking it: none | intra | inter, at select_rate
    # (the protocol's r or MR); the masks are drawn once per seed, the same every epoch
    select_protocol: str = "none"
    select_rate: float = 0.0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    noise: str = "none"  # training-time missing data: none | lnln | inter (see msakit.missing.noise)
    noise_rate: float = 0.0  # the missing rate of "inter" noise
    stages: list[Stage] = field(default_factory=list)  # empty = one stage of `epochs`
    # weight-decay the model's own biases and normalisation gains too (the pretrained text
    # encoder's keep the usual exemption, see the next); some official codes decay every parameter
    decay_norms_and_biases: bool = False
    # weight-decay the pretrained text encoder's biases and normalisation gains too, at
    # encoder_weight_decay; some official codes decay every parameter of BERT (MMSA's MMIM, ALMT)
    encoder_decay_norms_and_biases: bool = False
    # how often a resumable run writes its training state: "auto" (whenever the time since the last
    # write is at least STATE_WRITE_SHARE^-1 times what that write took, so writing costs at most
    # about 5% of the training time) or every N epochs
    state_every: int | str = "auto"
    # forward passes (training and evaluation) under autocast in bf16 or fp16 (with loss scaling);
    # weights, optimizer and checkpoints stay fp32
    precision: str = "fp32"
    tf32: bool = True  # fp32 matrix products on TF32 tensor cores, on CUDA GPUs that have them
    compile: bool = False  # torch.compile the model (in place: its weights' names stay)
    # tensorboard: each epoch's training loss, validation metrics and learning rates as TensorBoard
    # scalars in the run folder's tensorboard/seed-<seed>/ (needs tensorboardX, in the study extra)
    log: str = "none"

    def __post_init__(self) -> None:
        if self.state_every != "auto" and (isinstance(self.state_every, bool) or not isinstance(
                self.state_every, int) or self.state_every < 1):
            raise MsakitError(
                f"training.state_every must be auto or an integer >= 1, not {self.state_every!r}")
        for key in ("epochs", "batch_size", "eval_batch_size", "accumulate_steps"):
            _check_number(key, getattr(self, key), integer=True, low=1)
        if self.patience is not None:
            _check_number("patience", self.patience, integer=True, low=1)
        for key in ("lr", "encoder_lr", "weight_decay", "encoder_weight_decay"):
            _check_number(key, getattr(self, key), low=0)
        _check_number("warmup_ratio", self.warmup_ratio, low=0, high=1)
        _check_number("noise_rate", self.noise_rate, low=0, high=1)
        if self.select_protocol not in SELECT_PROTOCOLS:
            raise MsakitError(f"training.select_protocol must be one of {', '.join(SELECT_PROTOCOLS)}, "
                              f"not {self.select_protocol!r}")
        _check_number("select_rate", self.select_rate, low=0, high=1)
        if self.select_rate == 1:
            raise MsakitError("training.select_rate must be below 1 (a missing rate is in [0, 1)), not 1")
        if self.grad_clip is not None:
            _check_number("grad_clip", self.grad_clip, low=0)
        if self.grad_clip_value is not None:
            _check_number("grad_clip_value", self.grad_clip_value, low=0)
        try:
            self.stages = [s if isinstance(s, Stage) else Stage(**s) for s in self.stages]
        except TypeError as exc:
            raise MsakitError(f"training.stages: each stage needs name and epochs ({exc})") from None
        for key in ("decay_norms_and_biases", "encoder_decay_norms_and_biases", "tf32", "compile",
                    "step_every_batch"):
            if not isinstance(getattr(self, key), bool):
                raise MsakitError(f"training.{key} must be true or false, not {getattr(self, key)!r}")
        if self.optimizer not in OPTIMIZERS:
            raise MsakitError(f"training.optimizer must be one of {', '.join(OPTIMIZERS)}, "
                              f"not {self.optimizer!r}")
        _check_number("adam_eps", self.adam_eps, low=0, high=math.inf, open_bounds=True)
        if self.plateau is not None:
            _check_plateau(self.plateau)
        if self.log not in LOGS:
            raise MsakitError(f"training.log must be one of {', '.join(LOGS)}, not {self.log!r}")
        if self.precision not in PRECISIONS:
            raise MsakitError(f"training.precision must be one of {', '.join(PRECISIONS)}, "
                              f"not {self.precision!r}")
        if self.step_every_batch and self.precision == "fp16":
            raise MsakitError("training.step_every_batch needs precision fp32 or bf16: fp16's loss "
                              "scaling unscales the running gradient sum in place at every step")
        for index, stage in enumerate(self.stages):
            _check_number(f"stages[{stage.name}].epochs", stage.epochs, integer=True, low=1)
            if stage.start not in STAGE_STARTS:
                raise MsakitError(f"training.stages[{stage.name}].start must be one of "
                                  f"{', '.join(STAGE_STARTS)}, not {stage.start!r}")
            if index == 0 and stage.start == "continue":
                raise MsakitError(f"training.stages[{stage.name}].start: continue needs a stage "
                                  "before it; the first stage starts from scratch")
            for key in ("lr", "encoder_lr"):
                if getattr(stage, key) is not None:
                    _check_number(f"stages[{stage.name}].{key}", getattr(stage, key), low=0)


def scale_stages(stages: list[Stage], total: int) -> list[Stage]:
    """The stages with their epochs scaled to `total` in all, in proportion (largest remainders
    round up), at least one each: `--epochs` on a staged model."""
    if not stages:
        return stages
    if isinstance(total, bool) or not isinstance(total, int) or total < len(stages):
        raise MsakitError(f"--epochs {total!r}: the {len(stages)} training.stages need at least "
                          f"{len(stages)} epochs in all (one per stage)")
    whole = sum(s.epochs for s in stages)
    exact = [total * s.epochs / whole for s in stages]
    epochs = [max(1, math.floor(e)) for e in exact]
    while sum(epochs) < total:
        i = max(range(len(epochs)), key=lambda k: exact[k] - epochs[k])
        epochs[i] += 1
    while sum(epochs) > total:  # only when a stage was raised to its one epoch
        i = max((k for k in range(len(epochs)) if epochs[k] > 1), key=lambda k: epochs[k] - exact[k])
        epochs[i] -= 1
    return [dataclasses.replace(s, epochs=n) for s, n in zip(stages, epochs, strict=True)]


def _check_plateau(plateau: object) -> None:
    """One-line error naming `training.plateau` unless it is a mapping {factor in (0, 1), patience
    an integer >= 0}."""
    if not isinstance(plateau, Mapping) or set(plateau) != set(PLATEAU_KEYS):
        raise MsakitError(f"training.plateau must be null or a mapping with the keys "
                          f"{', '.join(PLATEAU_KEYS)}, not {plateau!r}")
    _check_number("plateau.factor", plateau["factor"], low=0, high=1, open_bounds=True)
    _check_number("plateau.patience", plateau["patience"], integer=True, low=0)


def _check_number(
    key: str, value: object, integer: bool = False, low: float | None = None, high: float | None = None,
    *, open_bounds: bool = False,
) -> None:
    """One-line error naming `training.<key>` unless value is a number (an int) in [low, high], or
    in (low, high) with `open_bounds`."""
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value > low if open_bounds else value >= low
    if ok and high is not None:
        ok = value < high if open_bounds else value <= high
    if not ok:
        left, right = ("(", ")") if open_bounds else ("[", "]")
        bounds = (f" {'>' if open_bounds else '>='} {low}" if high is None
                  else f" in {left}{low}, {high}{right}")
        kind = "an integer" if integer else "a number"
        raise MsakitError(f"training.{key} must be {kind}{bounds}, not {value!r}")
