"""A run's configuration: a model's YAML (defaults + per-dataset section) plus `--set` overrides.

Each `configs/<model>.yaml` has `defaults` and `datasets.<family>` sections, each with `model` and
`training` keys; the dataset section wins over the defaults, and `--set section.key=value` over
both. Every key is checked against the model's config dataclass or `TrainConfig`.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from msakit.errors import MsakitError, reject_unknown_keys
from msakit.models.registry import build_config, get_model_class
from msakit.training.settings import TrainConfig

SECTIONS = ("model", "training")


def model_yaml(model: str) -> dict[str, Any]:
    """The parsed YAML of a model, or an empty document when it ships none."""
    get_model_class(model)
    path = resources.files("msakit") / "configs" / f"{model}.yaml"
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """`["model.hidden=64", "training.lr=1e-3"]` -> {"model": {...}, "training": {...}}."""
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in SECTIONS or not name:
            raise MsakitError(
                f"bad --set {item!r}: expected model.KEY=VALUE or training.KEY=VALUE"
            )
        out[section][name] = yaml.safe_load(raw) if raw.strip() else raw
    return out


def resolve_config(
    model: str, family: str, overrides: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """The merged `{"model": ..., "training": ...}` dict for `model` on a dataset `family`."""
    doc = model_yaml(model)
    layers = [doc.get("defaults") or {}, (doc.get("datasets") or {}).get(family) or {}]
    layers.append(parse_overrides(overrides or []))
    merged: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for layer in layers:
        for section in SECTIONS:
            merged[section].update(layer.get(section) or {})
    build_config(model, merged["model"])  # validates model keys
    reject_unknown_keys(merged["training"], TrainConfig, f"training setting(s) for {model}")
    return merged


def training_config(values: dict[str, Any]) -> TrainConfig:
    """A validated TrainConfig from a plain dict (unknown keys and bad values: one-line errors)."""
    reject_unknown_keys(values, TrainConfig, "training setting(s)")
    return TrainConfig(**values)
