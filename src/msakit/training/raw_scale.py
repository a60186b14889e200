"""Modalities that a raw feature scale silences in an untrained model.

A branch fed features far from zero (offsets in the hundreds, as raw OpenFace or COVAREP values
have) can saturate before training starts: an LSTM's gates all open or all closed whatever the
clip, so the branch hands every sample the same vector and no gradient tells the samples apart.
The run then trains without that modality and says nothing. This check makes it say so. Once per
run, `shuffle_probe` takes the first clips of the training split and, for each modality on an
extreme scale (`data.normalize.raw_scale_modalities`), a copy of them with that modality z-scored
(training statistics). For each such modality the model reads, an untrained copy of the model (the
seed's own initial weights) scores the clips once as they are and once with that modality
shuffled across them; the spread of the change, relative to the predictions' spread, is the
modality's response, measured on the raw and on the z-scored clips. A raw response below
SILENCED_RATIO of the z-scored one means the raw scale, not the model, keeps the modality out, and
the run warns (`--set data.normalize=zscore` is the remedy). The copy is built after its own
`seed_everything`, and the training that follows seeds itself again, so the check leaves the
run's results unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from msakit.data.batching import make_batch
from msakit.data.normalize import DataConfig, fit_normalization, normalize_split, raw_scale_modalities
from msakit.data.schema import Batch, FeatureDims, Split
from msakit.models.registry import create_model, get_model_class
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


@dataclass
class ShuffleProbe:
    """The clips a run's check scores: the first CLIPS of the training split as they are, and, per
    modality on an extreme scale, the same clips with that modality z-scored (training statistics)."""

    raw: Batch
    standardised: dict[str, Batch]


def shuffle_probe(train: Split) -> ShuffleProbe | None:
    """The probe for `train`, or None when no modality is on an extreme scale (nothing to check).
    Built once per run: it depends on the data only, not on a seed."""
    raw = raw_scale_modalities(train)
    if len(train) < 2 or not raw:
        return None
    clips = train.subset(np.arange(min(len(train), CLIPS)))
    rows = np.arange(len(clips))
    stats = fit_normalization(train, DataConfig(normalize=dict.fromkeys(raw, "zscore")))
    return ShuffleProbe(make_batch(clips, rows), {
        m: make_batch(normalize_split(clips, {m: stats[m]}), rows) for m in raw})


def silenced_modalities(model_name: str, model_config: dict[str, Any], dims: FeatureDims,
                        probe: ShuffleProbe | None, seed: int) -> dict[str, tuple[float, float]]:
    """Modality -> (raw response, z-scored response) for each modality of `probe` that the
    untrained `model_name` (as `seed` initialises it) reads and that its raw scale silences (raw
    response below SILENCED_RATIO of the z-scored one)."""
    read = [] if probe is None else [m for m in probe.standardised
                                     if m in get_model_class(model_name).modalities]
    if not read:
        return {}
    seed_everything(seed)
    model = create_model(model_name, model_config, dims).eval()
    responses = {m: (modality_response(model, probe.raw, m),
                     modality_response(model, probe.standardised[m], m)) for m in read}
    return {m: (raw, standard) for m, (raw, standard) in responses.items()
            if raw < SILENCED_RATIO * standard}


def silence_warnings(silenced: dict[str, tuple[float, float]], probe: ShuffleProbe | None) -> list[str]:
    """One line per silenced modality, for the run's warnings."""
    clips = 0 if probe is None else len(probe.raw.labels)
    return [f"{modality} features on their raw scale do not reach the untrained model: shuffling them "
            f"across {clips} training clips moves its predictions by {raw:.1e} of their spread, "
            f"{standard:.1e} once z-scored (a branch saturated by the scale); consider --set "
            "data.normalize=zscore" for modality, (raw, standard) in silenced.items()]
