"""Text input for every model: precomputed features, or a (fine-tunable) Hugging Face encoder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from msakit.data.schema import Batch, FeatureDims
from msakit.data.tokens import resolve_encoder_path, tokenizer_special_ids
from msakit.errors import MsakitError
from msakit.models.base import ModelConfig, PretrainedBlock


def special_token_ids(config: ModelConfig) -> dict[str, Any]:
    """`unk_id` and `special_ids` of a model's tokenizer, for missing-data masks over token ids.

    Empty for precomputed features (the masks' bert-base-uncased defaults then never matter).
    """
    if config.text_source != "encoder":
        return {}
    return tokenizer_special_ids(config.text_encoder)


# the linear layers of a BERT-style block (attention projections and feed-forward), not the
# pooler: the models read the last hidden states, so adapters there would never be trained
LORA_TARGETS = (r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                r"|intermediate\.dense|output\.dense)")


def with_lora(model: nn.Module, config: ModelConfig) -> nn.Module:
    """`model` with LoRA adapters injected in place (`peft`): only the adapters train."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=LORA_TARGETS, bias="none")
    try:
        model = inject_adapter_in_model(lora, model)
    except ValueError as exc:  # peft's "Target modules ... not found": not a BERT-style encoder
        raise MsakitError(f"model.text_adapter=lora: {str(exc).splitlines()[0]}") from None
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


class TextEncoder(PretrainedBlock):
    """Token-level text states (B, L, D) and their mask, from whichever source the config names."""

    def __init__(self, config: ModelConfig, dims: FeatureDims) -> None:
        super().__init__()
        self.source = config.text_source
        self.finetune = config.finetune_text
        self.model: nn.Module | None = None
        if self.source == "features":
            if dims.text is None:
                raise MsakitError(
                    "text_source='features' but the dataset has no precomputed `text` features; "
                    "use text_source=encoder"
                )
            self.out_dim = dims.text
        elif self.source == "encoder":
            if not dims.has_text_ids:
                raise MsakitError(
                    "text_source='encoder' but the dataset has no `text_bert` token ids; "
                    "use text_source=features"
                )
            from transformers import AutoModel
            from transformers.utils import logging as hf_logging

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            hf_logging.disable_progress_bar()  # one model load is no progress worth a bar
            path = resolve_encoder_path(config.text_encoder)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
            self.out_dim = int(self.model.config.hidden_size)
            if not self.finetune:
                self.model.requires_grad_(False)
            elif config.text_adapter == "lora":
                self.model = with_lora(self.model, config)
        else:
            raise MsakitError(f"text_source must be 'encoder' or 'features', not {self.source!r}")

    def pretrained_parameters(self) -> Iterator[nn.Parameter]:
        """The Hugging Face encoder's weights, its LoRA adapters included (none for precomputed
        features): they train at `training.encoder_lr`."""
        return iter(()) if self.model is None else self.model.parameters()

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.model is None:
            return batch.text, batch.text_mask
        ids = batch.text_ids
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            states = self.model(
                input_ids=ids[:, 0], attention_mask=ids[:, 1], token_type_ids=ids[:, 2]
            ).last_hidden_state
        return states, batch.text_mask

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if self.model is not None and not self.finetune:
            self.model.eval()  # a frozen encoder keeps dropout off
        return self
