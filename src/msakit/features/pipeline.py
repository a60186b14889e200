"""One media file -> its features: the extractors of a `FeatureConfig` run in order on a `Clip`.

`FeaturePipeline.extract` returns a plain dict (arrays, presence, transcript, notes, per-extractor
seconds) that the dataset builder caches and pads, and `predict` turns into a batch. A pipeline for a
model that reads fewer modalities skips their frame features and only reports whether they are there.
With `alignment.unit: word` the audio and vision features are one row per transcript word
(`msakit.features.alignment`), and the dict also holds the timed `words`.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from msakit.data.schema import MODALITIES
from msakit.features.config import FeatureConfig
from msakit.features.extractors import (
    AcousticFeatures,
    AudioTrack,
    Clip,
    Extractor,
    FaceFeatures,
    TextFeatures,
    Transcript,
    VideoTrack,
    WordAverage,
    visual_names,
)


def feature_names(config: FeatureConfig) -> dict[str, list[str]]:
    """Column names of the audio and vision frame features, without loading the heavier models."""
    return {"audio": list(AcousticFeatures(config.acoustic).names),
            "vision": list(visual_names(config.visual))}


class FeaturePipeline:
    """The extractors of `config`, built once and run on any number of files.

    `reads` names the modalities whose features are wanted: without "audio" the acoustic
    descriptors are skipped (the audio track is still decoded, for presence and speech
    recognition); without "vision" the face mesh is skipped and `present["vision"]` only says
    whether the file has a video stream.
    """

    def __init__(self, config: FeatureConfig, reads: Collection[str] = MODALITIES) -> None:
        self.config = config
        self.text = TextFeatures(config.text)
        self.transcript = Transcript(config.transcript, timed=config.word_aligned)
        self.extractors: list[Extractor] = [AudioTrack(config.audio), self.transcript, self.text]
        self.widths: dict[str, int | None] = {"audio": None, "vision": None}  # None: not extracted
        if "audio" in reads:
            acoustic = AcousticFeatures(config.acoustic)
            self.extractors.append(acoustic)
            self.widths["audio"] = len(acoustic.names)
        if "vision" in reads:
            visual = FaceFeatures(config.visual)
            self.extractors.append(visual)
            self.widths["vision"] = len(visual.names)
        else:
            self.extractors.append(VideoTrack())
        if config.word_aligned:
            self.extractors.append(WordAverage(config.text.max_tokens))

    @property
    def dims(self) -> dict[str, int | None]:
        """Widths of the features this pipeline makes (audio / vision: None when not extracted)."""
        return {"text": self.text.width, **self.widths, "text_len": self.config.text.max_tokens}

    def extract(self, path: str | Path, text: str | None = None) -> dict[str, Any]:
        """Features of one media file; `text` is its given transcript, if any.

        Raises MediaError for a file that cannot be opened or decoded at all; an absent modality
        (no audio track, silence, no face, no words) is not an error: it is recorded in `present`.
        """
        return self._run(Clip(path=Path(path), given_text=text), self.extractors)

    def extract_text(self, text: str) -> dict[str, Any]:
        """The text features of a transcript alone (no media: audio and vision absent)."""
        clip = Clip(path=Path(), given_text=text, transcript=text.strip(), transcript_source="given")
        clip.notes.append("audio, vision: no media file")
        return self._run(clip, [self.text])

    @staticmethod
    def _run(clip: Clip, extractors: list[Extractor]) -> dict[str, Any]:
        seconds = {}
        for extractor in extractors:
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
            **({"words": [list(word) for word in clip.words]} if clip.words is not None else {}),
            "notes": list(clip.notes),
            "stats": dict(clip.stats),
            "seconds": seconds,
        }
