"""The feature configuration: `default.yaml` merged with a user's YAML file and `--set` overrides.

`default.yaml` is the one place defaults live; the dataclasses below only name and check the keys.
Every section but `transcript` decides what the feature arrays mean, so a checkpoint trained on
one configuration must be fed features of the same one; `check_compatible` says which keys differ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from msakit.errors import MsakitError, reject_unknown_keys
from msakit.fileio import load_yaml

TRANSCRIPT_SOURCES = ("auto", "text", "file", "asr")
ACOUSTIC_BACKENDS = ("opensmile", "librosa")
ALIGNMENT_UNITS = ("frame", "word")
# where the text comes from may change between training and prediction; the features' meaning may not
FREE_SECTIONS = ("transcript",)


@dataclass(frozen=True)
class AudioSettings:
    silence_dbfs: float


@dataclass(frozen=True)
class TranscriptSettings:
    source: str
    asr_model: str
    language: str
    beam_size: int
    compute_type: str


@dataclass(frozen=True)
class TextSettings:
    encoder: str
    max_tokens: int
    features: bool


@dataclass(frozen=True)
class AcousticSettings:
    backend: str
    feature_set: str
    pool: int
    max_frames: int


@dataclass(frozen=True)
class VisualSettings:
    fps: float
    max_frames: int
    min_confidence: float
    expression: bool
    expression_model: str


@dataclass(frozen=True)
class AlignmentSettings:
    unit: str


# configurations recorded before the `alignment` section existed made frame-rate features
FRAME_ALIGNMENT = {"unit": "frame"}


@dataclass(frozen=True)
class FeatureConfig:
    audio: AudioSettings
    transcript: TranscriptSettings
    text: TextSettings
    acoustic: AcousticSettings
    visual: VisualSettings
    alignment: AlignmentSettings

    @property
    def word_aligned(self) -> bool:
        """Audio and vision as one row per transcript word (averaged over its time span)."""
        return self.alignment.unit == "word"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "feature configuration") -> FeatureConfig:
        """A checked configuration; every key of every section must be given (default.yaml has them)."""
        if not isinstance(values, dict):
            raise MsakitError(f"{source} is a {type(values).__name__}, not a mapping of sections")
        reject_unknown_keys(values, cls, f"feature section(s) in {source}")
        values = {"alignment": FRAME_ALIGNMENT, **values}
        sections = {}
        for section in dataclasses.fields(cls):
            settings_class = _SECTION_CLASSES[section.name]
            given = values.get(section.name)
            if not isinstance(given, dict):
                raise MsakitError(f"{source}: section {section.name!r} is missing or not a mapping")
            reject_unknown_keys(given, settings_class, f"{section.name} setting(s) in {source}")
            absent = [f.name for f in dataclasses.fields(settings_class) if f.name not in given]
            if absent:
                raise MsakitError(f"{source}: {section.name} lacks {', '.join(absent)}")
            sections[section.name] = settings_class(**given)
        config = cls(**sections)
        config.check(source)
        return config

    def check(self, source: str) -> None:
        """One-line error naming the first key whose value cannot work."""
        def bad(key: str, value: Any, expected: str) -> MsakitError:
            return MsakitError(f"{source}: {key} must be {expected}, not {value!r}")

        for key, value in (("text.max_tokens", self.text.max_tokens),
                           ("acoustic.pool", self.acoustic.pool),
                           ("acoustic.max_frames", self.acoustic.max_frames),
                           ("visual.max_frames", self.visual.max_frames),
                           ("transcript.beam_size", self.transcript.beam_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(key, value, "a positive integer")
        if self.text.max_tokens < 3:
            raise bad("text.max_tokens", self.text.max_tokens, "at least 3 ([CLS], a token, [SEP])")
        if self.transcript.source not in TRANSCRIPT_SOURCES:
            raise bad("transcript.source", self.transcript.source, f"one of {', '.join(TRANSCRIPT_SOURCES)}")
        if self.alignment.unit not in ALIGNMENT_UNITS:
            raise bad("alignment.unit", self.alignment.unit, f"one of {', '.join(ALIGNMENT_UNITS)}")
        if self.acoustic.backend not in ACOUSTIC_BACKENDS:
            raise bad("acoustic.backend", self.acoustic.backend, f"one of {', '.join(ACOUSTIC_BACKENDS)}")
        fps = self.visual.fps
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 60:
            raise bad("visual.fps", fps, "a number in (0, 60]")
        confidence = self.visual.min_confidence
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) \
                or not 0 <= confidence <= 1:
            raise bad("visual.min_confidence", confidence, "a number in [0, 1]")
        flags = (("text.features", self.text.features), ("visual.expression", self.visual.expression))
        for key, value in flags:
            if not isinstance(value, bool):
                raise bad(key, value, "true or false")
        if isinstance(self.audio.silence_dbfs, bool) or not isinstance(self.audio.silence_dbfs, (int, float)):
            raise bad("audio.silence_dbfs", self.audio.silence_dbfs, "a number (dB below full scale)")


_SECTION_CLASSES: dict[str, type] = {
    "audio": AudioSettings, "transcript": TranscriptSettings, "text": TextSettings,
    "acoustic": AcousticSettings, "visual": VisualSettings, "alignment": AlignmentSettings,
}


def _default_document() -> dict[str, Any]:
    return load_yaml((resources.files("msakit.features") / "default.yaml").read_text(), "default.yaml")


def _merge(base: dict[str, Any], layer: dict[str, Any], source: str) -> None:
    for section, values in layer.items():
        if section not in base:
            raise MsakitError(f"unknown feature section {section!r} in {source}; known: {', '.join(base)}")
        if not isinstance(values, dict):
            raise MsakitError(f"{source}: section {section!r} must be a mapping of keys")
        base[section].update(values)


def parse_feature_overrides(items: list[str] | tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """`["visual.fps=5", "acoustic.backend=librosa"]` -> {"visual": {"fps": 5}, ...}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise MsakitError(f"bad --set {item!r}: expected SECTION.KEY=VALUE, e.g. visual.fps=5")
        out.setdefault(section, {})[name] = load_yaml(raw, f"--set {item!r}") if raw.strip() else raw
    return out


def load_feature_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> FeatureConfig:
    """default.yaml, then the keys of the YAML file at `path`, then `--set` overrides."""
    document = _default_document()
    source = "default.yaml"
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise MsakitError(f"feature configuration file not found: {path}")
        layer = load_yaml(path.read_text(), str(path)) or {}
        if not isinstance(layer, dict):
            raise MsakitError(f"{path} must hold a mapping of sections, not a {type(layer).__name__}")
        _merge(document, layer, str(path))
        source = str(path)
    return apply_overrides(FeatureConfig.from_dict(document, source), overrides, source)


def apply_overrides(config: FeatureConfig, overrides: list[str] | tuple[str, ...],
                    source: str = "feature configuration") -> FeatureConfig:
    """`config` with `SECTION.KEY=VALUE` overrides, checked again."""
    if not overrides:
        return config
    document = config.to_dict()
    _merge(document, parse_feature_overrides(overrides), "--set")
    return FeatureConfig.from_dict(document, f"{source} with --set")


def check_compatible(trained: FeatureConfig, given: FeatureConfig, where: str) -> None:
    """MsakitError listing the keys that differ in every section that decides what features mean."""
    old, new = trained.to_dict(), given.to_dict()
    differ = [
        f"{section}.{key} {old[section][key]!r} -> {new[section][key]!r}"
        for section in old if section not in FREE_SECTIONS
        for key in old[section] if old[section][key] != new[section][key]
    ]
    if differ:
        raise MsakitError(
            f"{where} was trained on other features than requested: {'; '.join(differ)}"
        )


def with_transcript(config: FeatureConfig, transcript: TranscriptSettings) -> FeatureConfig:
    """`config` with another transcript section (where the text comes from may change freely)."""
    return dataclasses.replace(config, transcript=transcript)
