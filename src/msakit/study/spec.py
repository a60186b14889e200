"""A study file: the grid of a benchmark as data, and the jobs it expands to.

A study is datasets x models x seeds, each cell trained once (selected on validation) and scored on
the test split clean and under the missing-data protocols the file lists:

```yaml
name: robustness-synthetic
datasets:                             # names or paths, or {dataset, data_dir, family, aligned,
  - synthetic                         #   options, label}; `options`: the synthetic generator's sizes
  - {dataset: synthetic, options: {audio_len: 50, vision_len: 50}}   # label synthetic-audio_len50-...
models:                               # names, or {model, label, set, evaluate}
  - tfn
  - {model: cyin, label: cyin-zscore, set: [data.normalize=zscore]}
  - {model: hme, label: hme-mr0.1, set: [training.noise=inter, training.noise_rate=0.1],
     evaluate: {inter: {rates: [0.1]}, fixed: {}}}   # its own evaluations replace the study's
seeds: [1111, 1112, 1113]
set: [training.epochs=20]            # settings for every model (a model's own `set` comes after)
evaluate:                             # protocols on the test split; each optional
  intra: {rates: [0.0, 0.5, 0.9]}     # default: the protocol's rates; `seeds`: mask seeds [0]
  inter: {}
  fixed: {subsets: [t, ta, tav]}
resources: {cpus: 1, gpus: 0}        # what one job asks of a Ray worker
search: ...                           # optional: see msakit.study.search
```

An evaluation's `set: [model.KEY=VALUE]` scores the checkpoint with those test-time settings in
place of the saved ones (`msakit robustness --set`). A model's own `evaluate:` replaces the
study's for that model only: a grid over a setting (HME
trained and tested at each missing rate) is one model entry per value, each named by its label
and scored where it was trained, with no cross product of settings and protocols to prune. Two model
entries that train the same way are one job: an entry that only adds evaluations (e.g. with
test-time settings) scores the other's checkpoints without training them again.

`evaluate: {reproduce: {}}` trains and scores each seed by the model YAML's `reproduce:` recipe
(`msakit.api.reproduce`: its protocol, rates, selection, one model per rate where it says so), the
study's seeds in place of the recipe's; the recipe is part of the job's identity.

Domain generalization is an evaluation of its own, `evaluate: {dg: {targets: ['0', '3'],
group_by: domains}}` (`group_by` as `msakit dg` takes it; default domains): each target is one job
per seed that trains on the dataset's other groups, selects on their validation data and records
in-domain (the sources' test split) and out-of-domain (the target) metrics (`msakit.api.dg`). It
takes no missing-data protocol beside it.

A job is one (dataset, model, seed) cell, or (dataset, model, target, seed) for domain
generalization. Its identity is a hash of the model, its resolved configuration (every setting in
force, defaults included, except `NEUTRAL_SETTINGS`), the seed, the dataset's content fingerprint
(which covers its generator options) and the DG target and grouping: a rerun finds the job's record
and skips it, and a changed setting or changed data makes a new job. A setting that names a file
(`FILE_SETTINGS`, e.g. `model.cues=PATH`, relative to the working directory) enters the identity
by the file's content, not its path: a changed cue file makes new jobs, a moved one does not; a
missing one is an error when the study is loaded. Evaluations are keyed the same way inside a job,
so adding a protocol to a study scores the existing checkpoints without training them again.
msakit's own version is not part of the identity: records made by an older msakit are reused (a
study that must be redone after a code change names another store).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msakit import api
from msakit.data.catalog import SYNTHETIC, check_synthetic_sizes
from msakit.data.schema import MultimodalDataset
from msakit.errors import MsakitError
from msakit.evaluation.reproduce import load_recipe
from msakit.fileio import load_yaml
from msakit.training.config import model_yaml, parse_overrides
from msakit.training.runs import aligned_input
from msakit.training.settings import without_added_settings

STUDY_KEYS = ("name", "datasets", "models", "seeds", "set", "evaluate", "resources", "search")
DATASET_KEYS = ("dataset", "data_dir", "family", "aligned", "options", "label")
MODEL_KEYS = ("model", "label", "set", "evaluate")
EVALUATION_KEYS = ("rates", "subsets", "seeds", "set")
PROTOCOL_NAMES = ("intra", "inter", "fixed")
DG_KEYS = ("targets", "group_by")
# settings whose value is a file the training reads: the identity holds its content, not its path
FILE_SETTINGS = {"model": ("cues",)}


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
    options: tuple[tuple[str, Any], ...] = ()  # the synthetic generator's sizes, sorted by name
    name: str | None = None  # the label the file gives

    @property
    def label(self) -> str:
        """The dataset's name in tables and file names: the file's `label`, else the dataset's name
        and its options (e.g. synthetic-audio_len50-vision_len50)."""
        if self.name is not None:
            return self.name
        base = Path(self.dataset).stem if self.dataset.endswith((".pkl", ".csv")) else self.dataset
        return "-".join([base, *(f"{key}{value}" for key, value in self.options)])


@dataclass(frozen=True)
class Evaluation:
    """One missing-data protocol scored on the test split."""

    protocol: str
    rates: tuple[float, ...] | None = None
    subsets: tuple[str, ...] | None = None
    seeds: tuple[int, ...] = (0,)
    overrides: tuple[str, ...] = ()  # model.KEY=VALUE test-time settings the checkpoint is scored with

    @property
    def key(self) -> str:
        fields = dataclasses.asdict(self)
        if not self.overrides:  # keys made before test-time settings existed stay the same
            del fields["overrides"]
        return identity(fields)


@dataclass(frozen=True)
class DomainGeneralization:
    """Train on every group of the dataset but the target, test on the target; one job per target."""

    targets: tuple[str, ...]
    group_by: str = "domains"


# what an `evaluate:` holds: missing-data protocols, or domain generalization, or the paper's recipe
Evaluations = tuple[tuple[Evaluation, ...], DomainGeneralization | None, bool]


@dataclass(frozen=True)
class ModelRef:
    """A model of the study, the settings it trains with and what its checkpoints are scored on
    (its own `evaluate:`, else the study's); `label` names its rows."""

    model: str
    label: str
    overrides: tuple[str, ...] = ()
    evaluations: tuple[Evaluation, ...] = ()
    dg: DomainGeneralization | None = None
    reproduce: bool = False  # trained and scored by its YAML's `reproduce:` recipe instead


@dataclass(frozen=True)
class Study:
    name: str
    path: str
    datasets: tuple[DatasetRef, ...]
    models: tuple[ModelRef, ...]
    seeds: tuple[int, ...]
    evaluations: tuple[Evaluation, ...]  # the study's; each model's own are on its ModelRef
    cpus: float = 1.0
    gpus: float = 0.0
    search: dict[str, Any] | None = None


@dataclass(frozen=True)
class Job:
    """One cell of the grid: train `model` on `dataset` with `seed`, then run the evaluations; with
    a `target`, train on the dataset's other groups (`group_by`) and score in and out of domain."""

    id: str
    dataset: DatasetRef
    model: ModelRef
    seed: int
    fingerprint: str
    config: dict[str, Any] = field(compare=False, repr=False)
    evaluations: tuple[Evaluation, ...] = ()
    metric_family: str = "mosi"  # the data's: which metrics its tables show
    target: str | None = None
    group_by: str | None = None
    recipe: dict[str, Any] | None = field(default=None, compare=False, repr=False)  # seeds aside


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
    where = f"datasets[{index}]"
    value = dict(_check_keys(path, where, value, DATASET_KEYS))
    if not isinstance(value.get("dataset"), str):
        raise _fail(path, f"{where}.dataset", "a dataset name or path is required")
    options = value.pop("options", None) or {}
    if not isinstance(options, dict):
        raise _fail(path, f"{where}.options", "expected a mapping of generator options, e.g. {audio_len: 50}")
    for key, option in options.items():
        if isinstance(option, bool) or not isinstance(option, int | float):
            raise _fail(path, f"{where}.options.{key}", f"expected a number, not {option!r}")
    if options:
        try:  # the generator's own check: an unknown option, or options on a dataset without them
            check_dataset_options(value["dataset"], options)
        except MsakitError as exc:
            raise _fail(path, f"{where}.options", str(exc)) from None
    label = value.pop("label", None)
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise _fail(path, f"{where}.label", "expected a non-empty string")
    return DatasetRef(**value, options=tuple(sorted(options.items())), name=label)


def _files(path: str, where: str, overrides: tuple[str, ...]) -> tuple[str, ...]:
    """`overrides` with each file setting (`FILE_SETTINGS`) made absolute; a missing file is an error."""
    try:
        parsed = parse_overrides(list(overrides))
    except MsakitError as exc:
        raise _fail(path, where, str(exc)) from None
    named = {(section, key): value for section, keys in FILE_SETTINGS.items()
             for key, value in parsed.get(section, {}).items() if key in keys and value is not None}
    out = []
    for override in overrides:
        setting = override.split("=", 1)[0].strip()
        section, _, key = setting.partition(".")
        if (section, key) in named:
            file = Path(str(named[section, key])).expanduser()
            if not file.is_file():
                raise _fail(path, where, f"{setting}={named[section, key]}: no such file")
            override = f"{setting}={file.resolve()}"
        out.append(override)
    return tuple(out)


def _test_time(path: str, where: str, value: Any) -> tuple[str, ...]:
    """An evaluation's `set`: model settings only, the ones a saved checkpoint is scored with."""
    overrides = _strings(path, where, value)
    wrong = next((o for o in overrides if not o.strip().startswith("model.")), None)
    if wrong is not None:
        raise _fail(path, where, f"{wrong!r}: only model.KEY=VALUE test-time settings apply to a checkpoint")
    return overrides


def _model(path: str, index: int, value: Any, shared: tuple[str, ...],
           evaluations: Evaluations) -> ModelRef:
    """The model entry at `index`, after the study's shared settings and with the study's
    evaluations unless it has its own."""
    where = f"models[{index}]"
    if isinstance(value, str):
        value = {"model": value}
    value = _check_keys(path, where, value, MODEL_KEYS)
    if not isinstance(value.get("model"), str):
        raise _fail(path, f"{where}.model", "a registered model name is required")
    label = value.get("label", value["model"])
    if not isinstance(label, str) or not label:
        raise _fail(path, f"{where}.label", "expected a non-empty string")
    overrides = shared + _files(path, f"{where}.set", _strings(path, f"{where}.set", value.get("set")))
    protocols, dg, reproduce = _evaluations(path, f"{where}.evaluate", value["evaluate"]) \
        if "evaluate" in value else evaluations
    if reproduce and not model_yaml(value["model"]).get("reproduce"):
        raise _fail(path, where, f"{value['model']} declares no `reproduce:` recipe in its YAML, "
                                 "so it cannot be evaluated by one")
    return ModelRef(value["model"], label, overrides, protocols, dg, reproduce)


def _evaluations(path: str, where: str, value: Any) -> Evaluations:
    """What an `evaluate:` mapping asks: missing-data protocols, or domain-generalization targets,
    or the model's `reproduce:` recipe (the last two alone)."""
    value = _check_keys(path, where, value or {}, (*PROTOCOL_NAMES, "dg", "reproduce"))
    alone = next((kind for kind in ("dg", "reproduce") if kind in value), None)
    if alone is not None and len(value) > 1:
        other = next(k for k in value if k != alone)
        raise _fail(path, f"{where}.{other}", f"a {alone} evaluation takes no other evaluation beside it")
    if alone == "reproduce":
        if value["reproduce"]:
            raise _fail(path, f"{where}.reproduce", "takes no settings ({}): the model's YAML holds the "
                                                    "recipe, the study its seeds")
        return (), None, True
    if alone == "dg":
        settings = _check_keys(path, f"{where}.dg", value["dg"] or {}, DG_KEYS)
        targets = settings.get("targets")
        if not isinstance(targets, list) or not targets or \
                not all(isinstance(t, str | int) and not isinstance(t, bool) for t in targets):
            raise _fail(path, f"{where}.dg.targets", "expected a non-empty list of group names, e.g. ['0']")
        group_by = settings.get("group_by", "domains")
        if not isinstance(group_by, str) or not group_by:
            raise _fail(path, f"{where}.dg.group_by", "expected domains, video, cluster or FILE.csv:COLUMN")
        return (), DomainGeneralization(tuple(str(t) for t in targets), group_by), False
    out = []
    for protocol, settings in value.items():
        settings = _check_keys(path, f"{where}.{protocol}", settings or {}, EVALUATION_KEYS)
        rates = settings.get("rates")
        subsets = settings.get("subsets")
        if protocol == "fixed" and rates is not None:
            raise _fail(path, f"{where}.fixed.rates", "the fixed protocol takes subsets, not rates")
        if protocol != "fixed" and subsets is not None:
            raise _fail(path, f"{where}.{protocol}.subsets", f"the {protocol} protocol takes rates")
        out.append(Evaluation(
            protocol,
            rates=None if rates is None else _numbers(path, f"{where}.{protocol}.rates", rates, float),
            subsets=None if subsets is None else _strings(path, f"{where}.{protocol}.subsets", subsets),
            seeds=_numbers(path, f"{where}.{protocol}.seeds", settings.get("seeds", [0]), int),
            overrides=_test_time(path, f"{where}.{protocol}.set", settings.get("set")),
        ))
    return tuple(out), None, False


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
    shared = _files(where, "set", _strings(where, "set", document.get("set")))
    evaluations = _evaluations(where, "evaluate", document.get("evaluate"))
    models = [_model(where, i, m, shared, evaluations) for i, m in enumerate(document["models"])]
    labels = [m.label for m in models]
    repeated = next((label for label in labels if labels.count(label) > 1), None)
    if repeated:
        raise _fail(where, "models", f"two models are labelled {repeated!r}: give each a distinct `label`")
    datasets = [_dataset(where, i, d) for i, d in enumerate(document["datasets"])]
    names = [d.label for d in datasets]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated:
        raise _fail(where, "datasets", f"two datasets are labelled {repeated!r}: give each its own `label`")
    resources = _check_keys(where, "resources", document.get("resources") or {}, ("cpus", "gpus"))
    for key, amount in resources.items():
        if isinstance(amount, bool) or not isinstance(amount, int | float) or amount < 0:
            raise _fail(where, f"resources.{key}", f"expected a number >= 0, not {amount!r}")
    search = document.get("search")
    if search is not None and not isinstance(search, dict):
        raise _fail(where, "search", "expected a mapping")
    return Study(
        name=name.strip(), path=where,
        datasets=tuple(datasets), models=tuple(models),
        seeds=_numbers(where, "seeds", document.get("seeds", [1111]), int),
        evaluations=evaluations[0],
        cpus=float(resources.get("cpus", 1)), gpus=float(resources.get("gpus", 0)), search=search,
    )


# settings that never change a training's numbers: where its curves go, how often its state is saved
NEUTRAL_SETTINGS = {"training": ("log", "state_every")}


def file_identity(path: str | Path) -> dict[str, str]:
    """A file's place in a job identity: the hash of its content."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"file sha256": digest.hexdigest()}


def identity_settings(config: dict[str, Any],
                      files: Callable[[str], Any] = file_identity) -> dict[str, dict[str, Any]]:
    """The settings of `config` that enter a job identity (see `job_identity`), each file setting
    replaced by `files(path)`: its content's hash by default."""
    return {section: {key: files(value) if value is not None and key in FILE_SETTINGS.get(section, ())
                      else value
                      for key, value in values.items() if key not in NEUTRAL_SETTINGS.get(section, ())}
            for section, values in without_added_settings(config).items()}


def job_identity(model: str, config: dict[str, Any], seed: int, fingerprint: str,
                 target: str | None = None, group_by: str | None = None,
                 recipe: dict[str, Any] | None = None) -> str:
    """What makes two trainings the same: the model, every setting in force (but the neutral ones,
    and those of `msakit.training.settings.ADDED_SETTINGS` at their listed value; the files of
    `FILE_SETTINGS` by content), the seed, the data, a DG job's target and grouping, a reproduce
    job's recipe."""
    cell = {"model": model, "config": identity_settings(config), "seed": seed, "data": fingerprint}
    if target is not None:
        cell["dg"] = {"target": target, "group_by": group_by}
    if recipe is not None:
        cell["reproduce"] = recipe
    return identity(cell)


def study_recipe(model: str) -> dict[str, Any]:
    """The model's `reproduce:` recipe as a study runs it: every setting but its seeds (the study's)."""
    recipe = dataclasses.asdict(load_recipe(model_yaml(model).get("reproduce"), model))
    del recipe["seeds"]
    return recipe


def check_dataset_options(dataset: str, options: dict[str, Any]) -> None:
    """A one-line error for generator options `dataset` does not take (only the synthetic datasets
    have a generator)."""
    if dataset.strip().lower() not in SYNTHETIC:
        raise MsakitError(f"generator options apply only to the synthetic datasets ({', '.join(SYNTHETIC)}), "
                          f"not {dataset!r}")
    check_synthetic_sizes(options)


def load_data(ref: DatasetRef, model: str) -> MultimodalDataset:
    """The dataset `ref` names, with its generator options, in the form (aligned or not) `model` reads."""
    return api.load_dataset(ref.dataset, ref.data_dir, family=ref.family,
                            aligned=aligned_input(model, ref.aligned), **dict(ref.options))
