"""The Python API behind every CLI command: train, evaluate, list models and datasets.

    >>> from msakit import api
    >>> run = api.train("tfn", "synthetic", seeds=[1111], epochs=3, output="runs/tfn")
    >>> run["mean"]["test"]["mae"]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from msakit import __version__
from msakit.cues import attach_cues, load_cue_texts, with_cues
from msakit.data.catalog import check_synthetic_sizes
from msakit.data.catalog import list_datasets as _list_datasets
from msakit.data.catalog import load_dataset as _load_dataset
from msakit.data.mmsa import save_mmsa
from msakit.data.normalize import fit_normalization, normalize_dataset, normalize_split, scale_warnings
from msakit.data.schema import SPLITS, Batch, MultimodalDataset
from msakit.data.synthetic import generate_synthetic
from msakit.data.tokens import encoder_vocab_size
from msakit.data.validate import check_labels, check_token_ids
from msakit.errors import MsakitError
from msakit.evaluation.domains import check_model, dataset_task, group_task, score_task, summarise, write_dg
from msakit.evaluation.protocols import plot_curves, run_protocol, write_robustness
from msakit.evaluation.report import LABELS, csv_text, format_value, mean_std
from msakit.evaluation.reproduce import (
    Recipe,
    load_recipe,
    merge_models,
    per_metric_scores,
    recipe_models,
    selected_scores,
    tracked_metrics,
)
from msakit.fileio import atomic_write_json, atomic_write_text, check_output
from msakit.metrics import LOWER_IS_BETTER, METRIC_KEYS, UNDEFINED_REASONS, prediction_warnings
from msakit.missing import MissingSpec, apply_missing, build_noise
from msakit.models.layers.text import special_token_ids
from msakit.models.registry import build_config, create_model, get_model_class
from msakit.models.registry import list_models as _list_models
from msakit.training.checkpoint import FORMAT as CHECKPOINT_FORMAT
from msakit.training.checkpoint import check_dims_match, load_checkpoint, read_tagged, save_checkpoint
from msakit.training.config import data_config, model_yaml, parse_overrides, resolve_config, training_config
from msakit.training.settings import scale_stages
from msakit.training.trainer import FitResult, Trainer, first_difference, seed_everything

logger = logging.getLogger(__name__)


def list_models() -> list[dict[str, str]]:
    """Every registered model with the first line of its docstring."""
    out = []
    for name in _list_models():
        doc = (get_model_class(name).__doc__ or "").strip().splitlines()
        out.append({"name": name, "description": doc[0] if doc else ""})
    return out


def list_datasets() -> list[dict[str, str]]:
    """Every dataset name `--dataset` takes, what it is and what it needs."""
    return _list_datasets()


def load_dataset(
    dataset: str | MultimodalDataset, data_dir: str | None = None, family: str | None = None,
    **options: Any
) -> MultimodalDataset:
    """A dataset by name or path (see `msakit datasets`), or the given one (its `family` replaced
    when one is given). The family (settings section and metric rules) is logged."""
    if isinstance(dataset, MultimodalDataset):
        if family is not None:
            dataset = dataclasses.replace(dataset, family=family, family_source="given with --family")
    else:
        dataset = _load_dataset(dataset, data_dir=data_dir, family=family, **options)
    logger.info("%s: family %s (%s)", dataset.name, dataset.family, dataset.family_source or "given")
    return dataset


def write_synthetic(
    output: str | Path, *, seed: int = 0, aligned: bool = False, **sizes: float
) -> dict[str, Any]:
    """Write the synthetic dataset as an MMSA pickle at `output`; sizes as `generate_synthetic`'s."""
    check_output(output, folder=False)
    check_synthetic_sizes(sizes)
    raw = generate_synthetic(seed=seed, aligned=aligned, **sizes)
    path = save_mmsa(raw, output)
    return {"path": str(path), "sizes": {s: len(raw[s]["id"]) for s in ("train", "valid", "test")}}


def _side_inputs(model: str, config: dict[str, Any], data: MultimodalDataset, training: bool = True
                 ) -> tuple[MultimodalDataset, dict[str, Any]]:
    """`data` with the side inputs the model reads (`MSAModel.side_inputs`: MMSLF's cues) attached
    to every split, and {"inputs": {name: who wrote them}} for the results, when it reads any."""
    records = {}
    for name, path in get_model_class(model).side_inputs(config, training).items():
        if name != "cues":
            raise MsakitError(f"{model} reads a side input {name!r}, which msakit cannot provide")
        data, records[name] = attach_cues(data, path)
    return data, ({"inputs": records} if records else {})


def _normalized(data: MultimodalDataset, config: dict[str, Any]
                ) -> tuple[MultimodalDataset, dict[str, Any], list[str]]:
    """`data` checked against the run's settings (`_check_inputs`) and normalised as
    `config["data"]` says (statistics from the training split), those statistics (saved in every
    checkpoint), and the warnings: validation's (logged at load) and the scales of the modalities
    left raw."""
    settings = data_config(config["data"])
    _check_inputs(data, config["model"], settings.label_range)
    stats = fit_normalization(data.train, settings)
    warnings = scale_warnings(data.train, settings)
    for line in warnings:
        logger.warning("%s: %s", data.name, line)
    return normalize_dataset(data, stats), stats, [*data.warnings, *warnings]


def _check_inputs(data: MultimodalDataset, model_config: dict[str, Any],
                  label_range: Sequence[float] | None) -> None:
    """The checks of `msakit.data.validate` that need the run's settings: labels in the family's
    range (or `data.label_range`), token ids in the text encoder's vocabulary (when it reads them)."""
    check_labels(data, label_range)
    if model_config.get("text_source") == "encoder":
        encoder = model_config["text_encoder"]
        check_token_ids(data, encoder_vocab_size(encoder), encoder)


def _aligned(model: str, aligned: bool | None) -> bool:
    """Whether to read the word-aligned pickles: as asked, else as the model's paper did
    (`MSAModel.aligned_input`: HME's official code reads aligned_*.pkl only)."""
    return get_model_class(model).aligned_input if aligned is None else aligned


def _checkpoint_aligned(checkpoint: str | Path, aligned: bool | None) -> bool:
    """`_aligned` for the model a checkpoint holds (a missing file is reported when it is loaded)."""
    if aligned is not None or not Path(checkpoint).is_file():
        return bool(aligned)
    return _aligned(read_tagged(Path(checkpoint), CHECKPOINT_FORMAT, "checkpoint")["model_name"], None)


def _this_command() -> str:
    """The command line of this process, for results that did not get one from the CLI."""
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def _dataset_info(data: MultimodalDataset) -> dict[str, Any]:
    return {
        "name": data.name, "content_fingerprint": data.fingerprint, "family": data.family,
        "family_source": data.family_source,
        "metric_family": data.metric_family, "source": data.source,
        "sizes": {s: len(data.split(s)) for s in ("train", "valid", "test")},
        "replaced_nonfinite": data.replaced_nonfinite,
        **({"features": data.features} if data.features is not None else {}),
    }


def train(
    model: str,
    dataset: str | MultimodalDataset,
    *,
    data_dir: str | None = None,
    aligned: bool | None = None,
    family: str | None = None,
    seeds: Sequence[int] = (1111,),
    epochs: int | None = None,
    overrides: Sequence[str] = (),
    output: str | Path | None = None,
    progress: bool = True,
    command: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train `model` once per seed, select each on validation, score valid and test.

    Writes, when `output` is given: `results.json` (per-seed and mean/std metrics, resolved config,
    command), `results.csv` (one row per seed plus mean and std) and `seed-<seed>.pt` checkpoints.
    While a seed trains, its whole training state is kept in `seed-<seed>.state.pt` (updated every
    epoch, removed once the checkpoint is written). With `resume`, an interrupted run continues: a
    seed whose checkpoint this same run already wrote is read back, the seed that was training
    continues from its last epoch, and the result equals an uninterrupted run's. Returns the content
    of results.json.
    """
    if output is not None:
        check_output(output)
    get_model_class(model)
    _check_seeds(seeds)
    data = load_dataset(dataset, data_dir, family, aligned=_aligned(model, aligned))
    config = _resolved_config(model, data, overrides, epochs)
    data, normalization, data_warnings = _normalized(data, config)
    data, inputs = _side_inputs(model, config, data)
    out_dir = Path(output) if output is not None else None
    multi_stage = len(config["training"]["stages"]) > 1

    def train_seed(seed: int, state: dict[str, Any]) -> tuple[Trainer, dict[str, Any], dict[str, Any]]:
        trainer, fit = _fit_one_seed(model, data, config, seed, progress, score_stages=multi_stage,
                                     **state)
        stages = fit.stage_reports
        run = {
            "seed": seed,
            "best_epoch": fit.best_epoch,
            "epochs_run": fit.epochs_run,
            "valid": fit.best_valid,  # the restored weights' own validation score
            "test": stages[-1]["test"] if stages else trainer.evaluate(data.test),
            "history": [dataclasses.asdict(r) for r in fit.history],
            **({"stages": stages} if stages else {}),
        }
        return trainer, run, {"valid": run["valid"], "test": run["test"]}

    runs = _seed_runs(seeds, out_dir, resume, config, data, _run_meta("train", model, config, data),
                      train_seed, normalization, overwrite)
    results = _summarise(model, data, config, runs, command, inputs)
    results["warnings"] = _run_warnings(data_warnings, runs)
    if out_dir is not None:
        write_results(out_dir, results)
    return results


def _check_seeds(seeds: Sequence[int]) -> None:
    if len(set(seeds)) != len(seeds) or not seeds:
        raise MsakitError(f"seeds must be distinct and at least one, not {list(seeds)}")
    wrong = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**32]
    if wrong:
        raise MsakitError(f"seed {wrong[0]!r} is not an integer in [0, 2**32)")


def _resolved_config(
    model: str, data: MultimodalDataset, overrides: Sequence[str], epochs: int | None
) -> dict[str, Any]:
    """Every setting in force, defaults included, as results.json records it. `epochs` on a model
    that trains in stages scales the stages to that many epochs in all."""
    layered = resolve_config(model, data.family, list(overrides))
    training = training_config(layered["training"])
    if training.stages and "epochs" in parse_overrides(list(overrides))["training"]:
        raise MsakitError(f"training.epochs does not apply to {model}, which trains in training.stages: "
                          "use --epochs N to scale the stages to N epochs in all, or set training.stages")
    if epochs is not None:
        training = dataclasses.replace(training, epochs=epochs,
                                       stages=scale_stages(training.stages, epochs))
    return {
        "model": dataclasses.asdict(build_config(model, layered["model"])),
        "training": dataclasses.asdict(training),
        "data": dataclasses.asdict(data_config(layered["data"])),
    }


def _fit_one_seed(
    model: str, data: MultimodalDataset, config: dict[str, Any], seed: int, progress: bool,
    score_stages: bool = False, state_file: Path | None = None,
    state_meta: dict[str, Any] | None = None, **trainer_options: Any,
) -> tuple[Trainer, FitResult]:
    """A fresh model trained with `seed` (training noise as configured), selected on validation.

    With `score_stages`, the result's `stage_reports` hold each stage's selected epoch, validation
    score and test score (a report of every stage; each still selects on validation only).
    `state_file` and `state_meta` go to `Trainer.fit` (resumable training).
    """
    train_cfg = training_config(config["training"])
    seed_everything(seed)
    net = create_model(model, config["model"], data.dims)
    tokens = special_token_ids(net.config)
    noise = build_noise(train_cfg.noise, train_cfg.noise_rate, seed, **tokens)
    valid_transform = None
    if train_cfg.select_protocol != "none":
        spec = MissingSpec(train_cfg.select_protocol, rate=train_cfg.select_rate, seed=seed)

        def valid_transform(batch: Batch) -> Batch:
            return apply_missing(batch, spec, **tokens)

    trainer = Trainer(net, train_cfg, data.metric_family, train_transform=noise, progress=progress,
                      valid_transform=valid_transform, **trainer_options)

    def score(result: FitResult) -> dict[str, Any]:
        return {
            "stage": result.stage, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "valid": result.best_valid, "test": trainer.evaluate(data.test),
        }

    fit = trainer.fit(data.train, data.valid, seed, after_stage=score if score_stages else None,
                      state_file=state_file, state_meta=state_meta)
    return trainer, fit


SeedTraining = Callable[[int, dict[str, Any]], tuple[Trainer, dict[str, Any], dict[str, Any]]]


def _run_meta(command: str, model: str, config: dict[str, Any], data: MultimodalDataset) -> dict[str, Any]:
    """What makes two trainings the same run (with the seed: checked before resuming one)."""
    return {"command": command, "model": model, "config": config, "dataset": _dataset_info(data)}


def _seed_runs(
    seeds: Sequence[int], out_dir: Path | None, resume: bool, config: dict[str, Any],
    data: MultimodalDataset, meta: dict[str, Any], train_seed: SeedTraining,
    normalization: dict[str, Any], overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Each seed's results: with `resume`, read back from the checkpoint this same run already
    wrote; otherwise from `train_seed(seed, state)`, which passes `state` (the resumable training
    state) on to `_fit_one_seed` and returns the trainer, the seed's results and the metrics its
    checkpoint keeps. The selected model's validation predictions are checked (a constant model is
    a warning in the seed's results). The checkpoint, with the input `normalization`, is then
    written into `out_dir`, when given, which must hold no other run (`_claim_run_folder`)."""
    _claim_run_folder(out_dir, resume, overwrite)
    runs = []
    for seed in seeds:
        seed_meta = {**meta, "seed": seed}
        run = _finished_run(out_dir, seed_meta, resume)
        if run is None:
            state = {"state_file": _state_file(out_dir, seed, resume), "state_meta": seed_meta}
            trainer, run, metrics = train_seed(seed, state)
            preds, labels = trainer.predict(data.valid)
            run["warnings"] = prediction_warnings(preds, labels, data.train.labels)
            for line in run["warnings"]:
                logger.warning("seed %d: %s", seed, line)
            if out_dir is not None:
                _save_seed(out_dir, trainer, config, data, metrics, run, seed_meta, normalization)
        runs.append(run)
    return runs


# what a run leaves in its folder besides the seeds' checkpoints and training states
RUN_RESULTS = ("results.json", "results.csv", "reproduce.json", "reproduce.csv", "dg.json", "dg.csv",
               "dg.md")


def _claim_run_folder(out_dir: Path | None, resume: bool, overwrite: bool) -> None:
    """A run folder describes one run. Files of an earlier run there (results, seed checkpoints or
    training states) are continued with `resume`, removed first with `overwrite` (so a killed rerun
    never leaves one run's results beside another's checkpoints), else refused."""
    if out_dir is None or not out_dir.is_dir():
        return
    found = sorted(p.name for p in out_dir.iterdir()
                   if p.name in RUN_RESULTS or (p.name.startswith("seed-") and p.name.endswith(".pt")))
    if not found or resume:
        return
    if not overwrite:
        raise MsakitError(f"{out_dir} already holds a run ({', '.join(found[:3])}"
                          f"{', ...' if len(found) > 3 else ''}): use --resume to continue it, "
                          "--overwrite to replace it, or another --output")
    for name in found:
        (out_dir / name).unlink()


def _state_file(out_dir: Path | None, seed: int, resume: bool) -> Path | None:
    """Where a seed's training state is kept while it trains; without `resume`, a state left by
    an earlier interrupted run is discarded (this run starts over)."""
    if out_dir is None:
        return None
    path = out_dir / f"seed-{seed}.state.pt"
    if not resume:
        path.unlink(missing_ok=True)
    return path


def _finished_run(out_dir: Path | None, meta: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    """With `resume`: the per-seed results kept in the checkpoint an earlier, interrupted run of
    the same settings wrote for this seed; None when there is none (the seed is trained)."""
    if not resume or out_dir is None:
        return None
    path = out_dir / f"seed-{meta['seed']}.pt"
    if not path.is_file():
        return None
    _, saved = load_checkpoint(path)
    if "run" not in saved:  # written by a version without resumable runs: train it again
        return None
    if saved["run_meta"] != meta:
        raise MsakitError(
            f"--resume: {path} was written by a run with other settings "
            f"({first_difference(saved['run_meta'], meta)}); use another output folder to keep it"
        )
    return saved["run"]


def _run_warnings(data_warnings: list[str], runs: list[dict[str, Any]]) -> list[str]:
    """What a run's results must say besides its numbers: raw feature scales, degenerate seeds."""
    return data_warnings + [f"seed {r['seed']}: {line}" for r in runs for line in r.get("warnings", [])]


def _save_seed(
    out_dir: Path, trainer: Trainer, config: dict[str, Any], data: MultimodalDataset,
    metrics: dict[str, Any], run: dict[str, Any], meta: dict[str, Any], normalization: dict[str, Any],
) -> None:
    """The seed's checkpoint, named in `run`, with its results and settings (what `resume` reads
    back); the seed's training state is then no longer needed."""
    seed = run["seed"]
    checkpoint = out_dir / f"seed-{seed}.pt"
    run["checkpoint"] = checkpoint.name
    save_checkpoint(checkpoint, trainer.model.cpu(), training=config["training"],
                    dataset=_dataset_info(data),
                    extra={"seed": seed, "metrics": metrics, "run": run, "run_meta": meta,
                           "normalization": normalization})
    (out_dir / f"seed-{seed}.state.pt").unlink(missing_ok=True)


def reproduce(
    model: str,
    dataset: str | MultimodalDataset,
    *,
    data_dir: str | None = None,
    aligned: bool | None = None,
    family: str | None = None,
    seeds: Sequence[int] | None = None,
    epochs: int | None = None,
    overrides: Sequence[str] = (),
    output: str | Path | None = None,
    progress: bool = True,
    command: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train and score `model` with its paper's evaluation recipe (the YAML's `reproduce:`).

    One run per recipe seed; validation is scored under the recipe's protocol at its
    `selection_rate`, and each metric keeps its own best-on-validation checkpoint (`per_metric`;
    else the one `training.select_metric` chose); the test split is then scored under the protocol
    at every rate (or subset). With `one_model_per_rate`, each rate has its own model per seed,
    trained with the training noise at that rate, selected on validation under the protocol at it
    and tested at it only. See `msakit.evaluation.reproduce`. Writes reproduce.json, reproduce.csv
    and one checkpoint per seed (the one `training.select_metric` chose; per rate in `rate-<r>/`)
    into `output` when given; `resume` continues an interrupted run as in `train`.
    """
    if output is not None:
        check_output(output)
    recipe = load_recipe(model_yaml(model).get("reproduce"), model)
    if seeds is not None:  # `replace` runs the Recipe's checks on the given seeds too
        recipe = dataclasses.replace(recipe, seeds=tuple(seeds))
    data = load_dataset(dataset, data_dir, family, aligned=_aligned(model, aligned))
    config = _resolved_config(model, data, overrides, epochs)
    data, normalization, data_warnings = _normalized(data, config)
    data, inputs = _side_inputs(model, config, data)
    models = recipe_models(recipe, config["training"])
    out_dir = Path(output) if output is not None else None
    track = tracked_metrics(data.metric_family) if recipe.per_metric else ()

    def runs_of(name: str, changes: dict[str, Any], scoring: Recipe) -> list[dict[str, Any]]:
        settings = {**config, "training": {**config["training"], **changes}}

        def train_seed(seed: int, state: dict[str, Any]) -> tuple[Trainer, dict[str, Any], dict[str, Any]]:
            trainer, fit = _fit_one_seed(model, data, settings, seed, progress, track_metrics=track, **state)
            scores = (per_metric_scores(trainer, data, scoring) if recipe.per_metric
                      else selected_scores(trainer, data, scoring, fit.best_epoch))
            run = {"seed": seed, **scores, "history": [dataclasses.asdict(r) for r in fit.history]}
            return trainer, run, {"test": run["mean"]}

        folder = out_dir / name if out_dir is not None and name else out_dir
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        return _seed_runs(recipe.seeds, folder, resume, settings, data,
                          _run_meta("reproduce", model, settings, data), train_seed, normalization,
                          overwrite)

    runs = merge_models([runs_of(*m) for m in models], [name for name, _, _ in models])
    if not recipe.one_model_per_rate:
        config["training"].update(models[0][1])
    mean, std = mean_std([r["mean"] for r in runs])
    conditions = [row["condition"] for row in runs[0]["rows"]]
    per_condition = [
        {"condition": c, "metrics": mean_std([r["rows"][i]["metrics"] for r in runs])[0]}
        for i, c in enumerate(conditions)
    ]
    result = {
        "msakit_version": __version__,
        "command": command or _this_command(),
        "model": model,
        "dataset": _dataset_info(data),
        "recipe": dataclasses.asdict(recipe),
        "selection": _recipe_selection(recipe, config),
        "config": config,
        **({"models": {name: changes for name, changes, _ in models}} if recipe.one_model_per_rate else {}),
        **inputs,
        "seeds": runs,
        "rows": per_condition,
        "mean": mean,
        "std": std,
        "warnings": _run_warnings(data_warnings, runs),
    }
    if out_dir is not None:
        rows = [{"seed": r["seed"], **r["mean"]} for r in runs]
        rows += [{"seed": "mean", **mean}, {"seed": "std", **std}]
        atomic_write_json(out_dir / "reproduce.json", result, UNDEFINED_REASONS)
        atomic_write_text(out_dir / "reproduce.csv", csv_text(rows))
    return result


def _recipe_selection(recipe: Recipe, config: dict[str, Any]) -> str:
    """How a recipe's checkpoints were chosen, in words, for reproduce.json."""
    training = config["training"]
    which = ("one checkpoint per metric (F1 with its accuracy)" if recipe.per_metric
             else f"the checkpoint with the best validation {training['select_metric']}")
    if recipe.one_model_per_rate:
        return (f"one model per {recipe.protocol}-modal missing rate, trained with {training['noise']} "
                f"noise at that rate; {which}, chosen on VALIDATION under {recipe.protocol}-modal missing "
                "at that rate; each tested at its own rate only; test never used to select")
    where = _missing_during_selection(config) or " on clean data"
    return f"{which}, best on VALIDATION{where}; test never used to select"


def dg(
    model: str,
    target: str | MultimodalDataset,
    *,
    sources: Sequence[str | MultimodalDataset] | None = None,
    dataset: str | MultimodalDataset | None = None,
    group_by: str = "domains",
    n_groups: int | None = None,
    split_seed: int = 0,
    target_splits: Sequence[str] = SPLITS,
    data_dir: str | None = None,
    aligned: bool | None = None,
    family: str | None = None,
    seeds: Sequence[int] = (1111,),
    epochs: int | None = None,
    overrides: Sequence[str] = (),
    output: str | Path | None = None,
    progress: bool = True,
    command: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Domain generalization: train on source domains, select on their validation data, test on `target`.

    Without `dataset` the domains are whole datasets (leave-one-dataset-out): `sources` and `target`
    are dataset names or paths, and only the modalities that mean the same in all of them are used.
    With `dataset` the domains are groups inside it (`group_by`: "domains", "video", "cluster" or
    "FILE.csv:COLUMN"; `n_groups` and `split_seed` for video and cluster); `target` and `sources`
    are group names, the sources by default every other group. See `msakit.evaluation.domains`.
    One run per seed; each reports in-domain (the sources' test split) and out-of-domain (the target)
    metrics and their gap. Writes dg.json, dg.csv, dg.md and one `seed-<seed>.pt` checkpoint per
    seed into `output` when given; `resume` continues an interrupted run as in `train`.
    """
    if output is not None:
        check_output(output)
    model_class = get_model_class(model)
    _check_seeds(seeds)
    if dataset is None:
        if group_by != "domains" or n_groups is not None:
            raise MsakitError("a grouping (group_by, n_groups) needs the dataset whose groups are "
                              "the domains")
        if not sources:
            raise MsakitError("give the source datasets, or a dataset whose groups are the domains")
        aligned = _aligned(model, aligned)
        task = dataset_task([load_dataset(s, data_dir, aligned=aligned) for s in sources],
                            load_dataset(target, data_dir, aligned=aligned), target_splits)
    else:
        if isinstance(target, MultimodalDataset):
            raise MsakitError("with a dataset, the target is the name of one of its domains")
        task = group_task(load_dataset(dataset, data_dir, family, aligned=_aligned(model, aligned)), target,
                          by=group_by,
                          sources=None if sources is None else [str(s) for s in sources],
                          n_groups=n_groups, seed=split_seed, target_splits=target_splits)
    config = _resolved_config(model, task.data, overrides, epochs)
    normalized, normalization, data_warnings = _normalized(task.data, config)
    normalized, inputs = _side_inputs(model, config, normalized)
    # the target is scaled with the SOURCES' training statistics: it never feeds them
    target = normalize_split(task.target, normalization)
    if inputs:
        target = with_cues(target, load_cue_texts(config["model"]["cues"]))
    task = dataclasses.replace(task, data=normalized, target=target)
    check_model(task, model, model_class.modalities, config["model"]["text_source"])
    out_dir = Path(output) if output is not None else None

    def train_seed(seed: int, state: dict[str, Any]) -> tuple[Trainer, dict[str, Any], dict[str, Any]]:
        trainer, fit = _fit_one_seed(model, task.data, config, seed, progress, **state)
        run = {
            "seed": seed, "best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
            "valid": fit.best_valid, **score_task(trainer, task),
            "history": [dataclasses.asdict(r) for r in fit.history],
        }
        return trainer, run, {"valid": run["valid"]}

    runs = _seed_runs(seeds, out_dir, resume, config, task.data,
                      {**_run_meta("dg", model, config, task.data), "task": task.describe()}, train_seed,
                      normalization, overwrite)
    metric = config["training"]["select_metric"]
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    result = {
        "msakit_version": __version__,
        "command": command or _this_command(),
        "model": model,
        "dataset": _dataset_info(task.data),
        "task": {**task.describe(), "split_seed": split_seed},
        "selection": f"Checkpoint: best validation {metric} ({direction} is better) on held-out SOURCE "
                     "data; the target domain is never used to train or select.",
        "config": config,
        "seeds": runs,
        **summarise(runs),
        "warnings": _run_warnings(data_warnings, runs),
    }
    if out_dir is not None:
        write_dg(out_dir, result)
    return result


def _summarise(
    model: str, data: MultimodalDataset, config: dict[str, Any], runs: list[dict[str, Any]],
    command: str | None, inputs: dict[str, Any],
) -> dict[str, Any]:
    metric = config["training"]["select_metric"]
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    mean, std = {}, {}
    for split in ("valid", "test"):
        mean[split], std[split] = mean_std([r[split] for r in runs])
    stages = {}
    if "stages" in runs[0]:
        for i, stage in enumerate(runs[0]["stages"]):
            stages[stage["stage"]] = {
                split: dict(zip(("mean", "std"), mean_std([r["stages"][i][split] for r in runs]),
                                strict=True))
                for split in ("valid", "test")
            }
    return {
        "msakit_version": __version__,
        "command": command or _this_command(),
        "model": model,
        "dataset": _dataset_info(data),
        "selection": f"best validation {metric} ({direction} is better){_missing_during_selection(config)}; "
                     "test never used to select",
        "config": config,
        **inputs,
        "seeds": runs,
        "mean": mean,
        "std": std,
        **({"stages": stages} if stages else {}),
    }


def _missing_during_selection(config: dict[str, Any]) -> str:
    training = config["training"]
    if training["select_protocol"] == "none":
        return ""
    return f" under {training['select_protocol']}-modal missing at rate {training['select_rate']:g}"


def write_results(out_dir: Path, results: dict[str, Any]) -> None:
    """results.json and results.csv (one row per seed, then mean and std) into `out_dir`."""
    rows = []
    for label, metrics in [(str(r["seed"]), r) for r in results["seeds"]] + [
        ("mean", results["mean"]), ("std", results["std"])
    ]:
        row: dict[str, object] = {"model": results["model"], "dataset": results["dataset"]["name"],
                                  "seed": label}
        for split in ("valid", "test"):
            row.update({f"{split}_{k}": v for k, v in metrics[split].items()})
        rows.append(row)
    atomic_write_json(out_dir / "results.json", results, UNDEFINED_REASONS)
    atomic_write_text(out_dir / "results.csv", csv_text(rows))


def _checkpoint_trainer(
    checkpoint: str | Path, data: MultimodalDataset, device: str, overrides: Sequence[str] = ()
) -> tuple[Trainer, dict[str, Any], MultimodalDataset]:
    """A trainer around the checkpoint's model, its metadata, and `data` normalised with the
    checkpoint's input statistics; `overrides` (model.KEY=VALUE) change test-time settings of the
    saved model, never its weights; `data.label_range` replaces the range the labels are checked
    against (default: the one the checkpoint was trained with, else the family's)."""
    parsed = parse_overrides(list(overrides))
    other = [f"training.{k}" for k in parsed["training"]] + [f"data.{k}" for k in parsed["data"]
                                                            if k != "label_range"]
    if other:
        raise MsakitError(f"scoring a checkpoint takes model settings (model.KEY=VALUE) and "
                          f"data.label_range only, not {other[0]}")
    net, meta = load_checkpoint(checkpoint, parsed["model"])
    check_dims_match(checkpoint, net, data.dims)
    trained = ((meta.get("run_meta") or {}).get("config") or {}).get("data") or {}
    _check_inputs(data, dataclasses.asdict(net.config),
                  data_config(parsed["data"]).label_range or trained.get("label_range"))
    settings = training_config({**meta["training_config"], "device": device})
    data = normalize_dataset(data, meta.get("normalization") or {})
    saved = {"model": dataclasses.asdict(net.config), "training": meta["training_config"]}
    data, _ = _side_inputs(meta["model_name"], saved, data, training=False)
    return Trainer(net, settings, data.metric_family, progress=False), meta, data


def evaluate(
    checkpoint: str | Path,
    dataset: str | MultimodalDataset,
    *,
    data_dir: str | None = None,
    aligned: bool | None = None,
    family: str | None = None,
    split: str = "test",
    device: str = "auto",
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Metrics of a saved checkpoint on one split of a dataset (`overrides`: model.KEY=VALUE
    test-time settings that replace the saved ones)."""
    data = load_dataset(dataset, data_dir, family, aligned=_checkpoint_aligned(checkpoint, aligned))
    trainer, meta, data = _checkpoint_trainer(checkpoint, data, device, overrides)
    return {
        "checkpoint": str(checkpoint),
        "model": meta["model_name"],
        **({"overrides": list(overrides)} if overrides else {}),
        "dataset": _dataset_info(data),
        "split": split,
        "metrics": trainer.evaluate(data.split(split)),
    }


def robustness(
    checkpoint: str | Path,
    dataset: str | MultimodalDataset,
    *,
    protocol: str,
    data_dir: str | None = None,
    aligned: bool | None = None,
    family: str | None = None,
    rates: Sequence[float] | None = None,
    subsets: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    output: str | Path | None = None,
    device: str = "auto",
    command: str | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Test metrics of a checkpoint under a missing-data protocol, per rate (or subset) and mean.

    `overrides` (model.KEY=VALUE) replace saved test-time settings, as in `evaluate`. Writes
    robustness.json, robustness.csv and robustness.png into `output` when given.
    """
    if output is not None:
        check_output(output)
    data = load_dataset(dataset, data_dir, family, aligned=_checkpoint_aligned(checkpoint, aligned))
    trainer, meta, data = _checkpoint_trainer(checkpoint, data, device, overrides)
    result = {
        "msakit_version": __version__,
        "command": command or _this_command(),
        "checkpoint": str(checkpoint),
        "model": meta["model_name"],
        **({"overrides": list(overrides)} if overrides else {}),
        "dataset": _dataset_info(data),
        **run_protocol(trainer, data, protocol, rates=rates, subsets=subsets, seeds=seeds),
    }
    if output is not None:
        write_robustness(Path(output), result,
                         f"{result['model']} on {data.name}: {protocol}-modal missing, test split")
    return result


def compare(run_dirs: Sequence[str | Path], output: str | Path) -> dict[str, Any]:
    """Overlay the robustness curves of several runs; a markdown table of their means.

    Writes compare.png and compare.md into `output`.
    """
    check_output(output)
    results: dict[str, dict[str, Any]] = {}
    kinds: set[tuple[Any, ...]] = set()
    for run_dir in run_dirs:
        path = Path(run_dir) / "robustness.json"
        if not path.is_file():
            raise MsakitError(f"{path} not found: run `msakit robustness ... --output {run_dir}` first")
        try:
            result = json.loads(path.read_text())
            for metrics in [result["mean"], *(row["metrics"] for row in result["rows"])]:
                metrics.update({k: math.nan for k, v in metrics.items() if v is None})  # strict JSON's null
            label = f"{result['model']} ({run_dir})"
            kind = (result["protocol"], result["dataset"]["metric_family"],
                    tuple(row["condition"] for row in result["rows"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MsakitError(f"{path} is not a robustness.json msakit wrote ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())})") from None
        if label in results:
            raise MsakitError(f"{run_dir} is given twice")
        results[label] = result
        kinds.add(kind)
    if len(kinds) > 1:
        raise MsakitError(
            "these runs are not comparable: they differ in protocol, metric family or conditions ("
            + "; ".join(f"{p}/{f}: {', '.join(c)}" for p, f, c in sorted(kinds)) + ")"
        )
    protocol, family, _ = kinds.pop()
    keys = METRIC_KEYS[family]
    lines = [f"Mean over conditions, {protocol}-modal missing", "",
             "| run | " + " | ".join(LABELS[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, result in results.items():
        lines.append(f"| {name} | " + " | ".join(format_value(k, result["mean"][k]) for k in keys)
                     + " |")
    out = Path(output)
    atomic_write_text(out / "compare.md", "\n".join(lines) + "\n")
    plot_curves(out / "compare.png", results, f"{protocol}-modal missing, test split")
    return {"protocol": protocol, "family": family,
            "means": {name: r["mean"] for name, r in results.items()}, "table": "\n".join(lines)}


def extract(
    clips: str | Path,
    labels: str | Path,
    output: str | Path,
    *,
    features: str | Path | None = None,
    overrides: Sequence[str] = (),
    workers: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build an MMSA-layout pickle at `output` from the media files in `clips` and a label.csv.

    `features` is a YAML file of feature settings and `overrides` are `SECTION.KEY=VALUE` strings,
    both over `msakit/features/default.yaml`. Returns the report (also written beside `output`).
    """
    from msakit.features import build_dataset, load_feature_config

    check_output(output, folder=False)
    config = load_feature_config(features, list(overrides))
    return build_dataset(clips, labels, output, config, workers=workers, cache_dir=cache_dir,
                         progress=progress)


def predict(
    files: Sequence[str | Path],
    checkpoint: str | Path,
    *,
    text: str | None = None,
    features: str | Path | None = None,
    overrides: Sequence[str] = (),
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Sentiment of each media file with a checkpoint trained on a `msakit extract` dataset.

    Each result has `score`, `class` (negative / neutral / positive), `label` and `label_name` (the
    7-point scale; SIMS-family checkpoints: 5-point), `present` (modality -> bool), `transcript`;
    a file that cannot be read has `error` instead. `text` is the transcript of a single file.
    `features` / `overrides` may change only where transcripts come from (`transcript.*`): the
    checkpoint's recorded feature configuration decides the rest.
    """
    from msakit.inference import Predictor, predict_files

    if not files:
        raise MsakitError("no media files to predict")
    predictor = Predictor(checkpoint, features, overrides=list(overrides), device=device)
    return predict_files(predictor, list(files), text)
