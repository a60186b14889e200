"""Cues without a network: a deterministic description of each clip's features, in words.

This is not an MLLM watching the video. Per modality it summarises the clip's valid frames
(intensity: how far its feature means sit from the typical training clip; variability within the
clip; change from frame to frame) and names the features furthest from the training mean, each put
into words by where the value falls among the training clips ("very low" ... "very high"). Visual
cues describe the vision features; language cues quote the transcript, describe the audio features
(the voice) and, for training clips only, state the annotated label, as MMSLF's MLLM is shown it.
Feature names come from a `msakit extract` pickle (face geometry, openSMILE descriptors); MMSA
pickles have none, so their features are numbered.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from msakit.cues.backend import CueFailure, CueSample, label_phrase, signed_number
from msakit.cues.cache import CueRecord
from msakit.data.schema import MODALITIES, MultimodalDataset, Split

OFFLINE_VERSION = "descriptors-1"
# training-split quantiles bounding the five words; "moderate" is the middle 40%
QUANTILES = (0.1, 0.3, 0.7, 0.9)
LEVELS = ("very low", "low", "moderate", "high", "very high")
STANDS_OUT = 1.0  # a feature is named when its clip mean is this many training stds from the mean
_CHUNK = 128  # clips per step, to bound the float64 temporaries
# openSMILE eGeMAPS descriptors that have a plain name
_PLAIN_NAMES = {
    "Loudness_sma3": "loudness", "F0semitoneFrom27.5Hz_sma3nz": "pitch", "jitterLocal_sma3nz": "jitter",
    "shimmerLocaldB_sma3nz": "shimmer", "HNRdBACF_sma3nz": "voice clarity (HNR)",
    "alphaRatio_sma3": "alpha ratio", "hammarbergIndex_sma3": "Hammarberg index",
    "spectralFlux_sma3": "spectral flux",
}
_WHAT = {"audio": ("Voice (acoustic features)", "No audio was recorded for this clip."),
         "vision": ("Face (visual features)", "No face frames were recorded for this clip.")}


@dataclass(frozen=True)
class _Stats:
    """Per-clip summaries of one modality of one split."""

    present: np.ndarray  # (N,) bool
    means: np.ndarray  # (N, D) feature means over the clip's valid frames
    spread: np.ndarray  # (N, D) standard deviations over those frames
    change: np.ndarray  # (N, D) mean absolute change between consecutive valid frames


def _frame_stats(split: Split, modality: str) -> _Stats:
    features = getattr(split, modality)
    n, steps, width = features.shape
    lengths = getattr(split, f"{modality}_lengths")
    lengths = np.full(n, steps) if lengths is None else np.clip(np.asarray(lengths), 0, steps)
    present = lengths > 0
    if split.presence is not None:
        present &= split.presence[:, MODALITIES.index(modality)]
    means, spread, change = (np.zeros((n, width)) for _ in range(3))
    for start in range(0, n, _CHUNK):
        part = slice(start, start + _CHUNK)
        x = features[part].astype(np.float64)
        count = lengths[part]
        valid = (np.arange(steps) < count[:, None])[..., None]
        frames = np.maximum(count, 1)[:, None]
        means[part] = (x * valid).sum(1) / frames
        spread[part] = np.sqrt((((x - means[part][:, None]) ** 2) * valid).sum(1) / frames)
        steps_valid = valid[:, 1:] & valid[:, :-1]
        change[part] = (np.abs(np.diff(x, axis=1)) * steps_valid).sum(1) / np.maximum(count - 1, 1)[:, None]
    return _Stats(present, means, spread, change)


class _Reference:
    """What a typical training clip looks like for one modality, and where the quantile words fall."""

    def __init__(self, train: _Stats, names: Sequence[str] | None) -> None:
        means = train.means[train.present]
        if len(means) == 0:
            means = np.zeros((1, train.means.shape[1]))
        self.centre = means.mean(0)
        std = means.std(0)
        self.usable = std > 1e-8  # features constant over the training clips say nothing
        self.scale = np.where(self.usable, std, 1.0)
        self.feature_cuts = np.quantile(means, QUANTILES, axis=0)  # (4, D)
        self.summary_cuts = {name: np.quantile(values[train.present] if train.present.any() else values,
                                               QUANTILES)
                             for name, values in self.summaries(train).items()}
        width = len(self.centre)
        self.names = ([_PLAIN_NAMES.get(n, n.replace("_", " ")) for n in names]
                      if names is not None and len(names) == width else None)

    def summaries(self, stats: _Stats) -> dict[str, np.ndarray]:
        """Three numbers per clip, each a mean over the usable features in training-std units."""
        weight = self.usable / max(int(self.usable.sum()), 1)
        return {
            "intensity": (np.abs(stats.means - self.centre) / self.scale) @ weight,
            "variability": (stats.spread / self.scale) @ weight,
            "change over time": (stats.change / self.scale) @ weight,
        }


def _level(value: float, cuts: np.ndarray) -> str:
    return LEVELS[int(np.searchsorted(cuts, value, side="right"))]


class OfflineBackend:
    """Describes the features of the samples of `dataset`; needs no network and no model."""

    name = "offline"
    reads_media = False
    model = OFFLINE_VERSION
    prompt_version = OFFLINE_VERSION

    def __init__(self, dataset: MultimodalDataset, top_features: int = 3) -> None:
        self.dataset = dataset
        self.top_features = top_features
        names = (dataset.features or {}).get("names") or {}
        self._modalities = [m for m in ("audio", "vision") if getattr(dataset.train, m) is not None]
        self._stats: dict[tuple[str, str], _Stats] = {}
        self._reference = {m: _Reference(self._split_stats("train", m), names.get(m))
                           for m in self._modalities}

    def _split_stats(self, split: str, modality: str) -> _Stats:
        key = (split, modality)
        if key not in self._stats:
            self._stats[key] = _frame_stats(self.dataset.split(split), modality)
        return self._stats[key]

    def _modality_text(self, modality: str, sample: CueSample) -> str:
        what, absent = _WHAT[modality]
        if modality not in self._modalities:
            return f"The dataset has no {modality} features."
        stats = self._split_stats(sample.split, modality)
        i = sample.index
        if not stats.present[i]:
            return absent
        reference = self._reference[modality]
        if not reference.usable.any():
            return f"{what}: recorded, but no feature varies across the training clips to compare with."
        clip = _Stats(stats.present[i:i + 1], stats.means[i:i + 1], stats.spread[i:i + 1],
                      stats.change[i:i + 1])
        levels = ", ".join(f"{name} {_level(float(values[0]), reference.summary_cuts[name])}"
                           for name, values in reference.summaries(clip).items())
        z = np.where(reference.usable, (stats.means[i] - reference.centre) / reference.scale, 0.0)
        order = np.argsort(-np.abs(z), kind="stable")[: self.top_features]
        notable = []
        for d in order:
            if abs(z[d]) < STANDS_OUT:
                break
            name = reference.names[d] if reference.names else f"{modality} feature {d}"
            word = _level(float(stats.means[i, d]), reference.feature_cuts[:, d])
            notable.append(f"{name} {word} ({signed_number(round(float(z[d]), 1))} sd)")
        standout = (f"Furthest from the typical training clip: {', '.join(notable)}." if notable
                    else "No single feature stands out from the typical training clip.")
        return f"{what}: {levels}. {standout}"

    def cues(self, sample: CueSample) -> CueRecord:
        """The record of one sample (the same sample always gets the same text)."""
        visual = self._modality_text("vision", sample)
        transcript = (sample.transcript or "").strip()
        language = [f'Transcript: "{transcript}".' if transcript else "No transcript is available.",
                    self._modality_text("audio", sample)]
        if sample.label is not None:
            language.append(f"The annotated sentiment is {label_phrase(sample.label, sample.family)}.")
        return CueRecord(sample.id, sample.split, self.name, self.model, self.prompt_version, visual,
                         " ".join(language))

    def describe(self, samples: Sequence[CueSample]) -> Iterator[CueRecord | CueFailure]:
        for sample in samples:
            yield self.cues(sample)
