"""Checkpoints that rebuild their model alone: weights plus registry name, config, dims and version.

Written atomically (temp file in the same folder, then rename) so an interrupted save never leaves a
half-written file where a good one was.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch

from msakit import __version__
from msakit.data.schema import FeatureDims
from msakit.errors import MsakitError
from msakit.fileio import atomic_write_bytes
from msakit.models.base import MSAModel
from msakit.models.registry import create_model, list_models

FORMAT = "msakit-checkpoint-v1"
# what every checkpoint holds (save_checkpoint writes them all) and the type each must have
REQUIRED = {"model_name": str, "model_config": dict, "dims": dict, "training_config": dict, "dataset": dict,
            "state_dict": dict}


def save_checkpoint(
    path: Path, model: MSAModel, training: dict[str, Any], dataset: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    payload = {
        "format": FORMAT,
        "msakit_version": __version__,
        "model_name": model.registry_name,
        "model_config": dataclasses.asdict(model.config),
        "dims": model.dims.to_dict(),
        "training_config": training,
        "dataset": dataset,
        "state_dict": model.state_dict(),
        **(extra or {}),
    }
    atomic_write_bytes(Path(path), lambda handle: torch.save(payload, handle))


def read_tagged(path: Path, tag: str, what: str) -> dict[str, Any]:
    """The dict saved with torch.save in `path` (tensors and plain data only, never code), with
    format `tag`; a one-line error naming the file and `what` it should be otherwise."""
    try:
        with warnings.catch_warnings():  # torch warns at length about a foreign file: the error says it
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise MsakitError(f"{path} is not a readable {what} ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != tag:
        raise MsakitError(f"{path} is not an msakit {what} (no '{tag}' format tag)")
    return payload


def model_from_metadata(
    payload: dict[str, Any], where: str, what: str = "checkpoint",
    model_settings: dict[str, Any] | None = None,
) -> MSAModel:
    """The model a checkpoint's metadata describes, checked and built, with its initial weights.

    `where` (the file) and `what` (what it is) name it in the one-line errors. Shared by
    checkpoints and the pretrained models (`msakit.inference.pretrained`), whose weights then load.
    """
    for key, kind in REQUIRED.items():
        if key != "state_dict" and not isinstance(payload.get(key), kind):
            found = "has no" if key not in payload else f"has a {type(payload[key]).__name__} as"
            raise MsakitError(f"{where} is a damaged {what}: it {found} {key!r} (a {kind.__name__} "
                              f"in every {what} msakit writes)")
    normalization = payload.get("normalization") or {}
    if not isinstance(normalization, dict) or not all(
            isinstance(v, dict) and {"mean", "std"} <= set(v) for v in normalization.values()):
        raise MsakitError(f"{where} is a damaged {what}: its 'normalization' is not a mean and std "
                          "per modality")
    name = payload["model_name"]
    if name not in list_models():
        raise MsakitError(
            f"{where} holds model {name!r}, which this msakit does not have; "
            f"available: {', '.join(list_models())}"
        )
    try:
        dims = FeatureDims.from_dict(payload["dims"])
    except TypeError as exc:
        raise MsakitError(f"{where} is a damaged {what}: its 'dims' do not fit ({exc})") from None
    return create_model(name, {**payload["model_config"], **(model_settings or {})}, dims)


def load_checkpoint(
    path: str | Path, model_settings: dict[str, Any] | None = None
) -> tuple[MSAModel, dict[str, Any]]:
    """The rebuilt model (in eval mode, on the CPU) and the checkpoint's metadata.

    `model_settings` replace saved model settings before the weights are loaded; only settings that
    leave every weight's shape alone can change (e.g. how a model samples or fills in at test time).
    """
    path = Path(path)
    if not path.is_file():
        raise MsakitError(f"checkpoint not found: {path}")
    payload = read_tagged(path, FORMAT, "checkpoint")
    model = model_from_metadata(payload, str(path), model_settings=model_settings)
    if not isinstance(state := payload.get("state_dict"), dict):
        found = "has no" if "state_dict" not in payload else f"has a {type(state).__name__} as"
        raise MsakitError(f"{path} is a damaged checkpoint: it {found} 'state_dict' (a dict in every "
                          "checkpoint msakit writes)")
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise MsakitError(f"{path}: weights do not fit model {payload['model_name']!r}: {first}") from None
    model.eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, meta


def check_dims_match(path: str | Path, model: MSAModel, data: FeatureDims) -> None:
    """One-line error when a dataset lacks, or has other widths of, the features a model was trained on."""
    wrong = []
    for modality in model.modalities:
        if modality == "text" and model.config.text_source == "encoder":
            if not data.has_text_ids:
                wrong.append("text: the model reads `text_bert` token ids, the data has none")
            continue
        trained, given = getattr(model.dims, modality), getattr(data, modality)
        if trained != given:
            wrong.append(f"{modality} width {trained} in the checkpoint, {given} in the data")
    if wrong:
        raise MsakitError(
            f"checkpoint {path} ({model.registry_name}) does not fit this dataset: {'; '.join(wrong)}"
        )
