"""Missing-modality protocols (evaluation) and training-time noise, as pure seeded masks."""

from msakit.missing.masks import (
    DEFAULT_RATES,
    FIXED_SUBSETS,
    PROTOCOLS,
    MissingSpec,
    apply_missing,
    available_modalities,
    canonical_subset,
    drop_whole_modalities,
    drop_within_modalities,
    modality_keep,
    parse_rates,
    sample_uniforms,
)
from msakit.missing.noise import (
    InterModalNoise,
    LNLNNoise,
    TrainingNoise,
    build_noise,
    list_noises,
    register_noise,
)

__all__ = [
    "DEFAULT_RATES",
    "FIXED_SUBSETS",
    "PROTOCOLS",
    "InterModalNoise",
    "LNLNNoise",
    "MissingSpec",
    "TrainingNoise",
    "apply_missing",
    "available_modalities",
    "build_noise",
    "canonical_subset",
    "drop_whole_modalities",
    "drop_within_modalities",
    "list_noises",
    "modality_keep",
    "parse_rates",
    "register_noise",
    "sample_uniforms",
]
