"""One registry of models by name, timm-style: `@register_model("tfn")` and `create_model(...)`."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from msakit.data.schema import FeatureDims
from msakit.errors import MsakitError, reject_unknown_keys
from msakit.models.base import ModelConfig, MSAModel

_MODELS: dict[str, type[MSAModel]] = {}
_NOT_MODELS = {"base", "registry", "layers"}


def register_model(name: str) -> Callable[[type[MSAModel]], type[MSAModel]]:
    def decorate(cls: type[MSAModel]) -> type[MSAModel]:
        if name in _MODELS and _MODELS[name] is not cls:
            raise ValueError(f"model name {name!r} is registered twice")
        _MODELS[name] = cls
        cls.registry_name = name
        if cls.config_class is not ModelConfig:
            cls.config_class.model_name = name
        return cls

    return decorate


def _discover() -> None:
    """Import every module of `msakit.models` so that its `@register_model` runs."""
    import msakit.models as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _NOT_MODELS and not info.name.startswith("_"):
            importlib.import_module(f"msakit.models.{info.name}")


def list_models() -> list[str]:
    _discover()
    return sorted(_MODELS)


def describe_models() -> list[dict[str, str]]:
    """Every registered model with the first line of its docstring."""
    out = []
    for name in list_models():
        doc = (_MODELS[name].__doc__ or "").strip().splitlines()
        out.append({"name": name, "description": doc[0] if doc else ""})
    return out


def get_model_class(name: str) -> type[MSAModel]:
    _discover()
    if name not in _MODELS:
        raise MsakitError(f"unknown model {name!r}; available: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def build_config(name: str, values: dict[str, Any]) -> ModelConfig:
    """The model's config dataclass from a plain dict; unknown keys are an error naming them."""
    cls = get_model_class(name).config_class
    reject_unknown_keys(values, cls, f"setting(s) for model {name!r}")
    return cls(**values)


def create_model(name: str, config: dict[str, Any] | ModelConfig, dims: FeatureDims) -> MSAModel:
    cls = get_model_class(name)
    if not isinstance(config, ModelConfig):
        config = build_config(name, config)
    return cls(config, dims)
