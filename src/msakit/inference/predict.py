"""Sentiment of new media files from a checkpoint trained on a `msakit extract` dataset.

The checkpoint records the feature configuration of its training data; `Predictor` extracts with
exactly that configuration (only where the transcript comes from may change), pads each modality to
the lengths the model was built for, marks absent modalities in the batch's `presence`, and loads
the model and extractors once for any number of files.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msakit.data.batching import make_batch
from msakit.data.normalize import normalize_split
from msakit.data.schema import MODALITIES, Split
from msakit.errors import MsakitError
from msakit.features.config import (
    FeatureConfig,
    apply_overrides,
    check_compatible,
    load_feature_config,
    with_transcript,
)
from msakit.features.pipeline import FeaturePipeline
from msakit.metrics import sentiment_classes
from msakit.training.checkpoint import load_checkpoint


class Predictor:
    """A checkpoint's model and the extractors of its feature configuration, loaded once."""

    def __init__(self, checkpoint: str | Path, features: str | Path | None = None,
                 overrides: Sequence[str] = (), device: str = "cpu") -> None:
        """`features` (a YAML file) and `overrides` (`SECTION.KEY=VALUE`) may only change where the
        transcript comes from; any other difference from the recorded configuration is an error."""
        self.checkpoint = str(checkpoint)
        self.model, meta = load_checkpoint(checkpoint)
        recorded = (meta.get("dataset") or {}).get("features")
        if not isinstance(recorded, dict) or "config" not in recorded:
            raise MsakitError(
                f"{checkpoint} records no feature configuration: it was trained on data not built by "
                "`msakit extract` (e.g. an MMSA pickle), so its features cannot be made from media files"
            )
        trained = FeatureConfig.from_dict(recorded["config"], f"the feature configuration of {checkpoint}")
        if features is not None:
            given = load_feature_config(features)
            check_compatible(trained, given, str(checkpoint))
            trained = with_transcript(trained, given.transcript)
        given = apply_overrides(trained, list(overrides), f"the feature configuration of {checkpoint}")
        check_compatible(trained, given, str(checkpoint))
        self.config = given
        self.family = meta["dataset"]["family"]
        self.normalization = meta.get("normalization") or {}  # the training split's statistics
        self.model_name = meta["model_name"]
        self.pipeline = FeaturePipeline(given)
        self._check_widths()
        self.device = torch.device(device)
        self.model.to(self.device)

    def _check_widths(self) -> None:
        dims, made = self.model.dims, self.pipeline.dims
        wrong = [f"{m} width {getattr(dims, m)} in the checkpoint, {made[m]} from the extractors"
                 for m in ("audio", "vision") if getattr(dims, m) is not None and getattr(dims, m) != made[m]]
        if dims.text is not None and dims.text != made["text"]:
            wrong.append(f"text width {dims.text} in the checkpoint, {made['text']} from the extractors")
        if wrong:
            raise MsakitError(
                f"{self.checkpoint}: extracted features do not fit the model: {'; '.join(wrong)}"
            )

    def _split(self, features: dict[str, Any]) -> Split:
        """A one-sample split padded (or cut) to the lengths the model was built with."""
        dims = self.model.dims

        def pad(array: np.ndarray | None, length: int | None) -> tuple[np.ndarray | None, np.ndarray]:
            if array is None or length is None:
                return None, np.ones(1, dtype=np.int64)
            out = np.zeros((1, length, array.shape[-1]), dtype=np.float32)
            n = min(len(array), length)
            out[0, :n] = array[:n]
            return out, np.array([max(n, 1)], dtype=np.int64)

        ids = features["text_bert"][None, :, :dims.text_len] if dims.text_len else features["text_bert"][None]
        text, _ = pad(features["text"], dims.text_len if dims.text is not None else None)
        audio, audio_lengths = pad(features["audio"], dims.audio_len)
        vision, vision_lengths = pad(features["vision"], dims.vision_len)
        return Split(
            ids=np.array([features["path"]], dtype=object), labels=np.zeros(1, dtype=np.float32),
            raw_text=np.array([features["transcript"]], dtype=object),
            text=text if dims.text is not None else None,
            text_bert=ids.astype(np.int64) if dims.has_text_ids else None,
            audio=audio if dims.audio is not None else None,
            vision=vision if dims.vision is not None else None,
            audio_lengths=audio_lengths, vision_lengths=vision_lengths,
        )

    def predict_features(self, features: dict[str, Any]) -> float:
        split = normalize_split(self._split(features), self.normalization)
        batch = make_batch(split, np.zeros(1, dtype=np.int64))
        present = [features["present"][m] for m in MODALITIES]
        batch = batch.with_updates(presence=batch.presence & torch.tensor(present).unsqueeze(0))
        with torch.inference_mode():
            return float(self.model(batch.to(self.device)).pred.reshape(-1)[0].cpu())

    def predict(self, path: str | Path, text: str | None = None) -> dict[str, Any]:
        """Score, classes, present modalities, transcript and timing of one media file."""
        start = time.perf_counter()
        features = self.pipeline.extract(path, text)
        extracted = time.perf_counter()
        usable = [m for m in self.model.modalities if features["present"][m]]
        if not usable:
            found = ", ".join(m for m, present in features["present"].items() if present) or "nothing"
            raise MsakitError(f"nothing this model reads is in the file ({'/'.join(self.model.modalities)};"
                              f" found: {found}): no score")
        score = self.predict_features(features)
        return {
            "file": str(path),
            "score": score,
            **sentiment_classes(score, self.family),
            "present": features["present"],
            "transcript": features["transcript"],
            "transcript_source": features["transcript_source"],
            "notes": features["notes"],
            "seconds": {"extract": extracted - start, "model": time.perf_counter() - extracted},
        }


def predict_files(
    predictor: Predictor, paths: Sequence[str | Path], text: str | None = None
) -> list[dict[str, Any]]:
    """One result per file; a file that cannot be read gets {"file", "error"} and the rest go on."""
    if text is not None and len(paths) != 1:
        raise MsakitError(f"a given text applies to one file, not {len(paths)}")
    out = []
    for path in paths:
        try:
            out.append(predictor.predict(path, text))
        except MsakitError as exc:
            out.append({"file": str(path), "error": " ".join(str(exc).split())})
    return out
