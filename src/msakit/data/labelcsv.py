"""Read a transcripts-and-labels CSV (the CMU-MOSI `label.csv` layout) as a text-only dataset.

Columns: `id`, `text`, `label`, `mode` (train/dev/test). MMSA's own label.csv, with `video_id`
and `clip_id` instead of `id` and `valid` for the middle split, is read too. Audio and vision
are absent, so only text models (or text-only protocols) apply; token ids come from the
encoder's tokenizer so that a fine-tuned text encoder can read them.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np

from msakit.data.mmsa import dataset_from_raw
from msakit.data.schema import SPLITS, MultimodalDataset
from msakit.data.tokens import load_tokenizer
from msakit.errors import MsakitError

MODES = {"train": "train", "dev": "valid", "valid": "valid", "test": "test"}


def _ids(row: dict[str, str], has_id: bool) -> str:
    return row["id"] if has_id else f"{row['video_id']}$_${row['clip_id']}"


def parse_label(value: str | None, path: Path, line: int) -> float:
    """A label.csv `label` cell as a finite float; anything else names the file, line and value."""
    raw = (value or "").strip()
    try:
        label = float(raw)
    except ValueError:
        label = math.nan
    if not math.isfinite(label):
        raise MsakitError(f"{path} line {line}: label {raw!r} is not a number")
    return label


def parse_mode(value: str | None, path: Path, line: int) -> str:
    """A label.csv `mode` cell (train, valid or dev, test) as the split it names."""
    mode = (value or "").strip().lower()
    if mode not in MODES:
        raise MsakitError(
            f"{path} line {line}: unknown mode {value!r}; expected one of {', '.join(MODES)}"
        )
    return MODES[mode]


def load_label_csv(
    path: str | os.PathLike[str], tokenizer: str = "minilm", max_len: int = 50
) -> MultimodalDataset:
    """A text-only `MultimodalDataset` (family "mosi") from a label.csv file.

    `tokenizer` names a packaged encoder ("minilm") or a local Hugging Face model folder;
    `text_bert` is padded or truncated to `max_len` tokens with [CLS]/[SEP].
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MsakitError(f"label file not found: {path}")
    if max_len < 3:
        raise MsakitError(f"max_len must be at least 3 tokens, not {max_len}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            has_id = "id" in columns
            needed = ["text", "label", "mode"]
            needed += ["id"] if has_id or "video_id" not in columns else ["video_id", "clip_id"]
            for column in needed:
                if column not in columns:
                    raise MsakitError(
                        f"{path}: no column {column!r} (columns: {', '.join(columns) or 'none'})"
                    )
            rows: dict[str, dict[str, list]] = {
                s: {"id": [], "text": [], "label": []} for s in SPLITS
            }
            seen: dict[str, int] = {}
            for row in reader:
                line = reader.line_num  # as an editor shows it: the header is line 1
                row_id = _ids(row, has_id)
                if row_id in seen:  # as `msakit extract` refuses it
                    raise MsakitError(f"{path} line {line}: clip {row_id!r} already on line {seen[row_id]}")
                seen[row_id] = line
                label = parse_label(row["label"], path, line)
                split = rows[parse_mode(row["mode"], path, line)]
                split["id"].append(row_id)
                split["text"].append(row["text"] or "")
                split["label"].append(label)
    except UnicodeDecodeError as exc:
        raise MsakitError(f"{path} is not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise MsakitError(f"{path}: malformed CSV ({exc})") from None
    for name, split in rows.items():
        if not split["id"]:
            modes = [m for m, s in MODES.items() if s == name]
            raise MsakitError(f"{path} has no rows with mode {' or '.join(modes)}")

    tok = load_tokenizer(tokenizer)
    raw = {}
    for name, split in rows.items():
        encoded = tok(split["text"], padding="max_length", truncation=True, max_length=max_len,
                      return_tensors="np")
        # token_type_ids may be absent for non-BERT tokenizers: all zeros then
        types = encoded.get("token_type_ids", np.zeros_like(encoded["input_ids"]))
        raw[name] = {
            "id": np.array(split["id"], dtype=object),
            "raw_text": np.array(split["text"], dtype=object),
            "text_bert": np.stack(
                [encoded["input_ids"], encoded["attention_mask"], types], axis=1
            ).astype(np.int64),
            "regression_labels": np.array(split["label"], dtype=np.float32),
        }
    name = path.parent.name if path.stem == "label" and path.parent.name else path.stem
    return dataset_from_raw(raw, source=str(path), family="mosi", name=name,
                            family_source="a label.csv (MOSI's label scale)")
