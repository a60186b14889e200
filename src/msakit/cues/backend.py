"""What a cue backend is given (`CueSample`), what it gives back (records or `CueFailure`s), and the
one interface every backend has (`CueBackend`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from msakit.cues.cache import CueRecord
from msakit.metrics import metric_family, sentiment_classes


@dataclass(frozen=True)
class CueSample:
    """One clip to describe. `label` is set for training clips only: the pipeline withholds it
    from valid and test clips, so no backend can leak it into their cues."""

    id: str
    split: str
    index: int  # position in its split
    transcript: str | None
    label: float | None
    family: str  # the dataset's metric family, which fixes the label scale
    media: Path | None = None  # the clip's raw video or audio file, where one was found


@dataclass(frozen=True)
class CueFailure:
    """A sample the backend could not describe, and why; tokens a failed reply still cost."""

    id: str
    split: str
    reason: str
    usage: dict[str, int] | None = None


class CueBackend(Protocol):
    """Writes the cues of samples; `model` and `prompt_version` decide what a resumed run reuses."""

    name: str
    model: str
    prompt_version: str
    reads_media: bool  # whether raw media files (`CueSample.media`) are used

    def describe(self, samples: Sequence[CueSample]) -> Iterator[CueRecord | CueFailure]:
        """One record or failure per sample, in any order, as each is ready."""
        ...


def label_phrase(label: float, family: str) -> str:
    """The label as words on the dataset's scale and as a number, e.g.
    "weakly positive (+0.8 on the 7-point scale from -3 to +3)"."""
    name = sentiment_classes(label, family)["label_name"]
    sims = metric_family(family) == "sims"
    scale = "5-class scale from -1 to +1" if sims else "7-point scale from -3 to +3"
    return f"{name} ({signed_number(label)} on the {scale})"


def signed_number(value: float) -> str:
    """+0.8, -2.4, +1.33, 0: at most two decimals, a sign unless zero."""
    text = f"{value:+.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("+0", "-0") else text
