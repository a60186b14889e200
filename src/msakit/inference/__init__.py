"""Inference: media files (or their features) -> a trained checkpoint's sentiment score."""

from msakit.inference.predict import Predictor, predict_files

__all__ = ["Predictor", "predict_files"]
