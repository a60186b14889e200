"""A study's `search:` section: Optuna searches a model's settings on the validation split only.

```yaml
search:
  models: [tfn]                  # the model labels to search (default: every model of the study)
  metric: mae                    # the validation metric (MAE is minimised, the others maximised)
  trials: 20                     # finished trials per model and dataset (a rerun adds only what lacks)
  parallel: 2                    # trials in flight at once (each one a job on Ray)
  sampler_seed: 0                # TPE's seed
  pruner: median                 # median (prune a trial whose curve falls below the median) | none
  startup_trials: 5              # trials that are never pruned, before the median means anything
  warmup_epochs: 0               # epochs of every trial that are never pruned
  params:
    training.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
    model.dropout: {low: 0.0, high: 0.5}
    model.hidden: {choices: [32, 64, 128]}
```

Each trial trains the model once, with the study's first seed and the sampled settings over the
model's own, and reports its validation metric after every epoch, so that the pruner can stop a
trial whose curve is below the median of the others at that epoch. A trial's dataset has an empty
test split (the objective cannot read it, whatever the model's code does). The best trial's
settings are then added to the model's settings, and the study's grid trains them with every seed
and scores the test split once.

Trials are distributed through Optuna's shared RDB storage rather than Ray Tune: the storage is the
study's own store (the same SQLite file or SQLAlchemy URL), so one database holds the records and
the searches, `optuna-dashboard <store URL>` opens them, and a trial is an ordinary study job on Ray
that reports to the storage itself. The driver asks TPE for at most `parallel` trials at a time, so
each new trial is sampled knowing the finished ones.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np

from msakit.errors import MsakitError
from msakit.metrics import LOWER_IS_BETTER, METRIC_KEYS
from msakit.study.spec import DatasetRef, ModelRef, Study, identity, load_data
from msakit.training.runs import fit_one_seed, prepare_run, resolved_config

logger = logging.getLogger(__name__)

SEARCH_KEYS = ("models", "metric", "trials", "parallel", "sampler_seed", "pruner", "startup_trials",
               "warmup_epochs", "params")
PARAM_KEYS = ("low", "high", "log", "step", "choices")
PRUNERS = ("median", "none")


@dataclasses.dataclass(frozen=True)
class Search:
    models: tuple[str, ...]
    metric: str
    trials: int
    parallel: int
    sampler_seed: int
    pruner: str
    startup_trials: int
    warmup_epochs: int
    params: dict[str, dict[str, Any]]


def _fail(path: str, where: str, message: str) -> MsakitError:
    return MsakitError(f"{path}: search.{where}: {message}")


def _count(path: str, key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(path, key, f"expected an integer >= {low}, not {value!r}")
    return value


def _param(path: str, name: str, spec: Any) -> dict[str, Any]:
    if not isinstance(spec, dict) or set(spec) - set(PARAM_KEYS):
        raise _fail(path, f"params.{name}", f"expected a mapping of {', '.join(PARAM_KEYS)}")
    if name.split(".")[0] not in ("model", "training", "data") or "." not in name:
        raise _fail(path, f"params.{name}", "a parameter is SECTION.KEY, the section model, training or data")
    if "choices" in spec:
        if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
            raise _fail(path, f"params.{name}", "choices is a non-empty list, alone")
        return {"choices": list(spec["choices"])}
    numbers = [spec.get("low"), spec.get("high")]
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in numbers) or \
            numbers[0] >= numbers[1]:
        raise _fail(path, f"params.{name}", "expected numbers low < high (or choices)")
    if spec.get("log") and numbers[0] <= 0:
        raise _fail(path, f"params.{name}", "a log-scaled range needs low > 0")
    return dict(spec)


def load_search(study: Study) -> Search | None:
    """The study's `search:` section, checked (None when it has none)."""
    if study.search is None:
        return None
    path, spec = study.path, study.search
    unknown = sorted(set(spec) - set(SEARCH_KEYS))
    if unknown:
        raise _fail(path, unknown[0], f"unknown key; known: {', '.join(SEARCH_KEYS)}")
    labels = [m.label for m in study.models]
    models = spec.get("models", labels)
    if not isinstance(models, list) or not models or any(m not in labels for m in models):
        raise _fail(path, "models", f"expected a list of the study's model labels ({', '.join(labels)})")
    by_domain = next((m.label for m in study.models if m.label in models and m.dg is not None), None)
    if by_domain is not None:  # its selection data are the sources', per target: no one split to tune on
        raise _fail(path, "models", f"{by_domain!r} is evaluated by domain generalization, which a search "
                                    "does not tune; leave it out of search.models")
    known = sorted({k for keys in METRIC_KEYS.values() for k in keys})
    metric = spec.get("metric", "mae")
    if metric not in known:
        raise _fail(path, "metric", f"{metric!r} is not a metric; one of {', '.join(known)}")
    pruner = spec.get("pruner", "median")
    if pruner not in PRUNERS:
        raise _fail(path, "pruner", f"expected one of {', '.join(PRUNERS)}, not {pruner!r}")
    params = spec.get("params")
    if not isinstance(params, dict) or not params:
        raise _fail(path, "params", "expected a mapping of SECTION.KEY to a range or choices")
    return Search(tuple(models), metric, _count(path, "trials", spec.get("trials", 20), 1),
                  _count(path, "parallel", spec.get("parallel", 1), 1),
                  _count(path, "sampler_seed", spec.get("sampler_seed", 0), 0), pruner,
                  _count(path, "startup_trials", spec.get("startup_trials", 5), 0),
                  _count(path, "warmup_epochs", spec.get("warmup_epochs", 0), 0),
                  {name: _param(path, name, p) for name, p in params.items()})


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise MsakitError("a study's search needs Optuna: pip install 'msakit[study]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _distributions(search: Search) -> dict[str, Any]:
    optuna = _optuna()
    out = {}
    for name, spec in search.params.items():
        if "choices" in spec:
            out[name] = optuna.distributions.CategoricalDistribution(spec["choices"])
        elif all(isinstance(spec.get(k, 1), int) for k in ("low", "high", "step")):
            out[name] = optuna.distributions.IntDistribution(
                spec["low"], spec["high"], log=bool(spec.get("log")), step=spec.get("step", 1))
        else:
            out[name] = optuna.distributions.FloatDistribution(
                float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")), step=spec.get("step"))
    return out


def optuna_name(study: Study, dataset: DatasetRef, model: ModelRef, fingerprint: str) -> str:
    """The Optuna study of one model on one dataset: named by both and by what the search depends on."""
    depends = identity([model.overrides, study.search, fingerprint])
    return f"{study.name}/{dataset.label}/{model.label}/{depends}"


def as_overrides(params: dict[str, Any]) -> tuple[str, ...]:
    """Sampled settings as SECTION.KEY=VALUE overrides (floats in full precision)."""
    return tuple(f"{name}={value!r}" if isinstance(value, float) else f"{name}={value}"
                 for name, value in sorted(params.items()))


def without_test(data: Any) -> Any:
    """`data` with an empty test split: what a search trial trains and validates on."""
    return data.derive(test=data.test.subset(np.array([], dtype=np.int64)))


def run_trial(dataset: DatasetRef, model: ModelRef, overrides: tuple[str, ...], seed: int, fingerprint: str,
              storage: str, name: str, trial_id: int, search: Search) -> dict[str, Any]:
    """One trial: train on the training split, report the validation metric after every epoch,
    stop when the pruner says so. Returns {"value", "pruned", "epochs"}."""
    optuna = _optuna()
    data = load_data(dataset, model.model)
    if data.fingerprint != fingerprint:
        raise MsakitError(f"{dataset.dataset} changed since the search was planned: run the study again")
    setup = prepare_run(model.model, without_test(data), overrides, None)
    metric = search.metric
    searched = optuna.load_study(study_name=name, storage=storage, pruner=_pruner(optuna, search))
    trial = optuna.trial.Trial(searched, trial_id)
    epochs = 0

    def report(record: Any, step: int, rates: list[float]) -> None:
        nonlocal epochs
        epochs = step
        value = float(record.valid[metric])
        if math.isfinite(value):
            trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned()

    try:
        _, fit = fit_one_seed(model.model, setup.data, setup.config, seed, False, on_epoch=report)
    except optuna.TrialPruned:
        return {"value": None, "pruned": True, "epochs": epochs}
    value = float(fit.best_valid.get(metric, math.nan))  # at the epoch the training would keep
    if not math.isfinite(value):
        raise MsakitError(f"trial {trial.number}: validation {metric} {value} at the selected epoch")
    return {"value": value, "pruned": False, "epochs": epochs}


def _pruner(optuna: Any, search: Search) -> Any:
    if search.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=search.startup_trials,
                                       n_warmup_steps=search.warmup_epochs)


def _create(optuna: Any, search: Search, storage: str, name: str) -> Any:
    return optuna.create_study(
        study_name=name, storage=storage, load_if_exists=True, pruner=_pruner(optuna, search),
        sampler=optuna.samplers.TPESampler(seed=search.sampler_seed),
        direction="minimize" if search.metric in LOWER_IS_BETTER else "maximize")


def tune(study: Study, search: Search, storage: str, runner: Any) -> dict[tuple[str, str], tuple[str, ...]]:
    """Runs the trials each searched (dataset, model) still lacks on `runner` (an executor) and
    returns the best trial's settings as overrides, per (dataset label, model label)."""
    optuna = _optuna()
    states = optuna.trial.TrialState
    distributions = _distributions(search)
    seed = study.seeds[0]
    chosen = {}
    for ref in study.datasets:
        for model in (m for m in study.models if m.label in search.models):
            data = load_data(ref, model.model)
            fingerprint = data.fingerprint
            # a parameter the model does not have is one error now, not a failure per trial
            corner = {name: spec["choices"][0] if "choices" in spec else spec["low"]
                      for name, spec in search.params.items()}
            resolved_config(model.model, data, model.overrides + as_overrides(corner), None)
            name = optuna_name(study, ref, model, fingerprint)
            searched = _create(optuna, search, storage, name)
            for left in searched.get_trials(deepcopy=False, states=(states.RUNNING,)):
                searched.tell(left.number, state=states.FAIL)  # from a run that was stopped
            finished = len(searched.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)))
            in_flight: dict[int, Any] = {}
            failed = 0
            while finished + len(in_flight) < search.trials or in_flight:
                while len(in_flight) < search.parallel and finished + len(in_flight) < search.trials:
                    trial = searched.ask(distributions)
                    in_flight[trial.number] = trial
                    # Trial(study, id) in the worker binds it to this trial in the shared storage
                    runner.submit(trial.number, run_trial, ref, model,
                                  model.overrides + as_overrides(trial.params), seed, fingerprint, storage,
                                  name, trial._trial_id, search)
                number, result, error = runner.next_done()
                in_flight.pop(number)
                if result is None:
                    logger.warning("%s trial %d failed: %s", name, number, error)
                    searched.tell(number, state=states.FAIL)
                    failed += 1
                    if failed >= search.trials:  # the settings, not bad luck: stop asking
                        for other in in_flight:
                            searched.tell(other, state=states.FAIL)
                        raise MsakitError(f"search {name}: {failed} trials failed; the last: {error}")
                    continue
                finished += 1
                if result["pruned"]:
                    searched.tell(number, state=states.PRUNED)
                else:
                    searched.tell(number, result["value"])
            complete = searched.get_trials(deepcopy=False, states=(states.COMPLETE,))
            if not complete:
                raise MsakitError(f"search {name}: no trial completed (all pruned or failed)")
            best = searched.best_trial
            logger.info("search %s: best validation %s %.4f with %s (trial %d of %d)", name, search.metric,
                        best.value, ", ".join(as_overrides(best.params)), best.number, len(complete))
            chosen[ref.label, model.label] = as_overrides(best.params)
    return chosen


def best_settings(study: Study, search: Search, storage: str) -> dict[tuple[str, str], tuple[str, ...]]:
    """The settings the finished search chose (for the report), without running anything."""
    optuna = _optuna()
    chosen = {}
    for ref in study.datasets:
        for model in (m for m in study.models if m.label in search.models):
            name = optuna_name(study, ref, model, load_data(ref, model.model).fingerprint)
            try:
                searched = optuna.load_study(study_name=name, storage=storage)
                chosen[ref.label, model.label] = as_overrides(searched.best_trial.params)
            except (KeyError, ValueError):
                raise MsakitError(f"search {name} has no finished trial in {storage}: run the study first"
                                  ) from None
    return chosen
