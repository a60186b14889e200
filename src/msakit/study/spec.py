"""A study file: the grid of a benchmark as data, and the jobs it expands to.

A study is datasets x models x seeds, each cell trained once (selected on validation) and scored on
the test split clean and under the missing-data protocols the file lists:

```yaml
name: robustness-synthetic
datasets: [synthetic]                 # names or paths, or {dataset, data_dir, family, aligned}
models: [tfn, lmf, {model: cyin, label: cyin-zscore, set: [data.normalize=zscore]}]
seeds: [1111, 1112, 1113]
set: [training.epochs=20]            # settings for every model (a model's own `set` comes after)
evaluate:                             # protocols on the test split; each optional
  intra: {rates: [0.0, 0.5, 0.9]}     # default: the protocol's rates; `seeds`: mask seeds [0]
  inter: {}
  fixed: {subsets: [t, ta, tav]}
resources: {cpus: 1, gpus: 0}        # what one job asks of a Ray worker
search: ...                           # optional: see msakit.study.search
```

A job is one (dataset, model, seed) cell. Its identity is a hash of the model, its resolved
configuration (every setting in force, defaults included, except `NEUTRAL_SETTINGS`), the seed and
the dataset's content fingerprint: a rerun finds the job's record and skips it, and a changed
setting or changed data makes a new job. Evaluations are keyed the same way inside a job, so adding
a protocol to a study scores the existing checkpoints without training them again. msakit's own
version is not part of the identity: records made by an older msakit are reused (a study that must
be redone after a code change names another store).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msakit import api
from msakit.data.schema import MultimodalDataset
from msakit.errors import MsakitError
from msakit.fileio import load_yaml
from msakit.training.runs import aligned_input

STUDY_KEYS = ("name", "datasets", "models", "seeds", "set", "evaluate", "resources", "search")
DATASET_KEYS = ("dataset", "data_dir", "family", "aligned")
MODEL_KEYS = ("model", "label", "set")
EVALUATION_KEYS = ("rates", "subsets", "seeds")
PROTOCOL_NAMES = ("intra", "inter", "fixed")


def identity(value: Any) -> str:
    """A short stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DatasetRef:
    """Where a study's dataset comes from, as `load_dataset` takes it."""

    dataset: str
    data_dir: str | None = None
    family: str | None = None
    aligned: bool | None = None

    @property
    def label(self) -> str:
        return Path(self.dataset).stem if self.dataset.endswith((".pkl", ".csv")) else self.dataset


@dataclass(frozen=True)
class ModelRef:
    """A model of the study and the settings it trains with; `label` names its rows."""

    model: str
    label: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Evaluation:
    """One missing-data protocol scored on the test split."""

    protocol: str
    rates: tuple[float, ...] | None = None
    subsets: tuple[str, ...] | None = None
    seeds: tuple[int, ...] = (0,)

    @property
    def key(self) -> str:
        return identity(dataclasses.asdict(self))


@dataclass(frozen=True)
class Study:
    name: str
    path: str
    datasets: tuple[DatasetRef, ...]
    models: tuple[ModelRef, ...]
    seeds: tuple[int, ...]
    evaluations: tuple[Evaluation, ...]
    cpus: float = 1.0
    gpus: float = 0.0
    search: dict[str, Any] | None = None


@dataclass(frozen=True)
class Job:
    """One cell of the grid: train `model` on `dataset` with `seed`, then run the evaluations."""

    id: str
    dataset: DatasetRef
    model: ModelRef
    seed: int
    fingerprint: str
    config: dict[str, Any] = field(compare=False, repr=False)
    evaluations: tuple[Evaluation, ...] = ()
    metric_family: str = "mosi"  # the data's: which metrics its tables show


def _fail(path: str, where: str, message: str) -> MsakitError:
    return MsakitError(f"{path}: {where}: {message}")


def _check_keys(path: str, where: str, value: Any, allowed: Sequence[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, where, f"expected a mapping, not {type(value).__name__}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise _fail(path, where, f"unknown key {unknown[0]!r}; known: {', '.join(allowed)}")
    return value


def _strings(path: str, where: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, where, "expected a list of SECTION.KEY=VALUE strings")
    return tuple(value)


def _numbers(path: str, where: str, value: Any, kind: type) -> tuple:
    def fits(v: Any) -> bool:  # a YAML int is a fine float; a bool is neither
        return not isinstance(v, bool) and (isinstance(v, kind) or (kind is float and isinstance(v, int)))

    if not isinstance(value, list) or not value or not all(fits(v) for v in value):
        raise _fail(path, where, f"expected a non-empty list of {kind.__name__}s")
    return tuple(kind(v) for v in value)


def _dataset(path: str, index: int, value: Any) -> DatasetRef:
    if isinstance(value, str):
        return DatasetRef(value)
    value = _check_keys(path, f"datasets[{index}]", value, DATASET_KEYS)
    if not isinstance(value.get("dataset"), str):
        raise _fail(path, f"datasets[{index}].dataset", "a dataset name or path is required")
    return DatasetRef(**value)


def _model(path: str, index: int, value: Any) -> ModelRef:
    if isinstance(value, str):
        return ModelRef(value, value)
    value = _check_keys(path, f"models[{index}]", value, MODEL_KEYS)
    if not isinstance(value.get("model"), str):
        raise _fail(path, f"models[{index}].model", "a registered model name is required")
    label = value.get("label", value["model"])
    if not isinstance(label, str) or not label:
        raise _fail(path, f"models[{index}].label", "expected a non-empty string")
    return ModelRef(value["model"], label, _strings(path, f"models[{index}].set", value.get("set")))


def _evaluations(path: str, value: Any) -> tuple[Evaluation, ...]:
    value = _check_keys(path, "evaluate", value or {}, PROTOCOL_NAMES)
    out = []
    for protocol, settings in value.items():
        settings = _check_keys(path, f"evaluate.{protocol}", settings or {}, EVALUATION_KEYS)
        rates = settings.get("rates")
        subsets = settings.get("subsets")
        if protocol == "fixed" and rates is not None:
            raise _fail(path, "evaluate.fixed.rates", "the fixed protocol takes subsets, not rates")
        if protocol != "fixed" and subsets is not None:
            raise _fail(path, f"evaluate.{protocol}.subsets", f"the {protocol} protocol takes rates")
        out.append(Evaluation(
            protocol,
            rates=None if rates is None else _numbers(path, f"evaluate.{protocol}.rates", rates, float),
            subsets=None if subsets is None else _strings(path, f"evaluate.{protocol}.subsets", subsets),
            seeds=_numbers(path, f"evaluate.{protocol}.seeds", settings.get("seeds", [0]), int),
        ))
    return tuple(out)


def load_study(path: str | Path) -> Study:
    """The study file at `path`, checked: a bad key or value is one line naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MsakitError(f"study file not found: {path}")
    where = str(path)
    document = _check_keys(where, "the file", load_yaml(path.read_text(), where) or {}, STUDY_KEYS)
    name = document.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _fail(where, "name", "a study needs a name")
    for key in ("datasets", "models"):
        if not isinstance(document.get(key), list) or not document[key]:
            raise _fail(where, key, "expected a non-empty list")
    shared = _strings(where, "set", document.get("set"))
    models = [_model(where, i, m) for i, m in enumerate(document["models"])]
    labels = [m.label for m in models]
    repeated = next((label for label in labels if labels.count(label) > 1), None)
    if repeated:
        raise _fail(where, "models", f"two models are labelled {repeated!r}: give each a distinct `label`")
    resources = _check_keys(where, "resources", document.get("resources") or {}, ("cpus", "gpus"))
    for key, amount in resources.items():
        if isinstance(amount, bool) or not isinstance(amount, int | float) or amount < 0:
            raise _fail(where, f"resources.{key}", f"expected a number >= 0, not {amount!r}")
    search = document.get("search")
    if search is not None and not isinstance(search, dict):
        raise _fail(where, "search", "expected a mapping")
    return Study(
        name=name.strip(), path=where,
        datasets=tuple(_dataset(where, i, d) for i, d in enumerate(document["datasets"])),
        models=tuple(dataclasses.replace(m, overrides=shared + m.overrides) for m in models),
        seeds=_numbers(where, "seeds", document.get("seeds", [1111]), int),
        evaluations=_evaluations(where, document.get("evaluate")),
        cpus=float(resources.get("cpus", 1)), gpus=float(resources.get("gpus", 0)), search=search,
    )


# settings that never change a training's numbers: where its curves go, how often its state is saved
NEUTRAL_SETTINGS = {"training": ("log", "state_every")}


def job_identity(model: str, config: dict[str, Any], seed: int, fingerprint: str) -> str:
    """What makes two trainings the same: the model, every setting in force (but the neutral ones),
    the seed, the data."""
    kept = {section: {key: value for key, value in values.items()
                      if key not in NEUTRAL_SETTINGS.get(section, ())}
            for section, values in config.items()}
    return identity({"model": model, "config": kept, "seed": seed, "data": fingerprint})


def load_data(ref: DatasetRef, model: str) -> MultimodalDataset:
    """The dataset `ref` names, in the form (aligned or not) `model` reads."""
    return api.load_dataset(ref.dataset, ref.data_dir, family=ref.family,
                            aligned=aligned_input(model, ref.aligned))
