"""The in-memory shape of a dataset (`Split`, `MultimodalDataset`) and of a model's input (`Batch`).

A `Split` holds one array per MMSA key, shared by every sample of the split: batches are built by
fancy-indexing those arrays, never by copying samples one by one. Any modality may be absent
(`None`), e.g. the text-only MOSI transcripts; models that need it say so when they are built.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from msakit.errors import MsakitError
from msakit.metrics import metric_family

MODALITIES = ("text", "audio", "vision")
SPLITS = ("train", "valid", "test")


@dataclass
class Split:
    """One split (train, valid or test) as parallel arrays of length N."""

    ids: np.ndarray  # (N,) str, "<video>$_$<clip>"
    labels: np.ndarray  # (N,) float32 regression labels
    raw_text: np.ndarray | None = None  # (N,) str
    text: np.ndarray | None = None  # (N, L, Dt) float32 frozen text features
    text_bert: np.ndarray | None = None  # (N, 3, L) int64: input_ids, attention_mask, token_type_ids
    audio: np.ndarray | None = None  # (N, La, Da) float32
    vision: np.ndarray | None = None  # (N, Lv, Dv) float32
    audio_lengths: np.ndarray | None = None  # (N,) int64; None = every frame valid (aligned data)
    vision_lengths: np.ndarray | None = None
    unimodal_labels: dict[str, np.ndarray] = field(default_factory=dict)  # "T"/"A"/"V" -> (N,)
    presence: np.ndarray | None = None  # (N, 3) bool: text, audio, vision recorded; None = all
    domains: np.ndarray | None = None  # (N,) int64 domain index of each sample; None = one domain
    # per-sample inputs a model reads besides the modalities, by name (e.g. MMSLF's "cues": one
    # text per sample, None where the sample has none); attached by the run, never read from files
    # by a model
    side: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Split:
        """A new split with the samples at `index` (copies; used for small subsets only)."""
        changes: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                changes[f.name] = value[index]
        changes["unimodal_labels"] = {k: v[index] for k, v in self.unimodal_labels.items()}
        changes["side"] = {k: v[index] for k, v in self.side.items()}
        return replace(self, **changes)


def concat_splits(splits: Sequence[Split]) -> Split:
    """One split holding the samples of `splits` in order (copies).

    Every split must carry the same arrays with the same per-sample shapes and the same unimodal
    labels; anything else is a MsakitError naming the array.
    """
    if not splits:
        raise MsakitError("concat_splits needs at least one split")
    first = splits[0]
    changes: dict[str, Any] = {}
    for f in fields(first):
        if f.name in ("unimodal_labels", "side"):
            continue
        values = [getattr(s, f.name) for s in splits]
        if all(v is None for v in values):
            continue
        if any(v is None for v in values):
            raise MsakitError(f"cannot join splits: {f.name!r} is missing in some of them")
        shapes = {v.shape[1:] for v in values}
        if len(shapes) > 1:
            raise MsakitError(
                f"cannot join splits: {f.name!r} has different per-sample shapes {sorted(shapes)}"
            )
        changes[f.name] = np.concatenate(values)
    keys = {frozenset(s.unimodal_labels) for s in splits}
    if len(keys) > 1:
        raise MsakitError("cannot join splits: they have different unimodal labels")
    changes["unimodal_labels"] = {
        k: np.concatenate([s.unimodal_labels[k] for s in splits]) for k in first.unimodal_labels
    }
    if len({frozenset(s.side) for s in splits}) > 1:
        raise MsakitError("cannot join splits: they have different side inputs")
    changes["side"] = {k: np.concatenate([s.side[k] for s in splits]) for k in first.side}
    return replace(first, **changes)


@dataclass(frozen=True)
class FeatureDims:
    """Feature sizes and sequence lengths read from the data, never from a config."""

    text: int | None  # width of precomputed text features, None when absent
    audio: int | None
    vision: int | None
    text_len: int | None
    audio_len: int | None
    vision_len: int | None
    has_text_ids: bool  # `text_bert` token ids are available for a fine-tuned encoder

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FeatureDims:
        return cls(**values)


@dataclass
class MultimodalDataset:
    """Three splits plus what is needed to score them.

    `family` picks the metric rules and the per-dataset section of a model's YAML:
    "mosi", "mosei", "sims", "simsv2", "synthetic" or "custom" (both scored with the MOSI rules).
    """

    name: str
    family: str
    train: Split
    valid: Split
    test: Split
    source: str = ""  # file or generator that produced it, for reports
    family_source: str = ""  # how the family was chosen (given, or recognised from the data), for reports
    replaced_nonfinite: int = 0  # -inf/NaN feature values set to 0 on load
    features: dict[str, Any] | None = None  # feature configuration of a `msakit extract` pickle
    warnings: list[str] = field(default_factory=list)  # what validation found, for results.json

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the content of every split's arrays (ids, labels, features, lengths, ...):
        the same data gives the same fingerprint whatever its file is called, one changed value
        gives another. Computed once per dataset object; copies made with `derive` keep it, and a
        pickle's is remembered by its file's size and modification time (`msakit.data.mmsa`)."""
        digest = hashlib.sha1(usedforsecurity=False)  # an identity, not a security measure
        for name in SPLITS:
            split = self.split(name)
            arrays = {f.name: getattr(split, f.name) for f in fields(split)}
            arrays.update({f"unimodal_labels.{k}": v for k, v in arrays.pop("unimodal_labels").items()})
            arrays.update({f"side.{k}": v for k, v in arrays.pop("side").items()})
            for key, array in sorted(arrays.items()):
                if array is None:
                    continue
                array = np.asarray(array)
                digest.update(f"{name}.{key}:{array.dtype.str}:{array.shape};".encode())
                if array.dtype == object:
                    digest.update("\x00".join(map(str, array.ravel().tolist())).encode())
                else:
                    digest.update(np.ascontiguousarray(array).view(np.uint8).ravel())
        return digest.hexdigest()

    def derive(self, **changes: Any) -> MultimodalDataset:
        """A copy with `changes` (normalised splits, side inputs, another family) that keeps this
        dataset's fingerprint: it still identifies the data it was made from."""
        derived = replace(self, **changes)
        derived.__dict__["fingerprint"] = self.fingerprint  # the cached_property's own slot
        return derived

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise MsakitError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, name)

    @property
    def metric_family(self) -> str:
        """"mosi" or "sims": which metric rules score this dataset."""
        return metric_family(self.family)

    @property
    def dims(self) -> FeatureDims:
        s = self.train

        def width(a: np.ndarray | None) -> int | None:
            return None if a is None else int(a.shape[-1])

        def length(a: np.ndarray | None) -> int | None:
            return None if a is None else int(a.shape[1])

        text_len = length(s.text) if s.text is not None else (
            None if s.text_bert is None else int(s.text_bert.shape[-1])
        )
        return FeatureDims(
            text=width(s.text),
            audio=width(s.audio),
            vision=width(s.vision),
            text_len=text_len,
            audio_len=length(s.audio),
            vision_len=length(s.vision),
            has_text_ids=s.text_bert is not None,
        )


@dataclass
class Batch:
    """A model's input: tensors for B samples plus masks saying what is really there.

    Masks are True where a token/frame is valid. `presence` (B, 3) is True where a modality
    (text, audio, vision) is available for that sample; models that ignore it still run on the
    zeroed inputs a missing-modality protocol leaves behind.
    """

    labels: torch.Tensor  # (B,) float
    index: torch.Tensor  # (B,) long: position in the split, the key for per-sample masks
    ids: list[str]
    presence: torch.Tensor  # (B, 3) bool
    text: torch.Tensor | None = None  # (B, L, Dt)
    text_ids: torch.Tensor | None = None  # (B, 3, L) long
    text_mask: torch.Tensor | None = None  # (B, L) bool
    audio: torch.Tensor | None = None  # (B, La, Da)
    audio_mask: torch.Tensor | None = None  # (B, La) bool
    vision: torch.Tensor | None = None  # (B, Lv, Dv)
    vision_mask: torch.Tensor | None = None  # (B, Lv) bool
    unimodal_labels: dict[str, torch.Tensor] = field(default_factory=dict)
    # modality -> (B, L) bool, True where a missing-data protocol dropped that token/frame
    dropped: dict[str, torch.Tensor] = field(default_factory=dict)
    domains: torch.Tensor | None = None  # (B,) long domain index; None = one domain
    side: dict[str, list[Any]] = field(default_factory=dict)  # the split's side inputs, per sample
    # the same samples before training noise, for models whose losses compare noisy and clean input
    # (LNLN); set by the trainer from the batch it already holds, so there is no second read
    clean: Batch | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        changes: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                changes[f.name] = value.to(device, non_blocking=True)
        for name in ("unimodal_labels", "dropped"):
            changes[name] = {
                k: v.to(device, non_blocking=True) for k, v in getattr(self, name).items()
            }
        if self.clean is not None:
            changes["clean"] = self.clean.to(device)
        return replace(self, **changes)

    def with_updates(self, **changes: Any) -> Batch:
        return replace(self, **changes)
