"""Training-time missing data: a batch transform any model can be trained with.

The trainer calls ``noise(batch, epoch)`` on every training batch. Masks come from the same pure,
seeded streams as the evaluation protocols (``msakit.missing.masks``) with the epoch in the key,
so a sample gets a fresh mask every epoch, and the same one for a given (seed, epoch) whatever
the batch size or shuffle order.

Noises are registered by the name `training.noise` gives them: a new noise is one function that
builds it, decorated with `@register_noise("name", uses_rate=...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from msakit.data.schema import MODALITIES, Batch
from msakit.data.tokens import BERT_SPECIAL_IDS, BERT_UNK_ID
from msakit.errors import MsakitError
from msakit.missing.masks import (
    MissingSpec,
    apply_missing,
    drop_within_modalities,
    sample_uniforms,
)


class TrainingNoise(Protocol):
    """A (batch, epoch) -> batch transform applied to training batches only."""

    def __call__(self, batch: Batch, epoch: int) -> Batch: ...


# (rate, seed, unk_id, special_ids) -> the noise
NoiseBuilder = Callable[[float, int, int, tuple[int, ...]], TrainingNoise]


@dataclass(frozen=True)
class _Registered:
    build: NoiseBuilder
    uses_rate: bool  # False: the noise draws its own rates and `training.noise_rate` must stay 0


_NOISES: dict[str, _Registered] = {}


def register_noise(name: str, uses_rate: bool) -> Callable[[NoiseBuilder], NoiseBuilder]:
    """Register a builder under `training.noise: name`; `uses_rate`: it reads `training.noise_rate`."""
    def decorate(build: NoiseBuilder) -> NoiseBuilder:
        if name in _NOISES or name == "none":
            raise ValueError(f"training noise {name!r} is registered twice")
        _NOISES[name] = _Registered(build, uses_rate)
        return build

    return decorate


def list_noises() -> list[str]:
    """The values `training.noise` accepts, "none" first, then in registration order."""
    return ["none", *_NOISES]


@dataclass(frozen=True)
class LNLNNoise:
    """LNLN's training noise: intra-modal dropping at a random rate per sample and modality.

    For each (sample, modality): with probability 1/2 the entry is clean (r = 0), otherwise
    r ~ U(0, 1); then tokens/frames are dropped as in the "intra" protocol at that r.

    Deviations from the official code: it draws the clean half per modality as exactly
    floor(N / 2) samples of the split; here each (sample, modality) is clean with probability 1/2,
    which keeps the draw per sample. And it reseeds numpy with the run's seed every time it
    rebuilds the masks, so a sample's dropped positions hardly change across epochs; here the
    epoch enters every stream, so rates and masks are resampled each epoch.
    """

    seed: int = 0
    unk_id: int = BERT_UNK_ID
    special_ids: tuple[int, ...] = BERT_SPECIAL_IDS

    def rates(self, ids: Sequence[str], epoch: int) -> dict[str, np.ndarray]:
        """modality -> (B,) the missing rate each sample gets in this epoch (0 = clean)."""
        out = {}
        for modality in MODALITIES:
            u = sample_uniforms("lnln-rate", self.seed, ids, modality, 2, epoch)
            out[modality] = np.where(u[:, 0] < 0.5, 0.0, u[:, 1])
        return out

    def __call__(self, batch: Batch, epoch: int) -> Batch:
        return drop_within_modalities(
            batch, self.rates(batch.ids, epoch), stream="lnln-drop", seed=self.seed,
            epoch=epoch, unk_id=self.unk_id, special_ids=self.special_ids,
        )


@dataclass(frozen=True)
class InterModalNoise:
    """HME's training scheme: inter-modal dropping at missing rate MR, resampled every epoch.

    HME draws one missing matrix per epoch and slices it by batch position; here each sample's
    pattern comes from its own (seed, epoch, sample id) stream.
    """

    rate: float
    seed: int = 0
    unk_id: int = BERT_UNK_ID
    special_ids: tuple[int, ...] = BERT_SPECIAL_IDS

    def __post_init__(self) -> None:
        object.__setattr__(self, "_spec", MissingSpec("inter", rate=self.rate, seed=self.seed))

    def __call__(self, batch: Batch, epoch: int) -> Batch:
        return apply_missing(
            batch, self._spec, unk_id=self.unk_id, special_ids=self.special_ids, epoch=epoch
        )


@register_noise("lnln", uses_rate=False)
def _lnln(rate: float, seed: int, unk_id: int, special_ids: tuple[int, ...]) -> LNLNNoise:
    return LNLNNoise(seed=seed, unk_id=unk_id, special_ids=special_ids)


@register_noise("inter", uses_rate=True)
def _inter(rate: float, seed: int, unk_id: int, special_ids: tuple[int, ...]) -> InterModalNoise:
    return InterModalNoise(rate=rate, seed=seed, unk_id=unk_id, special_ids=special_ids)


def build_noise(
    name: str | None,
    rate: float,
    seed: int,
    *,
    unk_id: int = BERT_UNK_ID,
    special_ids: Sequence[int] = BERT_SPECIAL_IDS,
) -> TrainingNoise | None:
    """The training noise named by ``training.noise`` (one of `list_noises()`), or None for "none".

    ``unk_id`` and ``special_ids`` come from the tokenizer of the text ids (defaults:
    bert-base-uncased, whose vocabulary MiniLM shares).
    """
    if name is None or name == "none":
        return None
    if name not in _NOISES:
        raise MsakitError(f"unknown training noise {name!r}; expected one of {', '.join(list_noises())}")
    registered = _NOISES[name]
    if registered.uses_rate and not rate:
        raise MsakitError(f"noise {name!r} needs training.noise_rate in (0, 1), e.g. 0.3")
    if not registered.uses_rate and rate:
        raise MsakitError(
            f"training.noise_rate {rate!r} is not used by noise {name!r} "
            "(it draws its own rate per sample); leave it at 0"
        )
    return registered.build(rate, seed, unk_id, tuple(int(i) for i in special_ids))
