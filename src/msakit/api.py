"""The Python API: one function per `msakit` command, a thin façade over the layers below.

    >>> from msakit import api
    >>> run = api.train("tfn", "synthetic", seeds=[1111], epochs=3, output="runs/tfn")
    >>> run["mean"]["test"]["mae"]

Runs are prepared and trained by the run engine (`msakit.training.runs`), their results
documents built by `msakit.evaluation.results`; datasets come from `msakit.data.catalog`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from msakit import __version__
from msakit.data.catalog import check_synthetic_sizes
from msakit.data.catalog import list_datasets as catalog_datasets
from msakit.data.catalog import load_dataset as catalog_load
from msakit.data.domains import build_task, check_model
from msakit.data.mmsa import save_mmsa
from msakit.data.schema import SPLITS, MultimodalDataset
from msakit.data.synthetic import generate_synthetic
from msakit.evaluation.domains import dg_runs
from msakit.evaluation.protocols import run_protocol, write_robustness
from msakit.evaluation.reproduce import load_recipe, recipe_runs
from msakit.evaluation.results import (
    compare_runs,
    dg_results,
    reproduce_results,
    this_command,
    train_results,
    write_dg,
    write_reproduce,
    write_results,
)
from msakit.features import build_dataset, load_feature_config
from msakit.fileio import check_output
from msakit.inference import Predictor, predict_many
from msakit.models.registry import describe_models, get_model_class
from msakit.training import distributed
from msakit.training.config import model_yaml
from msakit.training.runs import (
    aligned_input,
    check_seeds,
    checkpoint_aligned,
    checkpoint_trainer,
    dataset_info,
    prepare_run,
    train_seeds,
)

logger = logging.getLogger(__name__)


list_models = describe_models  # every registered model with the first line of its docstring
list_datasets = catalog_datasets  # every dataset name `--dataset` takes, what it is, what it needs
load_dataset = catalog_load  # a dataset by name or path (see `msakit datasets`), family logged


def write_synthetic(
    output: str | Path, *, seed: int = 0, aligned: bool = False, **sizes: float
) -> dict[str, Any]:
    """Write the synthetic dataset as an MMSA pickle at `output`; sizes as `generate_synthetic`'s."""
    check_output(output, folder=False)
    check_synthetic_sizes(sizes)
    raw = generate_synthetic(seed=seed, aligned=aligned, **sizes)
    path = save_mmsa(raw, output)
    return {"path": str(path), "sizes": {s: len(raw[s]["id"]) for s in ("train", "valid", "test")}}


def train(
    model: str, dataset: str | MultimodalDataset, *, data_dir: str | None = None,
    aligned: bool | None = None, family: str | None = None, seeds: Sequence[int] = (1111,),
    epochs: int | None = None, overrides: Sequence[str] = (), output: str | Path | None = None,
    progress: bool = True, command: str | None = None, resume: bool = False, overwrite: bool = False,
) -> dict[str, Any]:
    """Train `model` once per seed, select each on validation, score valid and test.

    Writes, when `output` is given: `results.json` (per-seed and mean/std metrics, resolved config,
    command), `results.csv` (one row per seed plus mean and std) and `seed-<seed>.pt` checkpoints.
    With `resume`, an interrupted run continues (the seeds finished are read back, the one that was
    training goes on from its last written state) and ends as an uninterrupted run would; with
    `overwrite` a run already in `output` is replaced. Returns the content of results.json.
    """
    if output is not None:
        check_output(output)
    get_model_class(model)
    check_seeds(seeds)
    data = load_dataset(dataset, data_dir, family=family, aligned=aligned_input(model, aligned))
    setup = prepare_run(model, data, overrides, epochs)
    out_dir = Path(output) if output is not None else None
    runs = train_seeds(setup, seeds, out_dir, resume=resume, overwrite=overwrite, progress=progress)
    results = train_results(setup, runs, command)
    if out_dir is not None and distributed.is_main():  # under torchrun, rank 0 writes
        write_results(out_dir, results)
    return results


def reproduce(
    model: str, dataset: str | MultimodalDataset, *, data_dir: str | None = None,
    aligned: bool | None = None, family: str | None = None, seeds: Sequence[int] | None = None,
    epochs: int | None = None, overrides: Sequence[str] = (), output: str | Path | None = None,
    progress: bool = True, command: str | None = None, resume: bool = False, overwrite: bool = False,
) -> dict[str, Any]:
    """Train and score `model` with its paper's evaluation recipe (the YAML's `reproduce:`).

    One run per recipe seed; validation is scored under the recipe's protocol at its
    `selection_rate`, and each metric keeps its own best-on-validation checkpoint (`per_metric`;
    else the one `training.select_metric` chose); the test split is then scored under the protocol
    at every rate (or subset). With `one_model_per_rate`, each rate has its own model per seed,
    trained with the training noise at that rate, selected on validation under the protocol at it
    and tested at it only. See `msakit.evaluation.reproduce`. Writes reproduce.json, reproduce.csv
    and one checkpoint per seed (the one `training.select_metric` chose; per rate in `rate-<r>/`)
    into `output` when given; `resume` and `overwrite` as in `train`.
    """
    if output is not None:
        check_output(output)
    recipe = load_recipe(model_yaml(model).get("reproduce"), model)
    if seeds is not None:  # `replace` runs the Recipe's checks on the given seeds too
        recipe = dataclasses.replace(recipe, seeds=tuple(seeds))
    data = load_dataset(dataset, data_dir, family=family, aligned=aligned_input(model, aligned))
    setup = prepare_run(model, data, overrides, epochs)
    out_dir = Path(output) if output is not None else None
    models, runs = recipe_runs(setup, recipe, out_dir, resume=resume, overwrite=overwrite,
                               progress=progress)
    result = reproduce_results(setup, recipe, models, runs, command)
    if out_dir is not None:
        write_reproduce(out_dir, result)
    return result


def dg(
    model: str, target: str | MultimodalDataset, *,
    sources: Sequence[str | MultimodalDataset] | None = None,
    dataset: str | MultimodalDataset | None = None, group_by: str = "domains",
    n_groups: int | None = None, split_seed: int = 0, target_splits: Sequence[str] = SPLITS,
    data_dir: str | None = None, aligned: bool | None = None, family: str | None = None,
    seeds: Sequence[int] = (1111,), epochs: int | None = None, overrides: Sequence[str] = (),
    output: str | Path | None = None, progress: bool = True, command: str | None = None,
    resume: bool = False, overwrite: bool = False,
) -> dict[str, Any]:
    """Domain generalization: train on source domains, select on their validation data, test on `target`.

    Without `dataset` the domains are whole datasets (leave-one-dataset-out): `sources` and `target`
    are dataset names or paths, and only the modalities that mean the same in all of them are used.
    With `dataset` the domains are groups inside it (`group_by`: "domains", "video", "cluster" or
    "FILE.csv:COLUMN"; `n_groups` and `split_seed` for video and cluster); `target` and `sources`
    are group names, the sources by default every other group. See `msakit.data.domains`.
    One run per seed; each reports in-domain (the sources' test split) and out-of-domain (the target)
    metrics and their gap. Writes dg.json, dg.csv, dg.md and one `seed-<seed>.pt` checkpoint per
    seed into `output` when given; `resume` and `overwrite` as in `train`.
    """
    if output is not None:
        check_output(output)
    model_class = get_model_class(model)
    check_seeds(seeds)
    aligned = aligned_input(model, aligned)

    def load(name: str | MultimodalDataset, family: str | None = None) -> MultimodalDataset:
        return load_dataset(name, data_dir, family=family, aligned=aligned)

    task = build_task(load, target, sources=sources, dataset=dataset, group_by=group_by,
                      n_groups=n_groups, split_seed=split_seed, target_splits=target_splits, family=family)
    setup = prepare_run(model, task.data, overrides, epochs)
    # the target is prepared with the SOURCES' training statistics: it never feeds them
    task = dataclasses.replace(task, data=setup.data, target=setup.prepare(task.target))
    check_model(task, model, model_class.modalities, setup.config["model"]["text_source"])
    out_dir = Path(output) if output is not None else None
    runs = dg_runs(setup, task, seeds, out_dir, resume=resume, overwrite=overwrite, progress=progress)
    result = dg_results(setup, task, split_seed, runs, command)
    if out_dir is not None:
        write_dg(out_dir, result)
    return result


def evaluate(
    checkpoint: str | Path, dataset: str | MultimodalDataset, *, data_dir: str | None = None,
    aligned: bool | None = None, family: str | None = None, split: str = "test", device: str = "auto",
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Metrics of a saved checkpoint on one split of a dataset (`overrides`: model.KEY=VALUE
    test-time settings that replace the saved ones)."""
    data = load_dataset(dataset, data_dir, family=family, aligned=checkpoint_aligned(checkpoint, aligned))
    trainer, meta, data = checkpoint_trainer(checkpoint, data, device, overrides)
    return {"checkpoint": str(checkpoint), "model": meta["model_name"],
            **({"overrides": list(overrides)} if overrides else {}), "dataset": dataset_info(data),
            "split": split, "metrics": trainer.evaluate(data.split(split))}


def robustness(
    checkpoint: str | Path, dataset: str | MultimodalDataset, *, protocol: str,
    data_dir: str | None = None, aligned: bool | None = None, family: str | None = None,
    rates: Sequence[float] | None = None, subsets: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,), output: str | Path | None = None, device: str = "auto",
    command: str | None = None, overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Test metrics of a checkpoint under a missing-data protocol, per rate (or subset) and mean.

    `overrides` (model.KEY=VALUE) replace saved test-time settings, as in `evaluate`. Writes
    robustness.json, robustness.csv and robustness.png into `output` when given.
    """
    if output is not None:
        check_output(output)
    data = load_dataset(dataset, data_dir, family=family, aligned=checkpoint_aligned(checkpoint, aligned))
    trainer, meta, data = checkpoint_trainer(checkpoint, data, device, overrides)
    result = {"msakit_version": __version__, "command": command or this_command(),
              "checkpoint": str(checkpoint), "model": meta["model_name"],
              **({"overrides": list(overrides)} if overrides else {}), "dataset": dataset_info(data),
              **run_protocol(trainer, data, protocol, rates=rates, subsets=subsets, seeds=seeds)}
    if output is not None:
        write_robustness(Path(output), result,
                         f"{result['model']} on {data.name}: {protocol}-modal missing, test split")
    return result


def compare(run_dirs: Sequence[str | Path], output: str | Path) -> dict[str, Any]:
    """Overlay the robustness curves of several runs; a markdown table of their means.

    Writes compare.png and compare.md into `output`.
    """
    check_output(output)
    return compare_runs(run_dirs, output)


def extract(
    clips: str | Path, labels: str | Path, output: str | Path, *, features: str | Path | None = None,
    overrides: Sequence[str] = (), workers: int | None = None, cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build an MMSA-layout pickle at `output` from the media files in `clips` and a label.csv.

    `features` is a YAML file of feature settings and `overrides` are `SECTION.KEY=VALUE` strings,
    both over `msakit/features/default.yaml`. Returns the report (also written beside `output`).
    """
    check_output(output, folder=False)
    config = load_feature_config(features, list(overrides))
    return build_dataset(clips, labels, output, config, workers=workers, cache_dir=cache_dir,
                         progress=progress)


def predict(
    files: Sequence[str | Path], checkpoint: str | Path | None = None, *, text: str | None = None,
    features: str | Path | None = None, overrides: Sequence[str] = (), device: str = "cpu",
    output: str | Path | None = None, workers: int | None = None, overwrite: bool = False,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Sentiment of each media file (folders are walked for media) with a checkpoint, or with the
    packaged default model when `checkpoint` is None (it reads the transcript only).

    Each result has `score`, `class` (negative / neutral / positive), `label` and `label_name` (the
    7-point scale; SIMS-family checkpoints: 5-point), `present` and `used` modalities, `transcript`,
    and `notice` when the model cannot use everything the file has; a file that cannot be scored
    has `error` instead. `text` is the transcript of a single file.
    `features` / `overrides` may change only where transcripts come from (`transcript.*`).
    `output` (.csv or .jsonl) receives each result as it comes; run again, the files it already
    scored are skipped (`overwrite` starts it afresh). `workers`: extraction processes (default: one
    per core, none for a single file). Returns this run's results.
    """
    predictor = Predictor(checkpoint, features, overrides=list(overrides), device=device)
    return predict_many(predictor, list(files), text=text, output=output, workers=workers,
                        overwrite=overwrite, progress=progress).results
