"""Modalities that a raw feature scale silences in an untrained model.

A branch fed features far from zero (offsets in the hundreds, as raw OpenFace or COVAREP values
have) can saturate before training starts: an LSTM's gates all open or all closed whatever the
clip, so the branch hands every sample the same vector and no gradient tells the samples apart.
The run then trains without that modality and says nothing. This check makes it say so: for each
modality of the training split on an extreme scale (`data.normalize.raw_scale_modalities`), an
untrained copy of the model (the seed's own initial weights) scores the first clips of the split,
once as they are and once with that modality shuffled across the clips; the spread of the change,
relative to the predictions' spread, is the modality's response. The same is measured with the
modality z-scored. A response below SILENCED_RATIO of the z-scored one means the raw scale, not
the model, keeps the modality out, and the run warns (`--set data.normalize=zscore` is the remedy).
The copy is built after its own `seed_everything`, and the training that follows seeds itself
again, so the check leaves the run's results unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from msakit.data.batching import make_batch
from msakit.data.normalize import DataConfig, fit_normalization, normalize_split, raw_scale_modalities
from msakit.data.schema import Batch, MultimodalDataset
from msakit.models.registry import create_model
from msakit.training.trainer import seed_everything

# Four orders of magnitude below the z-scored response: far beneath what merely attenuates a
# branch (MMIM's and Self-MM's audio LSTMs on synthetic-raw, about 1e-3 to 4e-1) and far above
# float32 rounding, where a saturated branch sits (MISA's audio: about 1e-6).
SILENCED_RATIO = 1e-4
CLIPS = 32  # clips scored: a spread needs a few dozen, an untrained BERT-base scores them in seconds
_KEYS = {"text": ("text", "text_mask", "text_ids"), "audio": ("audio", "audio_mask"),
         "vision": ("vision", "vision_mask")}


def modality_response(model: torch.nn.Module, batch: Batch, modality: str) -> float:
    """How far `model`'s predictions move when `modality` (features and masks) is shuffled across
    `batch` (a fixed permutation), relative to their spread; 0 when they do not spread at all."""
    order = torch.from_numpy(np.random.default_rng(1).permutation(len(batch.labels)))
    shuffled = batch.with_updates(**{key: getattr(batch, key)[order] for key in _KEYS[modality]
                                     if getattr(batch, key) is not None})
    with torch.no_grad():
        pred = model(batch).pred.flatten().double()
        spread = pred.std().item()
        moved = (model(shuffled).pred.flatten().double() - pred).std().item()
    return moved / spread if spread > 0 else 0.0


def silenced_modalities(model_name: str, model_config: dict[str, Any], data: MultimodalDataset,
                        seed: int) -> dict[str, tuple[float, float]]:
    """Modality -> (raw response, z-scored response) for each modality of `data`'s training split
    on an extreme scale that the untrained `model_name` (as `seed` initialises it) reads and that
    its raw scale silences (raw response below SILENCED_RATIO of the z-scored one)."""
    train = data.train
    raw = raw_scale_modalities(train)
    if len(train) < 2 or not raw:
        return {}
    seed_everything(seed)
    model = create_model(model_name, model_config, data.dims).eval()
    rows = np.arange(min(len(train), CLIPS))
    batch = make_batch(train, rows)
    silenced = {}
    for modality in (m for m in raw if m in model.modalities):
        stats = fit_normalization(train, DataConfig(normalize={modality: "zscore"}))
        standard = normalize_split(train, stats)
        responses = (modality_response(model, batch, modality),
                     modality_response(model, make_batch(standard, rows), modality))
        if responses[0] < SILENCED_RATIO * responses[1]:
            silenced[modality] = responses
    return silenced


def silence_warnings(silenced: dict[str, tuple[float, float]]) -> list[str]:
    """One line per silenced modality, for the run's warnings."""
    return [f"{modality} features on their raw scale do not reach the untrained model: shuffling them "
            f"across {CLIPS} training clips moves its predictions by {raw:.1e} of their spread, "
            f"{standard:.1e} once z-scored (a branch saturated by the scale); consider --set "
            "data.normalize=zscore" for modality, (raw, standard) in silenced.items()]
