"""One media file -> its features: the extractors of a `FeatureConfig` run in order on a `Clip`.

`FeaturePipeline.extract` returns a plain dict (arrays, presence, transcript, notes, per-extractor
seconds) that the dataset builder caches and pads, and `predict` turns into a batch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from msakit.features.config import FeatureConfig
from msakit.features.extractors import (
    AcousticFeatures,
    AudioTrack,
    Clip,
    Extractor,
    FaceFeatures,
    TextFeatures,
    Transcript,
    visual_names,
)


def feature_names(config: FeatureConfig) -> dict[str, list[str]]:
    """Column names of the audio and vision frame features, without loading the heavier models."""
    return {"audio": list(AcousticFeatures(config.acoustic).names),
            "vision": list(visual_names(config.visual))}


class FeaturePipeline:
    """The extractors of `config`, built once and run on any number of files."""

    def __init__(self, config: FeatureConfig) -> None:
        self.config = config
        self.acoustic = AcousticFeatures(config.acoustic)
        self.visual = FaceFeatures(config.visual)
        self.text = TextFeatures(config.text)
        self.extractors: list[Extractor] = [
            AudioTrack(config.audio), Transcript(config.transcript), self.text, self.acoustic,
            self.visual,
        ]

    @property
    def dims(self) -> dict[str, int]:
        return {"text": self.text.width, "audio": len(self.acoustic.names),
                "vision": len(self.visual.names), "text_len": self.config.text.max_tokens}

    def extract(self, path: str | Path, text: str | None = None) -> dict[str, Any]:
        """Features of one media file; `text` is its given transcript, if any.

        Raises MediaError for a file that cannot be opened or decoded at all; an absent modality
        (no audio track, silence, no face, no words) is not an error: it is recorded in `present`.
        """
        clip = Clip(path=Path(path), given_text=text)
        seconds = {}
        for extractor in self.extractors:
            start = time.perf_counter()
            extractor(clip)
            seconds[extractor.name] = time.perf_counter() - start
        return {
            "path": str(clip.path),
            "duration": clip.duration,
            "transcript": clip.transcript,
            "transcript_source": clip.transcript_source,
            "text_bert": clip.text_ids,
            "text": clip.text,
            "audio": clip.audio,
            "vision": clip.vision,
            "present": dict(clip.present),
            "notes": list(clip.notes),
            "stats": dict(clip.stats),
            "seconds": seconds,
        }
