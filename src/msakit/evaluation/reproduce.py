"""A paper's evaluation recipe, declared in its model's YAML under `reproduce:`.

    reproduce:
      seeds: [1111, 1112, 1113]
      protocol: intra                    # intra, inter or fixed (msakit.missing)
      rates: [0.0, 0.1, ..., 0.9]        # or `subsets:` for the fixed protocol
      selection_rate: 0.5                # validation is scored under the protocol at this rate
      per_metric: true                   # each metric from its own checkpoint (false: one checkpoint)
      one_model_per_rate: false          # true: a model per rate, trained, selected and tested at it

Some papers (LNLN among them) report each metric from its own checkpoint: the epoch that scored
best on that metric. `per_metric_scores` does that, with one difference from the official code it
reproduces: checkpoints are chosen on the VALIDATION split, never on test. An F1 is read from the
checkpoint of its accuracy, as the official code does. With `per_metric: false` every metric comes
from the one checkpoint `training.select_metric` chose (`selected_scores`).

Other papers (HME) train one model per missing rate: with `one_model_per_rate` each rate r gets its
own model per seed, trained with the model's training noise (`training.noise`) at rate r, selected
on validation under the protocol at r and tested under the protocol at r only (`recipe_models`).

Each metric of a seed is the mean over the protocol's conditions; the report is the mean and std of
that over seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from msakit.data.schema import MultimodalDataset
from msakit.errors import MsakitError, reject_unknown_keys
from msakit.evaluation.protocols import run_protocol
from msakit.evaluation.report import mean_std
from msakit.metrics import METRIC_KEYS
from msakit.missing import PROTOCOLS
from msakit.training.runs import RunSetup, fit_one_seed, run_meta, seed_runs
from msakit.training.settings import SELECT_PROTOCOLS
from msakit.training.trainer import Trainer

# an F1 is reported from the checkpoint selected for its accuracy
SELECTED_WITH = {"f1_has0": "acc2_has0", "f1_non0": "acc2_non0", "f1": "acc2"}


@dataclass(frozen=True)
class Recipe:
    seeds: Sequence[int] = (1111, 1112, 1113)
    protocol: str = "intra"
    rates: Sequence[float] | None = None
    subsets: Sequence[str] | None = None
    selection_rate: float = 0.0
    mask_seeds: Sequence[int] = (0,)  # seeds of the test-time masks
    per_metric: bool = True  # each metric from its own checkpoint; False: select_metric's only
    one_model_per_rate: bool = False  # a model per rate: trained, selected and tested at that rate

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise MsakitError(
                f"reproduce.protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}"
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise MsakitError(f"reproduce.seeds must be distinct and at least one, not {self.seeds}")
        for key in ("per_metric", "one_model_per_rate"):
            if not isinstance(getattr(self, key), bool):
                raise MsakitError(f"reproduce.{key} must be true or false, not {getattr(self, key)!r}")
        if self.one_model_per_rate:
            if self.protocol not in SELECT_PROTOCOLS or not self.rates:
                raise MsakitError("reproduce.one_model_per_rate needs the intra or inter protocol and "
                                  "its rates (each model is trained and selected at one rate)")
            if self.selection_rate:
                raise MsakitError("reproduce.selection_rate does not apply with one_model_per_rate: "
                                  "each model is selected at its own rate")


def load_recipe(values: dict[str, Any] | None, model: str) -> Recipe:
    """The `reproduce:` section of a model's YAML as a checked Recipe."""
    if not values:
        raise MsakitError(f"model {model!r} declares no `reproduce` recipe in its YAML")
    reject_unknown_keys(values, Recipe, f"reproduce setting(s) for {model}")
    return Recipe(**values)


def recipe_models(recipe: Recipe, training: dict[str, Any]) -> list[tuple[str, dict[str, Any], Recipe]]:
    """The models a recipe trains per seed, as (name, changes to the training settings, the recipe
    that scores it). One model, named "", selected under the protocol at `selection_rate` (clean
    validation for 0) and tested at every rate or subset; with `one_model_per_rate`, one per rate
    r, named "rate-r": training noise at r, selected under the protocol at r, tested at r only."""
    if not recipe.one_model_per_rate:
        select = ({"select_protocol": recipe.protocol, "select_rate": recipe.selection_rate}
                  if recipe.selection_rate else {})
        return [("", select, recipe)]
    if training["noise"] == "none":
        raise MsakitError("reproduce.one_model_per_rate trains each model with training.noise at its "
                          "rate; this model's training.noise is none")
    return [(f"rate-{rate:g}",
             {"noise_rate": rate, "select_protocol": recipe.protocol, "select_rate": rate},
             replace(recipe, rates=(rate,)))
            for rate in recipe.rates]


def merge_models(runs_per_model: list[list[dict[str, Any]]], names: list[str]) -> list[dict[str, Any]]:
    """Per seed, the runs of a recipe's models (`recipe_models`, same seed order) as one run: their
    rows (conditions) together, the mean over those rows, and each model's own record."""
    if len(runs_per_model) == 1:
        return runs_per_model[0]
    merged = []
    for per_seed in zip(*runs_per_model, strict=True):
        rows = [row for run in per_seed for row in run["rows"]]
        merged.append({
            "seed": per_seed[0]["seed"], "rows": rows, "mean": mean_std([r["metrics"] for r in rows])[0],
            "models": [{"model": name, **{k: v for k, v in run.items() if k not in ("seed", "rows", "mean")}}
                       for name, run in zip(names, per_seed, strict=True)],
        })
    return merged


def tracked_metrics(metric_family: str) -> list[str]:
    """The metrics that get their own checkpoint (every metric but the F1s)."""
    return [m for m in METRIC_KEYS[metric_family] if m not in SELECTED_WITH]


def per_metric_scores(
    trainer: Trainer, data: MultimodalDataset, recipe: Recipe
) -> dict[str, Any]:
    """Test metrics under the recipe's protocol, each from the checkpoint selected for it.

    Returns {"rows": [{"condition", "metrics", "epochs"}], "mean": {...}}: per condition (rate or
    subset) every metric, and the epoch of the checkpoint it came from.
    """
    keys = METRIC_KEYS[data.metric_family]
    current = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    by_condition: dict[str, dict[str, float]] = {}
    epochs: dict[str, int] = {}
    means: dict[str, float] = {}
    for metric in tracked_metrics(data.metric_family):
        snapshot = trainer.best_by_metric[metric]
        trainer.model.load_state_dict(snapshot.state)
        result = run_protocol(trainer, data, recipe.protocol, rates=recipe.rates,
                              subsets=recipe.subsets, seeds=recipe.mask_seeds)
        for key in [metric, *[f1 for f1, acc in SELECTED_WITH.items() if acc == metric]]:
            if key not in keys:
                continue
            epochs[key] = snapshot.epoch
            means[key] = result["mean"][key]
            for row in result["rows"]:
                by_condition.setdefault(row["condition"], {})[key] = row["metrics"][key]
    trainer.model.load_state_dict(current)
    rows = [{"condition": c, "metrics": {k: m[k] for k in keys}} for c, m in by_condition.items()]
    return {"rows": rows, "mean": {k: means[k] for k in keys}, "epochs": {k: epochs[k] for k in keys}}


def selected_scores(
    trainer: Trainer, data: MultimodalDataset, recipe: Recipe, best_epoch: int
) -> dict[str, Any]:
    """Test metrics under the recipe's protocol from the checkpoint the trainer restored (the one
    `training.select_metric` chose on validation, at `best_epoch`); as `per_metric_scores`."""
    result = run_protocol(trainer, data, recipe.protocol, rates=recipe.rates, subsets=recipe.subsets,
                          seeds=recipe.mask_seeds)
    rows = [{"condition": r["condition"], "metrics": r["metrics"]} for r in result["rows"]]
    return {"rows": rows, "mean": result["mean"], "epochs": dict.fromkeys(result["mean"], best_epoch)}


def recipe_runs(
    setup: RunSetup, recipe: Recipe, out_dir: Path | None, *, resume: bool, overwrite: bool,
    progress: bool,
) -> tuple[list[tuple[str, dict[str, Any], Recipe]], list[dict[str, Any]]]:
    """Train and score the recipe's models (one, or one per rate), each once per recipe seed, with
    their checkpoints in `out_dir` (per rate in `rate-<r>/`): the models and each seed's scores."""
    data, config = setup.data, setup.config
    models = recipe_models(recipe, config["training"])
    track = tracked_metrics(data.metric_family) if recipe.per_metric else ()

    def runs_of(name: str, changes: dict[str, Any], scoring: Recipe) -> list[dict[str, Any]]:
        settings = {**config, "training": {**config["training"], **changes}}

        def train_seed(seed: int, state: dict[str, Any]) -> tuple[Trainer, dict[str, Any], dict[str, Any]]:
            trainer, fit = fit_one_seed(setup.model, data, settings, seed, progress, track_metrics=track,
                                        **state)
            scores = (per_metric_scores(trainer, data, scoring) if recipe.per_metric
                      else selected_scores(trainer, data, scoring, fit.best_epoch))
            run = {"seed": seed, **scores, "history": [asdict(r) for r in fit.history]}
            return trainer, run, {"test": run["mean"]}

        folder = out_dir / name if out_dir is not None and name else out_dir
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        return seed_runs(recipe.seeds, folder, resume, settings, data,
                         run_meta("reproduce", setup.model, settings, data), train_seed,
                         setup.normalization, overwrite)

    runs = merge_models([runs_of(*m) for m in models], [name for name, _, _ in models])
    if not recipe.one_model_per_rate:
        config["training"].update(models[0][1])
    return models, runs
