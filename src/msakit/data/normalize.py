"""Input normalisation as a data setting, and the check that tells when raw features need it.

MMSA and every official implementation feed the pickles' features as they are, and the published
numbers were made that way, so `data.normalize` defaults to "none". Raw features of one's own
(time-averaged COVAREP or OpenFace, values in the thousands next to values near 0.01) can stall or
break a model; `data.normalize: zscore` then standardises each feature dimension of the feature
modalities (precomputed text features, audio, vision) with the mean and standard deviation of the
TRAINING split's valid frames. The statistics travel in the checkpoint, and `evaluate`,
`robustness` and `predict` apply the same ones: test data never feeds them. Padded steps stay 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from msakit.data.schema import MODALITIES, MultimodalDataset, Split
from msakit.errors import MsakitError

NORMALIZE_MODES = ("none", "zscore")
EXTREME_VALUE = 100.0  # max |x| above this: a modality's features are on a raw scale
EXTREME_SPREAD = 1e3  # per-dimension standard deviations spanning more than this factor
_SAMPLE = 2048  # clips read to judge a modality's scale (the whole split when smaller)
_MIN_STD = 1e-8  # a dimension with a smaller spread is only centred


@dataclass
class DataConfig:
    """Settings of the data a model reads. `normalize`: "none" | "zscore" for every feature
    modality, or a mapping of modality ("text", "audio", "vision") to one of those. `label_range`:
    [low, high] every label must lie in (also "LOW,HIGH"); None: the family's ([-3, 3], SIMS [-1, 1])."""

    normalize: str | dict[str, str] = "none"
    label_range: list[float] | None = None

    def __post_init__(self) -> None:
        if self.label_range is not None:
            self.label_range = _label_range(self.label_range)
        modes = self.normalize if isinstance(self.normalize, dict) else dict.fromkeys(MODALITIES,
                                                                                      self.normalize)
        for modality, mode in modes.items():
            if modality not in MODALITIES:
                raise MsakitError(f"data.normalize: unknown modality {modality!r}; "
                                  f"expected {', '.join(MODALITIES)}")
            if mode not in NORMALIZE_MODES:
                raise MsakitError(f"data.normalize must be one of {', '.join(NORMALIZE_MODES)} (or a "
                                  f"mapping of modality to one), not {mode!r}")

    def modes(self) -> dict[str, str]:
        """Modality -> mode, every modality named."""
        if isinstance(self.normalize, dict):
            return {m: self.normalize.get(m, "none") for m in MODALITIES}
        return dict.fromkeys(MODALITIES, self.normalize)


def _label_range(value: Any) -> list[float]:
    """[low, high] from a list of two numbers or "LOW,HIGH"; one-line error otherwise."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        low, high = (float(v) for v in items)
    except (TypeError, ValueError):
        raise MsakitError(f"data.label_range must be LOW,HIGH (two numbers), not {value!r}") from None
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise MsakitError(f"data.label_range must be two finite numbers LOW < HIGH, not {value!r}")
    return [low, high]


def _valid_frames(split: Split, modality: str) -> np.ndarray | None:
    """(N, L) bool of the real steps of a modality's feature array, or None when every step counts."""
    if modality == "text":
        return None if split.text_bert is None else split.text_bert[:, 1] > 0
    lengths = getattr(split, f"{modality}_lengths")
    if lengths is None:
        return None
    steps = getattr(split, modality).shape[1]
    return np.arange(steps) < np.clip(lengths, 1, steps)[:, None]


def _frames(split: Split, modality: str, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
    """The valid steps of `modality` in `rows` as one (frames, D) float64 array."""
    x = getattr(split, modality)[rows]
    valid = _valid_frames(split, modality)
    flat = x.reshape(-1, x.shape[-1]) if valid is None else x[valid[rows]]
    return flat.astype(np.float64)


def fit_normalization(train: Split, config: DataConfig) -> dict[str, dict[str, list[float]]]:
    """Per-dimension mean and std of each z-scored modality over the training split's valid steps."""
    stats = {}
    for modality, mode in config.modes().items():
        if mode != "zscore" or getattr(train, modality) is None:
            continue
        mean, std = _moments(train, modality)
        stats[modality] = {"mean": mean.tolist(), "std": np.where(std < _MIN_STD, 1.0, std).tolist()}
    return stats


def _moments(split: Split, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std over the valid steps, in chunks of clips (a MOSEI split does not
    fit in memory as float64), centred on the first chunk's mean so large offsets do not cancel."""
    n = len(getattr(split, modality))
    shift = count = total = squares = None
    for start in range(0, n, _SAMPLE):
        frames = _frames(split, modality, slice(start, start + _SAMPLE))
        if shift is None:
            shift = frames.mean(axis=0) if len(frames) else np.zeros(frames.shape[-1])
            count, total, squares = 0, np.zeros_like(shift), np.zeros_like(shift)
        frames -= shift
        count += len(frames)
        total += frames.sum(axis=0)
        squares += (frames ** 2).sum(axis=0)
    if not count:
        raise MsakitError(f"data.normalize: the training split has no valid {modality} steps")
    centred = total / count
    return shift + centred, np.sqrt(np.maximum(squares / count - centred ** 2, 0.0))


def normalize_split(split: Split, stats: dict[str, dict[str, list[float]]]) -> Split:
    """A copy of `split` with `stats` applied to its valid steps (padding stays 0)."""
    changes: dict[str, Any] = {}
    for modality, values in stats.items():
        x = getattr(split, modality)
        if x is None:
            raise MsakitError(f"the normalisation was fitted on {modality} features, which this data "
                              "does not have")
        mean = np.asarray(values["mean"], dtype=np.float32)
        std = np.asarray(values["std"], dtype=np.float32)
        if mean.shape != (x.shape[-1],):
            raise MsakitError(f"the normalisation of {modality} has {len(mean)} dims, the data "
                              f"{x.shape[-1]}")
        out = (x - mean) / std
        valid = _valid_frames(split, modality)
        if valid is not None:
            out *= valid[..., None]
        changes[modality] = out.astype(np.float32)
    return replace(split, **changes)


def normalize_dataset(data: MultimodalDataset, stats: dict[str, dict[str, list[float]]]
                      ) -> MultimodalDataset:
    """Every split of `data` with `stats` applied; `data` itself when there is nothing to apply."""
    if not stats:
        return data
    splits = {name: normalize_split(data.split(name), stats) for name in ("train", "valid", "test")}
    return data.derive(**splits)


def scale_warnings(train: Split, config: DataConfig) -> list[str]:
    """One line per modality left raw whose features span extreme scales (max |x| above
    EXTREME_VALUE, or per-dimension standard deviations spanning more than EXTREME_SPREAD),
    suggesting `data.normalize`. Judged on up to _SAMPLE clips of the training split."""
    lines = []
    for modality, mode in config.modes().items():
        scales = _extreme_scales(train, modality) if mode == "none" else None
        if scales is not None:
            lines.append(f"{modality} features are on a raw scale ({scales}): consider --set "
                         "data.normalize=zscore")
    return lines


def raw_scale_modalities(train: Split) -> list[str]:
    """The modalities of `train` whose features span extreme scales (as `scale_warnings` judges)."""
    return [m for m in MODALITIES if _extreme_scales(train, m) is not None]


def _extreme_scales(train: Split, modality: str) -> str | None:
    """What makes `modality`'s features extreme ("max |x| ...; per-dimension std from ... to ..."),
    or None when they are not (or absent)."""
    x = getattr(train, modality)
    if x is None:
        return None
    rows = np.linspace(0, len(x) - 1, min(len(x), _SAMPLE)).astype(np.int64)
    frames = _frames(train, modality, rows)
    if frames.size == 0:
        return None
    largest = float(np.abs(frames).max())
    std = frames.std(axis=0)
    spread = std[std > _MIN_STD] if (std > _MIN_STD).any() else np.ones(1)
    if largest > EXTREME_VALUE or spread.max() / spread.min() > EXTREME_SPREAD:
        return f"max |x| {largest:.3g}; per-dimension std from {spread.min():.2g} to {spread.max():.2g}"
    return None
