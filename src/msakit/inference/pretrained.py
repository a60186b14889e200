"""The pretrained models that ship with msakit, e.g. the default `text-mosi` of `msakit predict`.

A pretrained model is a folder `msakit/pretrained/<name>/`:

- `model.safetensors`: only the tensors training changed (for `text-mosi`, the LoRA adapter and the
  head); the frozen text encoder comes from its own package, whose weights' sha256 is recorded.
- `config.json`: everything else a checkpoint holds (model name and settings, dims, training
  settings, the dataset with its feature configuration, normalisation), plus the weights' sha256
  and what the build measured.
- `MODEL_CARD.md`: what the model was trained on, how to rebuild it, what it cannot do.

Loading reads tensors and JSON only: unlike a pickled checkpoint, nothing in the folder can run.
`export_pretrained` writes such a folder from a checkpoint (scripts/build_default_model.py).
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from msakit import __version__
from msakit.data.tokens import PACKAGED_ENCODERS, resolve_encoder_path
from msakit.errors import MsakitError
from msakit.fileio import atomic_write_bytes, atomic_write_json
from msakit.models.base import MSAModel
from msakit.training.checkpoint import load_checkpoint, model_from_metadata

FORMAT = "msakit-pretrained-v1"
DEFAULT_MODEL = "text-mosi"
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "MODEL_CARD.md"
ENCODER_WEIGHTS = "model.safetensors"  # the Hugging Face encoder folder's weights file


def pretrained_root() -> Path:
    """The folder of the shipped pretrained models, inside the installed package."""
    return Path(str(resources.files("msakit") / "pretrained"))


def list_pretrained() -> list[str]:
    """The names of the shipped pretrained models (what `load_pretrained` takes)."""
    root = pretrained_root()
    return sorted(p.name for p in root.iterdir() if (p / CONFIG).is_file()) if root.is_dir() else []


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def encoder_record(name: str) -> dict[str, Any]:
    """Which frozen encoder weights an exported adapter was trained on: its name and sha256."""
    weights = resolve_encoder_path(name) / ENCODER_WEIGHTS
    if not weights.is_file():
        raise MsakitError(f"text encoder {name!r} has no {ENCODER_WEIGHTS} ({weights}) to record")
    package = PACKAGED_ENCODERS.get(name)
    return {"name": name, **({"package": package} if package else {}), "sha256": file_sha256(weights)}


def trained_tensors(model: MSAModel) -> dict[str, torch.Tensor]:
    """The state dict without the frozen parameters: what training changed (adapters, heads,
    buffers), contiguous on the CPU."""
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in frozen}


def export_pretrained(
    checkpoint: str | Path, folder: str | Path, *, name: str, features: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the pretrained-model folder `folder` (model.safetensors and config.json) from a
    checkpoint; return the config written.

    `features` is the feature configuration (`FeatureConfig.to_dict()`) that makes the model's
    input from media, as `msakit predict` extracts it; `extra` (the command, the metrics) is added
    to config.json. The weights file depends on the trained tensors only, so two identical trainings
    export identical bytes.
    """
    from safetensors.torch import save

    model, meta = load_checkpoint(checkpoint)
    max_tokens, text_len = features["text"]["max_tokens"], model.dims.text_len
    if model.config.text_source == "encoder" and max_tokens != text_len:
        raise MsakitError(f"{checkpoint} reads {text_len} tokens per clip, but the feature configuration "
                          f"gives text.max_tokens={max_tokens}")
    tensors = trained_tensors(model)
    payload = save(tensors, metadata={"format": FORMAT})
    folder = Path(folder)
    atomic_write_bytes(folder / WEIGHTS, lambda handle: handle.write(payload))
    config = {
        "format": FORMAT,
        "name": name,
        "msakit_version": __version__,
        "model_name": meta["model_name"],
        "model_config": meta["model_config"],
        "dims": meta["dims"],
        "training_config": meta["training_config"],
        "dataset": {**meta["dataset"], "features": {"config": features}},
        "normalization": meta.get("normalization") or {},
        "weights": {
            "file": WEIGHTS, "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload),
            "tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values()),
        },
        **({"text_encoder": encoder_record(model.config.text_encoder)}
           if model.config.text_source == "encoder" else {}),
        **(extra or {}),
    }
    atomic_write_json(folder / CONFIG, config)
    return config


def _folder(name: str | Path) -> Path:
    """A shipped model's folder by name, or any pretrained-model folder by path."""
    if isinstance(name, str) and name in list_pretrained():
        return pretrained_root() / name
    folder = Path(name).expanduser()
    if (folder / CONFIG).is_file():
        return folder
    available = ", ".join(list_pretrained()) or "none"
    raise MsakitError(f"no pretrained model {str(name)!r} (no {folder / CONFIG}); available: {available}")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MsakitError(f"{path} is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise MsakitError(f"{path} is not an msakit pretrained-model configuration "
                          f"(no '{FORMAT}' format tag)")
    weights = config.get("weights")
    if not isinstance(weights, dict) or not isinstance(weights.get("sha256"), str):
        raise MsakitError(f"{path} is damaged: it records no 'weights' with their sha256")
    return config


def _check_encoder(config: dict[str, Any], where: Path) -> None:
    """The frozen encoder installed must be the one the adapter was trained on."""
    recorded = config.get("text_encoder")
    if recorded is None:
        return
    weights = resolve_encoder_path(recorded["name"]) / ENCODER_WEIGHTS
    if not weights.is_file() or file_sha256(weights) != recorded["sha256"]:
        raise MsakitError(f"{where} was trained on other {recorded['name']!r} encoder weights than the "
                          f"installed {weights} (sha256 differs); reinstall {recorded.get('package', 'it')}")


def load_pretrained(name: str | Path = DEFAULT_MODEL) -> tuple[MSAModel, dict[str, Any]]:
    """A shipped pretrained model by name (or a pretrained-model folder by path), rebuilt in eval
    mode on the CPU, and its metadata: the same keys as a checkpoint's
    (`msakit.training.checkpoint.load_checkpoint`), plus `card`, the model card's text."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    folder = _folder(name)
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    config = _read_config(config_path)
    try:
        payload = weights_path.read_bytes()
    except OSError as exc:
        raise MsakitError(f"{weights_path} is not readable ({type(exc).__name__})") from None
    if hashlib.sha256(payload).hexdigest() != config["weights"]["sha256"]:
        raise MsakitError(f"{weights_path} is damaged: its sha256 is not the one {config_path} records")
    try:
        tensors = load(payload)
    except SafetensorError as exc:
        raise MsakitError(f"{weights_path} is not a readable safetensors file ({exc})") from None
    _check_encoder(config, config_path)
    model = model_from_metadata(config, str(config_path), "pretrained-model configuration")
    expected = trained_tensors(model)
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise MsakitError(f"{weights_path}: weights do not fit model {config['model_name']!r} "
                          f"(missing {missing[:3]}, unexpected {extra[:3]})")
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise MsakitError(f"{weights_path}: weights do not fit model {config['model_name']!r}: "
                          f"{first}") from None
    model.eval()
    card = folder / CARD
    meta = {**config, "card": card.read_text(encoding="utf-8") if card.is_file() else ""}
    return model, meta
