"""Inference: media files, folders or transcripts -> a checkpoint's (or the default model's) sentiment."""

from msakit.inference.batch import find_media, predict_many
from msakit.inference.predict import Predictor

__all__ = ["Predictor", "find_media", "predict_many"]
