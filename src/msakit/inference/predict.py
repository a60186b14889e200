"""Sentiment of new media files, or of transcripts, from a checkpoint or the packaged default model.

Three kinds of model score new input, each loaded once for any number of files:

- A checkpoint trained on a `msakit extract` dataset records its feature configuration; `Predictor`
  extracts with exactly that configuration (only where the transcript comes from may change).
- The packaged default model (`checkpoint=None`, see `msakit.inference.pretrained`) reads the
  transcript only; audio and vision are reported as present or absent, not used.
- A checkpoint trained on an MMSA pickle: its text path works on new transcripts when it reads token
  ids through a text encoder (`model.text_source=encoder`). The pickle's audio and vision features
  (COVAREP, FACET, OpenFace) cannot be computed here, so those modalities are dropped the way the
  missing-data protocols drop them (`drop_whole_modalities`) and the model's own missing-modality
  handling scores the rest. Precomputed audio/vision features may still be given with a transcript
  (`predict_text`).

Each modality is padded (or cut) to the lengths the model was built for, and absent modalities are
marked in the batch's `presence`.

A checkpoint trained on word-aligned input (`word_aligned`) reads step i of audio and vision as word
i of the transcript. Trained on a `msakit extract` dataset with `alignment.unit: word`, its media go
through the same word alignment (`msakit.features.alignment`); any other checkpoint whose audio and
vision have as many steps as its text (an MMSA `aligned_*.pkl`, synthetic aligned data) counts as
word-aligned too. Precomputed features given to such a checkpoint must have one row per word of the
given text (`transcript_words`), in order, else they are refused.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msakit.data.batching import make_batch
from msakit.data.normalize import normalize_split
from msakit.data.schema import MODALITIES, Split
from msakit.errors import MsakitError
from msakit.features.alignment import transcript_words
from msakit.features.config import (
    FeatureConfig,
    apply_overrides,
    check_compatible,
    load_feature_config,
    with_transcript,
)
from msakit.features.pipeline import FeaturePipeline
from msakit.metrics import sentiment_classes
from msakit.missing import drop_whole_modalities
from msakit.models.base import MSAModel
from msakit.models.layers.text import special_token_ids
from msakit.training.checkpoint import load_checkpoint

FRAME_MODALITIES = ("audio", "vision")


class Predictor:
    """A model (a checkpoint, or the packaged default when `checkpoint` is None) and the extractors
    of its feature configuration, loaded once."""

    def __init__(self, checkpoint: str | Path | None = None, features: str | Path | None = None,
                 overrides: Sequence[str] = (), device: str = "cpu") -> None:
        """`features` (a YAML file) and `overrides` (`SECTION.KEY=VALUE`) may only change where the
        transcript comes from; any other difference from the recorded configuration is an error."""
        if checkpoint is None:
            from msakit.inference.pretrained import DEFAULT_MODEL, load_pretrained

            self.model, meta = load_pretrained(DEFAULT_MODEL)
            self.checkpoint = f"pretrained:{DEFAULT_MODEL}"
        else:
            self.model, meta = load_checkpoint(checkpoint)
            self.checkpoint = str(checkpoint)
        self.meta = meta
        self.family = meta["dataset"]["family"]
        self.normalization = meta.get("normalization") or {}  # the training split's statistics
        self.model_name = meta["model_name"]
        recorded = (meta.get("dataset") or {}).get("features")
        if isinstance(recorded, dict) and "config" in recorded:
            trained = FeatureConfig.from_dict(recorded["config"],
                                              f"the feature configuration of {self.checkpoint}")
            self.unavailable: tuple[str, ...] = ()
        else:
            trained = _text_only_config(self.model, self.checkpoint)
            self.unavailable = tuple(m for m in FRAME_MODALITIES if m in self.model.modalities)
        if features is not None:
            given = load_feature_config(features)
            check_compatible(trained, given, self.checkpoint)
            trained = with_transcript(trained, given.transcript)
        given = apply_overrides(trained, list(overrides), f"the feature configuration of {self.checkpoint}")
        check_compatible(trained, given, self.checkpoint)
        self.config = given
        self.word_aligned = given.word_aligned if not self.unavailable else _steps_aligned(self.model)
        self.reads = tuple(m for m in self.model.modalities if m not in self.unavailable)
        self.pipeline = FeaturePipeline(given, reads=self.reads)
        self._check_widths()
        self.notice = self._notice()
        self.device = torch.device(device)
        self.model.to(self.device)

    def _notice(self) -> str | None:
        """One line on what the model cannot use, shown once per run (None: it uses everything)."""
        if self.unavailable:
            return (f"{self.checkpoint} was trained on an MMSA pickle: its {' and '.join(self.unavailable)} "
                    "features cannot be computed from media, so they are marked missing and the model's "
                    "missing-modality handling scores the transcript")
        if self.reads == ("text",):
            return (f"{self.checkpoint} ({self.model_name}) reads the transcript only: audio and vision are "
                    "reported as present or absent, not used")
        return None

    def _check_widths(self) -> None:
        dims, made = self.model.dims, self.pipeline.dims
        wrong = [f"{m} width {getattr(dims, m)} in the checkpoint, {made[m]} from the extractors"
                 for m in FRAME_MODALITIES
                 if m in self.reads and getattr(dims, m) is not None and getattr(dims, m) != made[m]]
        if self._reads_text_features() and dims.text != made["text"]:
            wrong.append(f"text width {dims.text} in the checkpoint, {made['text']} from the extractors")
        if wrong:
            raise MsakitError(
                f"{self.checkpoint}: extracted features do not fit the model: {'; '.join(wrong)}"
            )

    def _reads_text_features(self) -> bool:
        return self.model.dims.text is not None and self.model.config.text_source == "features"

    def card(self) -> dict[str, Any]:
        """What is loaded: the model, its training data's family, what it reads, and its card."""
        return {
            "checkpoint": self.checkpoint,
            "model": self.model_name,
            "family": self.family,
            "scale": sentiment_classes(0.0, self.family)["scale"],
            "reads": list(self.reads),
            "not_computable": list(self.unavailable),
            "word_aligned": self.word_aligned,
            "notice": self.notice,
            "features": self.config.to_dict(),
            "card": self.meta.get("card"),
        }

    def _split(self, features: Mapping[str, Any]) -> Split:
        """A one-sample split padded (or cut) to the lengths the model was built with."""
        dims = self.model.dims

        def frames(array: np.ndarray | None, length: int | None, width: int | None
                   ) -> tuple[np.ndarray | None, np.ndarray]:
            if width is None:
                return None, np.ones(1, dtype=np.int64)
            out = np.zeros((1, length or 1, width), dtype=np.float32)
            n = 0 if array is None else min(len(array), out.shape[1])
            if n:
                out[0, :n] = array[:n]
            return out, np.array([max(n, 1)], dtype=np.int64)

        ids = features["text_bert"][None, :, :dims.text_len] if dims.text_len else features["text_bert"][None]
        text, _ = frames(features.get("text"), dims.text_len, dims.text)
        audio, audio_lengths = frames(features.get("audio"), dims.audio_len, dims.audio)
        vision, vision_lengths = frames(features.get("vision"), dims.vision_len, dims.vision)
        return Split(
            ids=np.array([features["path"]], dtype=object), labels=np.zeros(1, dtype=np.float32),
            raw_text=np.array([features["transcript"]], dtype=object),
            text=text, text_bert=ids.astype(np.int64) if dims.has_text_ids else None,
            audio=audio, vision=vision, audio_lengths=audio_lengths, vision_lengths=vision_lengths,
        )

    def predict_features(self, features: Mapping[str, Any], used: Sequence[str] | None = None) -> float:
        """The score of one sample's extracted features (a `FeaturePipeline.extract` dict), from the
        modalities in `used` (default: every present one the model can use)."""
        used = self._usable(features) if used is None else used
        split = normalize_split(self._split(features), self.normalization)
        batch = make_batch(split, np.zeros(1, dtype=np.int64))
        present = [features["present"][m] for m in MODALITIES]
        batch = batch.with_updates(presence=batch.presence & torch.tensor(present).unsqueeze(0))
        if self.unavailable:
            keep = np.array([[m in used or m not in self.unavailable for m in MODALITIES]])
            batch = drop_whole_modalities(batch, keep, **special_token_ids(self.model.config))
        with torch.inference_mode():
            return float(self.model(batch.to(self.device)).pred.reshape(-1)[0].cpu())

    def _usable(self, features: Mapping[str, Any], given: Sequence[str] = ()) -> list[str]:
        """The present modalities the model reads: an unavailable one only when its features were given."""
        return [m for m in MODALITIES if m in self.model.modalities and features["present"][m]
                and (m not in self.unavailable or m in given)]

    def _result(self, features: dict[str, Any], used: list[str], source: str,
                extract_seconds: float) -> dict[str, Any]:
        if not used:
            found = ", ".join(m for m, present in features["present"].items() if present) or "nothing"
            raise MsakitError(f"nothing this model reads is in the {source} ({'/'.join(self.reads)};"
                              f" found: {found}): no score")
        start = time.perf_counter()
        score = self.predict_features(features, used)
        return {
            "file": features["path"],
            "score": score,
            **sentiment_classes(score, self.family),
            "present": features["present"],
            "used": used,
            "transcript": features["transcript"],
            "transcript_source": features["transcript_source"],
            **({"words": features["words"]} if "words" in features else {}),
            "notes": features["notes"],
            **({"notice": self.notice} if self.notice else {}),
            "seconds": {"extract": extract_seconds, "model": time.perf_counter() - start},
        }

    def predict(self, path: str | Path, text: str | None = None) -> dict[str, Any]:
        """Score, classes, present and used modalities, transcript and timing of one media file."""
        return self.score(self.pipeline.extract(path, text))

    def score(self, features: dict[str, Any]) -> dict[str, Any]:
        """`predict`'s result for features this predictor's pipeline extracted (here or in a worker)."""
        extracted = sum(features.get("seconds", {}).values())
        return self._result(features, self._usable(features), "file", extracted)

    def predict_text(self, text: str, features: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The score of a transcript, with optional precomputed frame features
        (`{"audio": [[...], ...], "vision": ...}`, each frames x the checkpoint's width)."""
        if not isinstance(text, str):
            raise MsakitError(f"text must be a string, not {type(text).__name__}")
        start = time.perf_counter()
        extracted = self.pipeline.extract_text(text)
        extracted["path"] = ""
        given = self._frame_features(features or {}, text)
        for modality, array in given.items():
            extracted[modality] = array
            extracted["present"] = {**extracted["present"], modality: len(array) > 0}
        used = self._usable(extracted, given=list(given))
        return self._result(extracted, used, "request", time.perf_counter() - start)

    def _frame_features(self, given: Mapping[str, Any], text: str) -> dict[str, np.ndarray]:
        """Given frame features as float32 (frames, width) arrays checked against the model (for a
        word-aligned model: one row per word of `text`)."""
        if not isinstance(given, Mapping):
            raise MsakitError(f"features must be a mapping of modality -> frames, not {type(given).__name__}")
        unknown = sorted(set(given) - set(FRAME_MODALITIES))
        if unknown:
            raise MsakitError(f"features: unknown modality {unknown[0]!r} (audio or vision)")
        out = {}
        for modality, value in given.items():
            width = getattr(self.model.dims, modality)
            if modality not in self.model.modalities or width is None:
                raise MsakitError(f"features.{modality}: {self.model_name} does not read {modality}")
            try:
                array = np.asarray(value, dtype=np.float32)
            except (TypeError, ValueError):
                raise MsakitError(f"features.{modality} must be a list of frames of numbers") from None
            if array.size == 0:
                array = np.zeros((0, width), dtype=np.float32)
            if array.ndim != 2 or array.shape[1] != width:
                raise MsakitError(f"features.{modality} must be frames x {width} numbers, not shape "
                                  f"{tuple(array.shape)}")
            if not np.isfinite(array).all():
                raise MsakitError(f"features.{modality} holds a NaN or infinite value")
            words = len(transcript_words(text)) if self.word_aligned else len(array)
            if len(array) and len(array) != words:
                raise MsakitError(
                    f"features.{modality} has {len(array)} rows, but {self.model_name} was trained on "
                    f"word-aligned input: give one row per word of the text ({words} words), each the "
                    "mean of the word's frames")
            out[modality] = array
        return out


def _steps_aligned(model: MSAModel) -> bool:
    """Whether the audio and vision the model reads had as many steps as its text: how a model
    trained on an aligned pickle, which records no feature configuration, is recognised."""
    dims = model.dims
    frames = [getattr(dims, f"{m}_len") for m in FRAME_MODALITIES
              if m in model.modalities and getattr(dims, m) is not None]
    return bool(frames) and dims.text_len is not None and all(length == dims.text_len for length in frames)


def _text_only_config(model: MSAModel, checkpoint: str) -> FeatureConfig:
    """The feature configuration that makes an MMSA-pickle checkpoint's token ids from a transcript."""
    config = model.config
    if "text" not in model.modalities or config.text_source != "encoder" or not model.dims.has_text_ids:
        raise MsakitError(
            f"{checkpoint} records no feature configuration and reads precomputed features: it was "
            "trained on data not built by `msakit extract` (e.g. an MMSA pickle), so its features cannot "
            "be made from media files (only a checkpoint that reads token ids, model.text_source=encoder, "
            "scores new transcripts)"
        )
    defaults = load_feature_config()
    text = dataclasses.replace(defaults.text, encoder=config.text_encoder,
                               max_tokens=model.dims.text_len, features=False)
    return dataclasses.replace(defaults, text=text)
