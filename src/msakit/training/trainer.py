"""The one training loop every model uses.

AdamW, or Adam with L2 weight decay (`training.optimizer`; pretrained text-encoder weights, and any
part the model names in `parameter_groups`, get their own learning rate), linear warm-up then a
constant, linear or cosine schedule, optionally times a reduction on a validation plateau
(`training.plateau`, `step_plateau`), optional gradient clipping (by value after every backward
pass, by norm before every step), optional gradient accumulation over several batches per step,
early stopping and checkpoint selection on the VALIDATION split, best weights restored at the end
of each stage. A multi-stage method declares its stages as data (`TrainConfig.stages`); each stage
is this same loop, after `model.set_stage(name)`, and starts either from the previous stage's best
weights with a fresh optimizer or, declared `start: continue`, from its last weights with its
optimizer as it was.
A model may declare extra optimisation phases (`MSAModel.extra_phases`: MMIM's estimators): in every
epoch, before the main pass, the same loop runs a pass per phase on the phase's own loss with an
optimizer of its own over the phase's parameters, which the main optimizer does not hold.
Before and after each epoch the model may look at the whole clean training split
(`on_train_epoch_start`, `on_train_epoch_end`: memory banks and neighbour indexes); models that
compare noisy and clean input get the clean batch as `batch.clean`. Optionally, validation is
scored under a transform (a missing-data protocol) and each of several metrics keeps its own best
epoch (`best_by_metric`, for per-metric checkpoints).
With a state file, everything the loop carries between epochs is saved after each epoch, and a fit
handed an existing state file continues from it: an interrupted run resumes where it stopped and
ends with the same weights as an uninterrupted one, and the state counts the seconds every execution
trained (`state_seconds`). Under torchrun the same loop runs on every process, the model in
DistributedDataParallel (`msakit.training.distributed`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from msakit.data.batching import iterate_batches, training_shards
from msakit.data.schema import Batch, Split
from msakit.errors import MsakitError
from msakit.fileio import atomic_write_bytes
from msakit.metrics import METRIC_KEYS, compute_metrics, is_better
from msakit.models.base import ExtraPhase, MSAModel, ParameterGroup
from msakit.training import distributed
from msakit.training.checkpoint import read_tagged
from msakit.training.precision import MixedPrecision, use_tf32
from msakit.training.settings import STATE_WRITE_SHARE, Stage, TrainConfig, comparable_run

log = logging.getLogger(__name__)

BatchTransform = Callable[[Batch, int], Batch]  # (batch, epoch) -> batch, e.g. training noise
STATE_FORMAT = "msakit-training-state-v2"  # v2: best weights in a file of their own
BEST_FORMAT = "msakit-best-weights-v1"
OPTIMIZER_CLASSES: dict[str, type[torch.optim.Optimizer]] = {  # by `training.optimizer`
    "adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


def select_device(name: str = "auto") -> torch.device:
    """"auto" takes the GPU when there is one and the CPU otherwise (MMSA crashes without CUDA)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MsakitError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MsakitError(f"device {name!r} asked for, but no CUDA GPU is available")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch: model initialisation and dropout then repeat exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """Every global random stream training draws from (dropout, sampling, the seeded libraries)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(state["python"])


def first_difference(saved: Any, given: Any, where: str = "") -> str:
    """'key: <saved> then, <given> now' for the first nested key whose values differ (one-line errors)."""
    if isinstance(saved, dict) and isinstance(given, dict):
        for key in dict.fromkeys([*saved, *given]):  # in the order the settings were written
            if saved.get(key) != given.get(key):
                inner = f"{where}.{key}" if where else str(key)
                return first_difference(saved.get(key), given.get(key), inner)
    return f"{where or 'value'}: {saved!r} then, {given!r} now"


def _is_no_decay(name: str, param: nn.Parameter) -> bool:
    # biases and normalisation gains are not weight-decayed (the usual practice for transformers)
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def build_optimizer(
    model: MSAModel, config: TrainConfig, lr: float | None = None, encoder_lr: float | None = None
) -> torch.optim.Optimizer:
    """AdamW, or Adam (`config.optimizer`), with groups (pretrained encoder | each of the model's
    `parameter_groups` | rest) x (decayed | not decayed); `lr` and `encoder_lr` replace the
    config's rates when given (a stage's own), except for a model's group with a rate of its own.
    Biases and norms are not decayed, except the model's own with `decay_norms_and_biases` (or as
    its group says) and the pretrained encoder's with `encoder_decay_norms_and_biases`; every group
    steps with `adam_eps`.
    AdamW decays decoupled from the gradient, w <- (1 - lr wd) w before the Adam step; Adam adds
    wd w to the gradient (L2), so the decay is scaled by Adam's moments as the gradient is."""
    pretrained = {id(p) for p in model.pretrained_parameters()}
    phase_owned = {id(p) for phase in model.extra_phases() for p in phase_parameters(model, phase)}
    base_lr = config.lr if lr is None else lr
    encoder_lr = config.encoder_lr if encoder_lr is None else encoder_lr
    own_group = {id(p): group for group in model.parameter_groups()
                 for p in group_parameters(model, group, pretrained | phase_owned)}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in phase_owned:
            is_pretrained = id(param) in pretrained
            own = None if is_pretrained else own_group.get(id(param))
            kind = "encoder" if is_pretrained else "" if own is None else own.name
            if is_pretrained:
                decay_all = config.encoder_decay_norms_and_biases
            elif own is not None and own.decay_norms_and_biases is not None:
                decay_all = own.decay_norms_and_biases
            else:
                decay_all = config.decay_norms_and_biases
            no_decay = _is_no_decay(name, param) and not decay_all
            groups.setdefault((kind, no_decay), []).append(param)
    declared = {group.name: group for group in own_group.values()}
    param_groups = []
    for (kind, no_decay), params in groups.items():
        own = declared.get(kind)
        if kind == "encoder":
            rate, decay = encoder_lr, config.encoder_weight_decay
        elif own is not None:
            rate = base_lr if own.lr is None else own.lr
            decay = config.weight_decay if own.weight_decay is None else own.weight_decay
        else:
            rate, decay = base_lr, config.weight_decay
        param_groups.append({
            "params": params,
            "lr": rate,
            "weight_decay": 0.0 if no_decay else decay,
            # which rate a continued stage sets (`set_stage_rates`); a model's group with a rate of
            # its own keeps it
            "pretrained": kind == "encoder",
            "own_lr": own is not None and own.lr is not None,
        })
    if not param_groups:
        raise MsakitError("the model has no trainable parameters")
    return OPTIMIZER_CLASSES[config.optimizer](param_groups, eps=config.adam_eps)


def group_parameters(model: MSAModel, group: ParameterGroup, elsewhere: set[int]) -> list[nn.Parameter]:
    """The trainable parameters a model's optimiser group holds (none of `elsewhere`, the pretrained
    weights and the extra phases' parameters)."""
    named = [p for name, p in model.named_parameters() if name.startswith(group.parameters)]
    if not named:
        raise MsakitError(f"{model.registry_name}: the optimiser group {group.name!r} holds no "
                          f"parameter (none is named {', '.join(group.parameters)}...)")
    return [p for p in named if p.requires_grad and id(p) not in elsewhere]


def phase_parameters(model: MSAModel, phase: ExtraPhase) -> list[nn.Parameter]:
    """The trainable parameters an extra optimisation phase of `model` steps."""
    params = [p for name, p in model.named_parameters()
              if p.requires_grad and name.startswith(phase.parameters)]
    if not params:
        raise MsakitError(f"{model.registry_name}: the optimisation phase {phase.name!r} trains no "
                          f"parameter (none named {', '.join(phase.parameters)}... trains)")
    return params


def build_phase_optimizers(
    model: MSAModel, optimizer: str = "adamw", eps: float = 1e-8
) -> dict[str, torch.optim.Optimizer]:
    """One optimizer (`training.optimizer`'s kind: AdamW or Adam, at `training.adam_eps`) per extra
    optimisation phase of `model`, by phase name (`MSAModel.extra_phases`)."""
    return {phase.name: OPTIMIZER_CLASSES[optimizer](phase_parameters(model, phase), lr=phase.lr,
                                                     weight_decay=phase.weight_decay, eps=eps)
            for phase in model.extra_phases()}


def set_stage_rates(optimizer: torch.optim.Optimizer, config: TrainConfig, stage: Stage) -> None:
    """Give an optimizer carried over into `stage` that stage's learning rates (the schedule built
    next scales them from there)."""
    for group in optimizer.param_groups:
        if group.get("own_lr"):
            continue
        own = stage.encoder_lr if group["pretrained"] else stage.lr
        default = config.encoder_lr if group["pretrained"] else config.lr
        group["lr"] = group["initial_lr"] = default if own is None else own


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(round(config.warmup_ratio * total_steps))
    if config.schedule not in ("constant", "linear", "cosine"):
        raise MsakitError(
            f"unknown schedule {config.schedule!r}; use constant, linear or cosine"
        )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_plateau(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.ReduceLROnPlateau | None:
    """`training.plateau`'s ReduceLROnPlateau on `optimizer` (mode min, torch's relative threshold
    1e-4, no cooldown, no floor), or None without one."""
    if config.plateau is None:
        return None
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.plateau["factor"], patience=config.plateau["patience"])


def step_plateau(
    plateau: torch.optim.lr_scheduler.ReduceLROnPlateau, scheduler: torch.optim.lr_scheduler.LambdaLR,
    valid_mae: float,
) -> bool:
    """Step `plateau` on an epoch's validation MAE; returns whether it lowered the rates.

    ReduceLROnPlateau multiplies a group's current rate by `factor` once more than `patience`
    epochs in a row have not improved on the best MAE by 1e-4 of it (torch skips a group whose
    rate would fall by 1e-8 or less). The schedule (`build_scheduler`) sets every rate from its
    base rate at each step, which would undo that; its base rate of each lowered group is
    multiplied by `factor` too, so the rate is base x schedule(step) x factor^reductions: the
    plateau multiplies the warm-up and schedule's factor. With a constant schedule and no warm-up
    the rates are exactly those of a bare ReduceLROnPlateau (MMSA's MulT, MMIM and TFR-Net)."""
    before = [group["lr"] for group in plateau.optimizer.param_groups]
    plateau.step(valid_mae)
    lowered = False
    for index, (group, rate) in enumerate(zip(plateau.optimizer.param_groups, before, strict=True)):
        if group["lr"] != rate:
            scheduler.base_lrs[index] *= plateau.factor
            lowered = True
    return lowered


def task_loss(name: str) -> nn.Module:
    losses = {"l1": nn.L1Loss(), "mse": nn.MSELoss()}
    if name not in losses:
        raise MsakitError(f"unknown loss {name!r}; use {' or '.join(losses)}")
    return losses[name]


@dataclass
class EpochRecord:
    stage: str
    epoch: int
    train_loss: float
    valid: dict[str, float]
    improved: bool


# an epoch's record, its number over all stages (resumed runs included), the groups' learning rates
EpochObserver = Callable[[EpochRecord, int, list[float]], None]


@dataclass
class Snapshot:
    """The weights (on the CPU) of the epoch that scored best on one validation metric."""

    epoch: int
    valid: dict[str, float]
    state: dict[str, torch.Tensor]


@dataclass
class FitResult:
    best_valid: dict[str, float]
    best_epoch: int
    epochs_run: int
    history: list[EpochRecord] = field(default_factory=list)
    stage: str = "main"
    stage_reports: list[Any] = field(default_factory=list)  # what `after_stage` returned, per stage


@dataclass
class _StageLoop:
    """What one stage's loop carries from epoch to epoch (and a state file keeps)."""

    best: FitResult
    best_state: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int
    epoch: int = 0  # epochs of this stage already run
    stale: int = 0
    final_state: dict[str, torch.Tensor] | None = None  # the last epoch's weights, for a stage that continues
    # the optimisers of the model's extra phases (`MSAModel.extra_phases`), by phase name
    phase_optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    # `training.plateau`'s, on `optimizer`, stepped after each epoch's validation
    plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None


def nonfinite_at_initialisation(batch: Batch, losses: dict[str, torch.Tensor]) -> str:
    """Why the very first loss is not finite: the loss terms that are not, and the largest input
    value of each modality (raw feature scales are the usual cause, not the learning rate)."""
    bad = ", ".join(f"{name} {value.item():.3g}" for name, value in losses.items()
                    if not torch.isfinite(value))
    scales = []
    for modality in ("text", "audio", "vision"):
        x, mask = getattr(batch, modality), getattr(batch, f"{modality}_mask")
        if x is not None and x.is_floating_point():
            valid = x[mask] if mask is not None else x
            scales.append(f"{modality} max |x| {valid.abs().max().item() if valid.numel() else 0:.3g}")
    return (f"the loss is not finite at initialisation, before any update ({bad}), so lowering "
            f"training.lr cannot help; input scales: {', '.join(scales)}. Raw features on large "
            "scales are the usual cause: try --set data.normalize=zscore")


def _averaging(model: nn.Module, needed: bool) -> contextlib.AbstractContextManager[Any]:
    """Where a forward and backward pass run: under torchrun (DDP) without averaging the ranks'
    gradients unless `needed` (a step or a clip by value reads them after it); elsewhere as is."""
    if needed or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def best_weight_files(state_file: Path) -> list[Path]:
    """The best-weights files a training state file `state_file` has written beside it."""
    return sorted(state_file.parent.glob(f"{state_file.stem}.best-*.pt"))


def state_seconds(state_file: Path) -> float:
    """The seconds of training a state file carries: every execution's, up to its last write (those
    a killed execution trained after it are trained again and counted then). 0 for a state file
    written before states carried them."""
    return float(read_tagged(state_file, STATE_FORMAT, "training state").get("seconds", 0.0))


class Trainer:
    """Trains one model on one dataset; `fit` then `evaluate` or `predict` any split."""

    def __init__(
        self,
        model: MSAModel,
        config: TrainConfig,
        metric_family: str,
        train_transform: BatchTransform | None = None,
        progress: bool = True,
        valid_transform: Callable[[Batch], Batch] | None = None,
        track_metrics: Sequence[str] = (),
        on_epoch: EpochObserver | None = None,
    ) -> None:
        """`valid_transform` is applied to validation batches before they are scored (e.g. a
        missing-data protocol); `track_metrics` are validation metrics whose best epoch of the last
        stage is kept as its own `Snapshot` in `best_by_metric` (per-metric checkpoints);
        `on_epoch` sees each epoch's record and learning rates once it is validated (TensorBoard
        scalars, a search's pruning: an exception it raises ends the fit)."""
        self.config = config
        if distributed.launched() and not distributed.active():
            raise MsakitError("torchrun started this command as one of several processes, but only "
                              "`msakit train` (without --reproduce) trains on several: run it as one")
        self.device = distributed.rank_device(select_device(config.device))
        if self.device.type == "cpu":
            # values below 1.2e-38 become 0: peaked softmaxes make such denormals, and x86 CPUs
            # compute with them up to 100x slower (MMSLF's modulated attention ran 3x slower)
            torch.set_flush_denormal(True)
        self.model = model.to(self.device)
        use_tf32(self.device, config.tf32)
        self.precision = MixedPrecision(config.precision, self.device)
        if config.precision == "fp16" and model.extra_phases():
            # a phase clips the norm of every gradient, which fp16 unscales only for its optimiser
            raise MsakitError(f"{model.registry_name} trains extra optimisation phases, which "
                              "training.precision=fp16 cannot clip; use bf16 or fp32")
        if config.compile:
            # in place, unlike torch.compile(model): the weights keep their names (checkpoints,
            # training states) and the model keeps its hooks (set_stage, epoch hooks)
            self.model.compile()
        self.metric_family = metric_family
        self.train_transform = train_transform
        self.progress = progress and distributed.is_main()
        self._ddp: tuple[tuple[bool, ...], nn.Module] | None = None  # see `_training_model`
        self.loss_fn = task_loss(config.loss)
        self.valid_transform = valid_transform
        self.track_metrics = tuple(track_metrics)
        self.on_epoch = on_epoch
        self.best_by_metric: dict[str, Snapshot] = {}
        for metric in (config.select_metric, *self.track_metrics):
            if metric not in METRIC_KEYS[metric_family]:
                raise MsakitError(
                    f"select_metric {metric!r} is not a {metric_family} metric; "
                    f"use one of {', '.join(METRIC_KEYS[metric_family])}"
                )

    def stages(self) -> list[Stage]:
        return self.config.stages or [Stage(name="main", epochs=self.config.epochs)]

    def fit(
        self, train: Split, valid: Split, seed: int,
        after_stage: Callable[[FitResult], Any] | None = None,
        state_file: Path | None = None, state_meta: dict[str, Any] | None = None,
    ) -> FitResult:
        """Train every stage; keep, per stage, the weights with the best validation metric.

        `after_stage` sees each stage's result once its best weights are restored (e.g. to score
        a teacher on the test split before the student trains); what it returns is kept in the
        last result's `stage_reports`. The last stage's result is returned.

        With `state_file`, the whole training state (weights, optimizer, schedule, every random
        stream, the best weights so far, history and stage reports) is written there, atomically,
        after every epoch. If the file exists when `fit` starts, training continues from it; it
        must have been written with the same `state_meta` (the caller's settings), else a one-line
        error. The caller removes the file once it has saved what the fit produced.
        """
        generator = torch.Generator().manual_seed(seed)
        self._last_write = None  # (when, seconds) of this fit's last state write
        # the clock's reading when this training would have begun had it run in one execution
        self._began = time.perf_counter()
        history: list[EpochRecord] = []  # its length also numbers epochs across stages for noise
        reports: list[Any] = []
        saved = None
        if state_file is not None and state_file.is_file():
            saved = self._read_state(state_file, state_meta or {})
            history = [EpochRecord(**r) for r in saved["history"]]
            reports = list(saved["reports"])
            generator.set_state(saved["generator"])
            self._began -= saved.get("seconds", 0.0)
            log.info("resuming from %s: stage %s, %d epoch(s) done", state_file,
                     self.stages()[saved["stage_index"]].name, saved["epoch"])
        result = FitResult(best_valid={}, best_epoch=0, epochs_run=0)
        steps_per_epoch = math.ceil(len(train) / self.config.batch_size)
        if steps_per_epoch < self.config.accumulate_steps and not self.config.step_every_batch:
            raise MsakitError(
                f"training.accumulate_steps={self.config.accumulate_steps} sums the gradients of more "
                f"batches than an epoch has ({steps_per_epoch} of {self.config.batch_size} from "
                f"{len(train)} training samples), so no step would be taken; lower it or batch_size")
        stages, previous = self.stages(), None
        for index, stage in enumerate(stages):
            self.model.set_stage(stage.name)
            if saved is not None and index < saved["stage_index"]:
                continue
            resume = saved if saved is not None and index == saved["stage_index"] else None
            loop = self._start_stage(stage, steps_per_epoch, resume, previous)
            save = None if state_file is None else partial(
                self._write_state, state_file, state_meta or {}, index, loop, generator,
                history, reports,
            )
            keep_final = index + 1 < len(stages) and stages[index + 1].start == "continue"
            result = self._fit_stage(stage, loop, train, valid, generator, history, save, keep_final)
            previous = loop
            if after_stage is not None:
                reports.append(after_stage(result))
        result.history = history
        result.stage_reports = reports
        return result

    def _start_stage(
        self, stage: Stage, steps_per_epoch: int, resume: dict[str, Any] | None,
        previous: _StageLoop | None,
    ) -> _StageLoop:
        """A stage's fresh optimizer and schedule; with `start: continue`, the previous stage's last
        weights and its optimizer, at this stage's rates; or everything as `resume` (a state file)
        left it."""
        if stage.start == "continue" and resume is None:
            self.model.load_state_dict(previous.final_state)
            optimizer = previous.optimizer
            set_stage_rates(optimizer, self.config, stage)
            phase_optimizers = previous.phase_optimizers
        else:
            optimizer = build_optimizer(self.model, self.config, stage.lr, stage.encoder_lr)
            phase_optimizers = build_phase_optimizers(self.model, self.config.optimizer,
                                                      self.config.adam_eps)
        # one scheduler step per optimiser step: an epoch's complete groups of accumulated batches
        # (step_every_batch: every batch, and each complete group once more)
        updates_per_epoch = steps_per_epoch // self.config.accumulate_steps
        if self.config.step_every_batch:
            updates_per_epoch += steps_per_epoch
        scheduler = build_scheduler(optimizer, self.config, updates_per_epoch * stage.epochs)
        plateau = build_plateau(optimizer, self.config)  # one per stage, as the schedule
        if resume is None:
            self.best_by_metric = {}
            best = FitResult(best_valid={}, best_epoch=0, epochs_run=0, stage=stage.name)
            return _StageLoop(best, copy.deepcopy(self.model.state_dict()), optimizer, scheduler,
                              steps_per_epoch, phase_optimizers=phase_optimizers, plateau=plateau)
        self.model.load_state_dict(resume["model"])
        self.model.load_training_state(resume["model_extra"])
        optimizer.load_state_dict(resume["optimizer"])
        for name, phase_optimizer in phase_optimizers.items():
            phase_optimizer.load_state_dict(resume["phase_optimizers"][name])
        scheduler.load_state_dict(resume["scheduler"])
        if plateau is not None:  # a state written without one was written with other settings
            plateau.load_state_dict(resume["plateau"])
        if resume.get("scaler"):  # fp16's loss scale; fp32 and bf16 (and states before them) have none
            self.precision.scaler.load_state_dict(resume["scaler"])
        _set_rng_state(resume["rng_by_rank"][distributed.rank()] if "rng_by_rank" in resume
                       else resume["rng"])
        self.best_by_metric = {
            metric: Snapshot(s["epoch"], s["valid"], s["state"])
            for metric, s in resume["best_by_metric"].items()
        }
        best = FitResult(**resume["best"], stage=stage.name)
        return _StageLoop(best, resume["best_state"], optimizer, scheduler, steps_per_epoch,
                          resume["epoch"], resume["stale"], phase_optimizers=phase_optimizers,
                          plateau=plateau)

    def _fit_stage(
        self, stage: Stage, loop: _StageLoop, train: Split, valid: Split,
        generator: torch.Generator, history: list[EpochRecord],
        save: Callable[[], None] | None = None, keep_final: bool = False,
    ) -> FitResult:
        """Run the stage's remaining epochs; `save` is called after each one. The best weights are
        restored at the end; with `keep_final` the last ones are kept in `loop.final_state`."""
        cfg = self.config
        metric = cfg.select_metric
        best = loop.best
        stopped = cfg.patience is not None and loop.stale >= cfg.patience
        with self._progress() as bar:
            task = bar.add_task(f"{stage.name}", total=loop.steps_per_epoch * stage.epochs,
                                completed=loop.steps_per_epoch * loop.epoch)
            while loop.epoch < stage.epochs and not stopped:
                epoch = loop.epoch + 1
                self.model.on_train_epoch_start(len(history) + 1, lambda: self._plain_batches(train))
                train_loss = self.train_epoch(
                    train, loop.optimizer, loop.scheduler, generator, epoch=len(history) + 1,
                    on_step=lambda: bar.advance(task), phase_optimizers=loop.phase_optimizers,
                )
                self.model.on_train_epoch_end(len(history) + 1, lambda: self._plain_batches(train))
                valid_metrics = self.evaluate(valid, self.valid_transform)
                self._track(epoch, valid_metrics)
                improved = is_better(metric, valid_metrics[metric], best.best_valid.get(metric))
                history.append(EpochRecord(stage.name, epoch, train_loss, valid_metrics, improved))
                if self.on_epoch is not None:
                    self.on_epoch(history[-1], len(history),
                                  [group["lr"] for group in loop.optimizer.param_groups])
                if loop.plateau is not None and step_plateau(loop.plateau, loop.scheduler,
                                                             valid_metrics["mae"]):
                    log.info("validation MAE on a plateau: learning rates x %g", loop.plateau.factor)
                log.info(
                    "%s epoch %d/%d  train loss %.4f  valid %s %.4f%s", stage.name, epoch,
                    stage.epochs, train_loss, metric, valid_metrics[metric],
                    "  (best)" if improved else "",
                )
                bar.update(task, description=(
                    f"{stage.name} {epoch}/{stage.epochs} valid {metric} {valid_metrics[metric]:.3f}"
                ))
                best.epochs_run = loop.epoch = epoch
                if improved:
                    loop.stale = 0
                    best.best_valid, best.best_epoch = valid_metrics, epoch
                    loop.best_state = copy.deepcopy(self.model.state_dict())
                else:
                    loop.stale += 1
                    stopped = cfg.patience is not None and loop.stale >= cfg.patience
                    if stopped:
                        log.info("early stop after %d epochs without improvement", loop.stale)
                if save is not None and distributed.from_main(self._state_due(len(history))):
                    started = time.perf_counter()
                    save()
                    finished = time.perf_counter()
                    self._last_write = (finished, finished - started)
        if keep_final:
            loop.final_state = copy.deepcopy(self.model.state_dict())
        self.model.load_state_dict(loop.best_state)
        return best

    def _state_due(self, epochs_done: int) -> bool:
        """Whether the training state is written after this epoch: every `state_every` epochs, or
        ("auto") when the time since the last write is at least 1/STATE_WRITE_SHARE - 1 times what
        that write took (the first epoch of a fit always writes, which measures it)."""
        every = self.config.state_every
        if every != "auto":
            return epochs_done % every == 0
        if self._last_write is None:
            return True
        finished, seconds = self._last_write
        return time.perf_counter() - finished >= seconds * (1 / STATE_WRITE_SHARE - 1)

    def _write_state(
        self, path: Path, meta: dict[str, Any], stage_index: int, loop: _StageLoop,
        generator: torch.Generator, history: list[EpochRecord], reports: list[Any],
    ) -> None:
        # snapshots tracking several metrics share one state dict; torch.save stores it once (so
        # no dataclasses.asdict here, which would deep-copy every tensor). Best weights found at
        # this very epoch are the model's own and stored once; older ones are written to a file of
        # their own once, when they change, and the state names that file. Under torchrun, rank 0
        # writes, with every rank's random streams (each drew dropout for its own samples).
        rng_by_rank = distributed.gather(_rng_state())
        if not distributed.is_main():
            return
        best_file = None
        if loop.best.best_epoch != loop.epoch:
            best_file = path.with_name(f"{path.stem}.best-{stage_index}-{loop.best.best_epoch}.pt")
            if not best_file.is_file():
                atomic_write_bytes(best_file, lambda handle: torch.save(
                    {"format": BEST_FORMAT, "state": loop.best_state}, handle))
        payload = {
            "format": STATE_FORMAT, "meta": meta, "stage_index": stage_index,
            "epoch": loop.epoch, "stale": loop.stale, "seconds": time.perf_counter() - self._began,
            "best": {k: getattr(loop.best, k) for k in ("best_valid", "best_epoch", "epochs_run")},
            "best_file": None if best_file is None else best_file.name, "model": self.model.state_dict(),
            "model_extra": self.model.training_state(),
            "best_by_metric": {m: vars(s) for m, s in self.best_by_metric.items()},
            "optimizer": loop.optimizer.state_dict(), "scheduler": loop.scheduler.state_dict(),
            "plateau": None if loop.plateau is None else loop.plateau.state_dict(),
            "phase_optimizers": {name: o.state_dict() for name, o in loop.phase_optimizers.items()},
            "scaler": self.precision.scaler.state_dict(), "generator": generator.get_state(),
            "rng": rng_by_rank[0], "history": [asdict(r) for r in history], "reports": reports,
            **({"rng_by_rank": rng_by_rank} if len(rng_by_rank) > 1 else {}),
        }
        atomic_write_bytes(path, lambda handle: torch.save(payload, handle))
        for stale in best_weight_files(path):
            if stale != best_file:
                stale.unlink(missing_ok=True)

    def _read_state(self, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
        state = read_tagged(path, STATE_FORMAT, "training state")
        processes = len(state.get("rng_by_rank", [state["rng"]]))
        if processes != distributed.world_size():
            raise MsakitError(f"{path} was written by a training on {processes} process(es), this one "
                              f"runs on {distributed.world_size()}: resume it on {processes} "
                              "(torchrun --nproc_per_node)")
        saved_meta, meta = comparable_run(state["meta"]), comparable_run(meta)
        if saved_meta != meta:
            raise MsakitError(
                f"{path} was written by a run with other settings ({first_difference(saved_meta, meta)}); "
                "remove it to start over"
            )
        if state["stage_index"] >= len(self.stages()):
            raise MsakitError(f"{path} is from stage {state['stage_index'] + 1}, this run has "
                              f"{len(self.stages())}; remove it to start over")
        best_file = state["best_file"]
        state["best_state"] = state["model"] if best_file is None else read_tagged(
            path.with_name(best_file), BEST_FORMAT, "best-weights file")["state"]
        return state

    def _track(self, epoch: int, valid_metrics: dict[str, float]) -> None:
        improved = [
            m for m in self.track_metrics
            if m not in self.best_by_metric
            or is_better(m, valid_metrics[m], self.best_by_metric[m].valid[m])
        ]
        if improved:  # one copy serves every metric that improved at this epoch
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            for m in improved:
                self.best_by_metric[m] = Snapshot(epoch, valid_metrics, state)

    def train_epoch(
        self, split: Split, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator,
        epoch: int, on_step: Callable[[], None] | None = None,
        phase_optimizers: dict[str, torch.optim.Optimizer] | None = None,
    ) -> float:
        """One pass over `split` in a shuffled order for each extra phase of the model
        (`MSAModel.extra_phases`, stepped by `phase_optimizers`), then the main one; returns the
        main pass's mean training loss.

        Under torchrun each rank trains on its share of every batch (`training_shards`) and scales
        its loss by that share times the number of ranks: DDP's mean of the ranks' gradients is
        then the gradient of the whole batch's mean loss, as one process computes it."""
        self.model.train()
        phase_optimizers = phase_optimizers or {}
        every_optimizer = [optimizer, *phase_optimizers.values()]
        for phase in self.model.extra_phases():
            self.model.phase = phase.name
            try:
                self._train_pass(split, phase_optimizers[phase.name], None, generator, epoch,
                                 every_optimizer, share=phase.share)
            finally:
                self.model.phase = "main"
        return self._train_pass(split, optimizer, scheduler, generator, epoch, every_optimizer, on_step)

    def _train_pass(
        self, split: Split, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None, generator: torch.Generator,
        epoch: int, every_optimizer: list[torch.optim.Optimizer],
        on_step: Callable[[], None] | None = None, share: float = 1.0,
    ) -> float:
        """The first `share` of the shuffled batches of `split` on the losses of the model's current
        phase (the task loss too in the main phase); returns the mean loss. Gradients are summed
        over each group of `accumulate_steps` batches (each loss the batch's mean, as MMSA's
        `update_epochs`) and clipped by value after every backward pass, so a group's later
        batches add to gradients already clipped (MMSA's clip_grad_value_ after each
        `loss.backward()`); after the group's last one their norm is clipped and `optimizer` steps.
        The gradients of `every_optimizer` are cleared before each group; those of a last,
        incomplete group are computed and dropped (MMSA's loop never steps on them). With
        `step_every_batch` the norm clip and the step also follow every batch, on the running sum
        (an incomplete group's batches too), and a group's last batch steps twice on it (MMSA's
        TFR-Net trainer)."""
        model, world = self._training_model(), distributed.world_size()
        cfg = self.config
        total, count = 0.0, 0
        batches = math.ceil(share * math.ceil(len(split) / cfg.batch_size))
        for step, (batch, part) in enumerate(training_shards(split, cfg.batch_size, generator,
                                                             (distributed.rank(), world))):
            if step == batches:
                break
            clean = batch
            if self.train_transform is not None:
                batch = self.train_transform(batch, epoch)
            if self.model.needs_clean_input:
                batch = batch.with_updates(clean=clean)
            batch = batch.to(self.device)
            steps_now = step % cfg.accumulate_steps == cfg.accumulate_steps - 1
            if step % cfg.accumulate_steps == 0:
                for each in every_optimizer:
                    each.zero_grad(set_to_none=True)
            # DDP decides at the forward pass whether the backward pass averages the ranks' gradients
            with _averaging(model, steps_now or cfg.grad_clip_value is not None or cfg.step_every_batch):
                loss = self._batch_loss(model, batch, epoch, optimizer)
                self.precision.backward(loss * (part * world))
            if cfg.grad_clip_value is not None:
                self.precision.clip_values(self.model.parameters(), cfg.grad_clip_value)
            for _ in range(int(cfg.step_every_batch) + int(steps_now)):
                self.precision.step(optimizer, self.model.parameters(), cfg.grad_clip)
                if scheduler is not None:
                    scheduler.step()
            samples = len(batch) if part else 0
            total += loss.item() * samples
            count += samples
            if on_step is not None:
                on_step()
        if batches % cfg.accumulate_steps:  # the dropped group's gradients
            for each in every_optimizer:
                each.zero_grad(set_to_none=True)
        distributed.align_buffers(self.model)
        total, count = distributed.total(total, count)
        return total / max(1, count)

    def _batch_loss(self, model: nn.Module, batch: Batch, epoch: int,
                    optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """The fp32 sum of the losses of the model's current phase on `batch` (the task loss too in
        the main phase); a loss that is not finite is a one-line error."""
        with self.precision.autocast():
            output = model(batch)
        terms = dict(output.losses)
        if self.model.phase == "main":  # the task loss in fp32 whatever the forward computed in
            terms = {"task": self.loss_fn(output.pred.float(), batch.labels), **terms}
        if not terms:
            raise MsakitError(f"{self.model.registry_name}: its forward returned no loss in the "
                              f"optimisation phase {self.model.phase!r}")
        first, *rest = terms.values()
        loss = first.float()
        for aux in rest:
            loss = loss + aux.float()
        if not torch.isfinite(loss):
            if epoch == 1 and not optimizer.state:  # no update yet: the rate cannot be the cause
                raise MsakitError(nonfinite_at_initialisation(batch, terms))
            raise MsakitError(f"training diverged at epoch {epoch} (loss {loss.item()}); lower training.lr")
        return loss

    def _training_model(self) -> nn.Module:
        """The model as training steps call it: itself, or under torchrun in DDP, wrapped again
        when a stage has changed which of its parameters train."""
        if not distributed.active():
            return self.model
        trainable = tuple(p.requires_grad for p in self.model.parameters())
        if self._ddp is None or self._ddp[0] != trainable:
            self._ddp = None  # the old wrapper's gradient hooks go with it, before new ones come
            self._ddp = (trainable, distributed.wrap(self.model))
        return self._ddp[1]

    def _plain_batches(self, split: Split) -> Iterator[Batch]:
        for batch in iterate_batches(split, self.config.eval_batch_size):
            yield batch.to(self.device)

    @torch.no_grad()
    def predict(
        self, split: Split, transform: Callable[[Batch], Batch] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Predictions and labels for a split, in file order; `transform` e.g. drops modalities.
        Under torchrun each rank predicts a contiguous part and every rank returns the whole."""
        self.model.eval()
        preds, labels = [], []
        for batch in iterate_batches(split, self.config.eval_batch_size,
                                     part=(distributed.rank(), distributed.world_size())):
            if transform is not None:
                batch = transform(batch)
            with self.precision.autocast():
                output = self.model(batch.to(self.device))
            preds.append(output.pred.float().cpu().numpy())
            labels.append(batch.labels.numpy())
        return distributed.concatenate(preds), distributed.concatenate(labels)

    def evaluate(
        self, split: Split, transform: Callable[[Batch], Batch] | None = None
    ) -> dict[str, float]:
        preds, labels = self.predict(split, transform)
        return compute_metrics(preds, labels, self.metric_family)

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeRemainingColumn(), disable=not self.progress, transient=True,
        )
