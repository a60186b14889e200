"""A run's configuration: a model's YAML (defaults + per-dataset section) plus `--set` overrides.

Each `configs/<model>.yaml` has `defaults` and `datasets.<family>` sections, each with `model` and
`training` keys; the dataset section wins over the defaults, and `--set section.key=value` over
both. Every key is checked against the model's config dataclass or `TrainConfig`. A `tiny` section
(read for the section name TINY, which no dataset family has) holds the smallest settings that still
run every branch of the model: what the contract test builds it with.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from msakit.data.normalize import DataConfig
from msakit.errors import MsakitError, reject_unknown_keys
from msakit.fileio import load_yaml
from msakit.models.registry import build_config, get_model_class
from msakit.training.settings import TrainConfig

SECTIONS = ("model", "training", "data")
TINY = "tiny"  # the contract test's section: a top-level key of the YAML, beside `datasets`


def model_yaml(model: str) -> dict[str, Any]:
    """The parsed YAML of a model, or an empty document when it ships none."""
    get_model_class(model)
    path = resources.files("msakit") / "configs" / f"{model}.yaml"
    if not path.is_file():
        return {}
    return load_yaml(path.read_text(), f"configs/{model}.yaml") or {}


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """`["model.hidden=64", "training.lr=1e-3"]` -> {"model": {...}, "training": {...}, "data": {}}.

    Values are YAML (numbers in any spelling: `5e-4`, `1E3`, `.5`)."""
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in SECTIONS or not name:
            raise MsakitError(
                f"bad --set {item!r}: expected model.KEY=VALUE, training.KEY=VALUE or data.KEY=VALUE"
            )
        out[section][name] = load_yaml(raw, f"--set {item!r}") if raw.strip() else raw
    return out


def resolve_config(
    model: str, family: str, overrides: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """The merged `{"model": ..., "training": ..., "data": ...}` dict for `model` on a dataset
    `family` (a family without a section of its own gets the defaults; TINY gets the `tiny` section)."""
    doc = model_yaml(model)
    section = doc.get(TINY) if family == TINY else (doc.get("datasets") or {}).get(family)
    layers = [doc.get("defaults") or {}, section or {}]
    layers.append(parse_overrides(overrides or []))
    merged: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for layer in layers:
        for section in SECTIONS:
            merged[section].update(layer.get(section) or {})
    build_config(model, merged["model"])  # validates model keys
    reject_unknown_keys(merged["training"], TrainConfig, f"training setting(s) for {model}")
    data_config(merged["data"])
    return merged


def training_config(values: dict[str, Any]) -> TrainConfig:
    """A validated TrainConfig from a plain dict (unknown keys and bad values: one-line errors)."""
    reject_unknown_keys(values, TrainConfig, "training setting(s)")
    return TrainConfig(**values)


def data_config(values: dict[str, Any]) -> DataConfig:
    """A validated DataConfig from a plain dict (unknown keys and bad values: one-line errors)."""
    reject_unknown_keys(values, DataConfig, "data setting(s)")
    return DataConfig(**values)
