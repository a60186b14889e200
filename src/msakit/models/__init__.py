"""Models: one file per model, each registered by name (see `registry.py`)."""

from msakit.models.base import ModelConfig, MSAModel, Output
from msakit.models.registry import create_model, get_model_class, list_models, register_model

__all__ = [
    "MSAModel", "ModelConfig", "Output", "create_model", "get_model_class", "list_models",
    "register_model",
]
