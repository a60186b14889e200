"""What a dataset must satisfy before any number is computed on it, checked once per load.

`validate_splits` runs in `dataset_from_raw`, so every source (pickle, label.csv, synthetic) gets
it. Each problem class is one line naming the split, the key and the first offending id and value.
Problems that make every number meaningless are errors (one MsakitError holding all of their
lines): ids repeated within a split or shared between splits (leakage), audio or vision without
frames or feature dims, lengths outside [1, L]. The rest are warnings, returned for the dataset to
carry into results.json: a clip with no modality present, a clip whose features are all zeros, a
transcript without a token, a split whose labels are all equal.

Two checks need a run's settings and are called once those are resolved: labels outside the
family's range (`check_labels`; `data.label_range` widens it) and token ids outside the text
encoder's vocabulary (`check_token_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from msakit.data.schema import SPLITS, MultimodalDataset, Split
from msakit.errors import MsakitError
from msakit.metrics import metric_family

# labels lie in [-r, r], by metric family: MOSI/MOSEI and anything scored like them on the 7-point
# scale, SIMS and SIMS v2 on [-1, 1]
FAMILY_LABEL_RANGE = {"mosi": 3.0, "sims": 1.0}
_CHUNK = 512  # clips per step when scanning features, to bound the temporary arrays


def _first(split: Split, rows: np.ndarray, values: np.ndarray | None = None) -> str:
    """`id 'x'` (and `value v`) of the first True row of `rows`."""
    i = int(np.flatnonzero(rows)[0])
    text = f"id {split.ids[i]!r}"
    return text if values is None else f"{text}, value {values[i]:g}"


def _where(name: str, key: str) -> str:
    return f"split {name!r}, key {key!r}"


def _id_problems(splits: dict[str, Split]) -> list[str]:
    lines = []
    for name, split in splits.items():
        unique, first, counts = np.unique(split.ids.astype(str), return_index=True, return_counts=True)
        if (counts > 1).any():
            repeated = unique[counts > 1]
            lines.append(f"{_where(name, 'id')}: {int((counts - 1)[counts > 1].sum())} repeated id(s) "
                         f"(first: {repeated[np.argmin(first[counts > 1])]!r})")
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            shared = np.intersect1d(splits[a].ids.astype(str), splits[b].ids.astype(str))
            if len(shared):
                lines.append(f"splits {a!r} and {b!r} share {len(shared)} id(s), so one scores what the "
                             f"other trained or selected on (first: {shared[0]!r})")
    return lines


def _shape_problems(name: str, split: Split) -> list[str]:
    lines = []
    for key in ("audio", "vision", "text"):
        x = getattr(split, key)
        if x is not None and (x.shape[1] == 0 or x.shape[2] == 0):
            lines.append(f"{_where(name, key)}: shape {x.shape} has no "
                         f"{'frames' if x.shape[1] == 0 else 'feature dims'}")
    if split.text_bert is not None and split.text_bert.shape[2] == 0:
        lines.append(f"{_where(name, 'text_bert')}: shape {split.text_bert.shape} has no tokens")
    return lines


def _length_problems(name: str, split: Split) -> list[str]:
    lines = []
    for modality in ("audio", "vision"):
        key, x = f"{modality}_lengths", getattr(split, modality)
        lengths = getattr(split, key)
        if lengths is None or x is None or x.shape[1] == 0:
            continue
        bad = (lengths < 1) | (lengths > x.shape[1])
        if bad.any():
            lines.append(f"{_where(name, key)}: {int(bad.sum())} length(s) outside [1, {x.shape[1]}], the "
                         f"{modality} steps (first: {_first(split, bad, lengths)})")
    return lines


def _zero_rows(x: np.ndarray) -> np.ndarray:
    """(N,) bool: clips whose every value is 0."""
    out = np.empty(len(x), dtype=bool)
    for start in range(0, len(x), _CHUNK):
        out[start:start + _CHUNK] = ~x[start:start + _CHUNK].any(axis=(1, 2))
    return out


def _warnings(name: str, split: Split) -> list[str]:
    lines = []
    presence = split.presence
    if presence is not None and not presence.any(axis=1).all():
        none = ~presence.any(axis=1)
        lines.append(f"{_where(name, 'presence')}: {int(none.sum())} clip(s) with no modality present, "
                     f"scored on zeros (first: {_first(split, none)})")
    for column, key in enumerate(("text", "audio", "vision")):
        x = getattr(split, key)
        if x is None or 0 in x.shape:
            continue
        zero = _zero_rows(x)
        if presence is not None:
            zero &= presence[:, column]  # an absent modality is zeros on purpose
        if zero.any():
            lines.append(f"{_where(name, key)}: {int(zero.sum())} clip(s) whose features are all zeros "
                         f"(first: {_first(split, zero)})")
    if split.text_bert is not None and split.text_bert.shape[2]:
        empty = ~(split.text_bert[:, 1] > 0).any(axis=1)
        if presence is not None:
            empty &= presence[:, 0]
        if empty.any():
            lines.append(f"{_where(name, 'text_bert')}: {int(empty.sum())} transcript(s) without a token "
                         f"(attention mask all 0; first: {_first(split, empty)})")
    if len(split) > 1 and (split.labels == split.labels[0]).all():
        lines.append(f"{_where(name, 'regression_labels')}: every label is {split.labels[0]:g}, so "
                     "correlation and F1 are undefined")
    return lines


def validate_splits(splits: dict[str, Split], source: str) -> list[str]:
    """Raise one MsakitError with a line per error class; return the warning lines (each
    prefixed with `source`)."""
    errors = _id_problems(splits) + _shape_problems("train", splits["train"])  # shapes agree between splits
    warnings = []
    for name, split in splits.items():
        errors += _length_problems(name, split)
        warnings += _warnings(name, split)
    if errors:
        raise MsakitError(f"{source}: {'; '.join(errors)}")
    return [f"{source}: {line}" for line in warnings]


def label_range(family: str, given: Sequence[float] | None = None) -> tuple[float, float]:
    """The labels' allowed [low, high]: `given` (data.label_range), else the family's."""
    if given is not None:
        return float(given[0]), float(given[1])
    r = FAMILY_LABEL_RANGE[metric_family(family)]
    return -r, r


def check_labels(data: MultimodalDataset, given: Sequence[float] | None = None) -> None:
    """One-line MsakitError when a label (regression or unimodal) lies outside `label_range`:
    scores against labels on another scale mean nothing."""
    low, high = label_range(data.family, given)
    lines = []
    for name in SPLITS:
        split = data.split(name)
        for key, labels in [("regression_labels", split.labels),
                            *((f"regression_labels_{m}", v) for m, v in split.unimodal_labels.items())]:
            bad = (labels < low) | (labels > high)
            if bad.any():
                lines.append(f"{_where(name, key)}: {int(bad.sum())} label(s) outside [{low:g}, {high:g}] "
                             f"(first: {_first(split, bad, labels)})")
    if lines:
        whose = "data.label_range" if given is not None else f"the {data.family} family's label range"
        raise MsakitError(f"{data.source or data.name}: {'; '.join(lines)} ({whose}); if the labels are "
                          "right, give their range with --set data.label_range=LOW,HIGH")


def check_token_ids(data: MultimodalDataset, vocab_size: int, encoder: str) -> None:
    """One-line MsakitError when a `text_bert` token id is not in the text encoder's vocabulary
    [0, vocab_size) (ids made with another tokenizer)."""
    lines = []
    for name in SPLITS:
        split = data.split(name)
        if split.text_bert is None:
            continue
        ids = split.text_bert[:, 0]
        bad = ((ids < 0) | (ids >= vocab_size)).any(axis=1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            value = ids[row][(ids[row] < 0) | (ids[row] >= vocab_size)][0]
            lines.append(f"{_where(name, 'text_bert')}: {int(bad.sum())} clip(s) with token ids outside "
                         f"[0, {vocab_size}) (first: id {split.ids[row]!r}, value {value})")
    if lines:
        raise MsakitError(f"{data.source or data.name}: {'; '.join(lines)}: the vocabulary of text encoder "
                          f"{encoder!r}; were the ids made with another tokenizer?")
