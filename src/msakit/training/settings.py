"""Training settings as data: one dataclass, filled from a model's YAML and `--set` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stage:
    """One stage of a multi-stage recipe: the same loop, run for `epochs` with these changes.

    `model` is handed to the model's `set_stage` hook (e.g. "teacher", "student"); `lr` overrides
    the learning rate for this stage when given.
    """

    name: str
    epochs: int
    lr: float | None = None


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float = 1e-3
    encoder_lr: float = 5e-5  # for the pretrained text encoder's weights
    weight_decay: float = 0.0
    encoder_weight_decay: float = 0.01
    warmup_ratio: float = 0.0  # fraction of all optimiser steps spent warming up linearly
    schedule: str = "constant"  # constant | linear | cosine (after warm-up)
    grad_clip: float | None = None  # max global gradient norm; None = no clipping
    loss: str = "l1"  # task loss: l1 | mse
    patience: int | None = 8  # epochs without validation improvement before stopping
    select_metric: str = "mae"  # validation metric that picks the checkpoint
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    noise: str = "none"  # training-time missing data: none | lnln | inter (see msakit.missing.noise)
    noise_rate: float = 0.0  # the missing rate of "inter" noise
    stages: list[Stage] = field(default_factory=list)  # empty = one stage of `epochs`

    def __post_init__(self) -> None:
        self.stages = [s if isinstance(s, Stage) else Stage(**s) for s in self.stages]
