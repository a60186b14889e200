"""The run engine: everything between "train MODEL on DATA with these seeds" and a trainer's fit.

A run resolves its settings (the model's YAML, the dataset family's section, `--set`), checks the
data against them, normalises it and attaches the model's side inputs (`prepare_run`); then trains
one model per seed (`seed_runs`), each selected on validation, with its training state kept so an
interrupted run resumes bit for bit, and writes one checkpoint per seed into a run folder that
holds one run only. `checkpoint_trainer` rebuilds a saved model with the same data preparation
for scoring. What a run's results say is built in `msakit.evaluation.report`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from msakit.cues import attach_cues, load_cue_texts, with_cues
from msakit.data.normalize import fit_normalization, normalize_dataset, normalize_split, scale_warnings
from msakit.data.schema import Batch, MultimodalDataset, Split
from msakit.data.tokens import encoder_vocab_size
from msakit.data.validate import check_labels, check_token_ids
from msakit.errors import MsakitError
from msakit.metrics import prediction_warnings
from msakit.missing import MissingSpec, apply_missing, build_noise
from msakit.models.layers.text import special_token_ids
from msakit.models.registry import build_config, create_model, get_model_class
from msakit.training import distributed
from msakit.training.checkpoint import FORMAT as CHECKPOINT_FORMAT
from msakit.training.checkpoint import check_dims_match, load_checkpoint, read_tagged, save_checkpoint
from msakit.training.config import data_config, parse_overrides, resolve_config, training_config
from msakit.training.raw_scale import shuffle_probe, silence_warnings, silenced_modalities
from msakit.training.settings import comparable_run, scale_stages
from msakit.training.tensorboard import TensorBoardLog
from msakit.training.trainer import (
    EpochObserver,
    EpochRecord,
    FitResult,
    Trainer,
    best_weight_files,
    first_difference,
    seed_everything,
    select_device,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunSetup:
    """A run's resolved settings and its prepared data (checked, normalised, side inputs attached)."""

    model: str
    config: dict[str, Any]  # {"model", "training", "data"}: every setting in force
    data: MultimodalDataset
    normalization: dict[str, Any]  # the training split's statistics, saved in every checkpoint
    warnings: list[str]  # the data's (validation, raw scales), for the results
    inputs: dict[str, Any]  # {"inputs": {name: who wrote it}} for the side inputs read, or {}

    def prepare(self, split: Split) -> Split:
        """Another split (a domain-generalization target) prepared like the run's data: the
        training statistics applied and the side inputs attached."""
        split = normalize_split(split, self.normalization)
        if "cues" in self.inputs.get("inputs", {}):
            split = with_cues(split, load_cue_texts(self.config["model"]["cues"]))
        return split


def prepare_run(model: str, data: MultimodalDataset, overrides: Sequence[str],
                epochs: int | None) -> RunSetup:
    """The settings of `model` on `data` with `overrides` (and `epochs`), and the data prepared."""
    config = resolved_config(model, data, overrides, epochs)
    data, normalization, warnings = normalized(data, config)
    data, inputs = side_inputs(model, config, data)
    return RunSetup(model, config, data, normalization, warnings, inputs)


def side_inputs(
    model: str, config: dict[str, Any], data: MultimodalDataset, training: bool = True
) -> tuple[MultimodalDataset, dict[str, Any]]:
    """`data` with the side inputs the model reads (`MSAModel.side_inputs`: MMSLF's cues) attached
    to every split, and {"inputs": {name: who wrote them}} for the results, when it reads any."""
    records = {}
    for name, path in get_model_class(model).side_inputs(config, training).items():
        if name != "cues":
            raise MsakitError(f"{model} reads a side input {name!r}, which msakit cannot provide")
        data, records[name] = attach_cues(data, path)
    return data, ({"inputs": records} if records else {})


def normalized(
    data: MultimodalDataset, config: dict[str, Any]
) -> tuple[MultimodalDataset, dict[str, Any], list[str]]:
    """`data` checked against the run's settings (`check_inputs`) and normalised as
    `config["data"]` says (statistics from the training split), those statistics (saved in every
    checkpoint), and the warnings: validation's (logged at load) and the scales of the modalities
    left raw."""
    settings = data_config(config["data"])
    check_inputs(data, config["model"], settings.label_range)
    stats = fit_normalization(data.train, settings)
    warnings = scale_warnings(data.train, settings)
    for line in warnings:
        logger.warning("%s: %s", data.name, line)
    return normalize_dataset(data, stats), stats, [*data.warnings, *warnings]


def check_inputs(data: MultimodalDataset, model_config: dict[str, Any],
                  label_range: Sequence[float] | None) -> None:
    """The checks of `msakit.data.validate` that need the run's settings: labels in the family's
    range (or `data.label_range`), token ids in the text encoder's vocabulary (when it reads them)."""
    check_labels(data, label_range)
    if model_config.get("text_source") == "encoder":
        encoder = model_config["text_encoder"]
        check_token_ids(data, encoder_vocab_size(encoder), encoder)


def aligned_input(model: str, aligned: bool | None) -> bool:
    """Whether to read the word-aligned pickles: as asked, else as the model's paper did
    (`MSAModel.aligned_input`: HME's official code reads aligned_*.pkl only)."""
    return get_model_class(model).aligned_input if aligned is None else aligned


def checkpoint_aligned(checkpoint: str | Path, aligned: bool | None) -> bool:
    """`aligned_input` for the model a checkpoint holds (a missing file is reported when it is loaded)."""
    if aligned is not None or not Path(checkpoint).is_file():
        return bool(aligned)
    return aligned_input(read_tagged(Path(checkpoint), CHECKPOINT_FORMAT, "checkpoint")["model_name"], None)


def dataset_info(data: MultimodalDataset) -> dict[str, Any]:
    return {
        "name": data.name, "content_fingerprint": data.fingerprint, "family": data.family,
        "family_source": data.family_source,
        "metric_family": data.metric_family, "source": data.source,
        "sizes": {s: len(data.split(s)) for s in ("train", "valid", "test")},
        "replaced_nonfinite": data.replaced_nonfinite,
        **({"features": data.features} if data.features is not None else {}),
    }


def check_seeds(seeds: Sequence[int]) -> None:
    if len(set(seeds)) != len(seeds) or not seeds:
        raise MsakitError(f"seeds must be distinct and at least one, not {list(seeds)}")
    wrong = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**32]
    if wrong:
        raise MsakitError(f"seed {wrong[0]!r} is not an integer in [0, 2**32)")


def resolved_config(
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


def fit_one_seed(
    model: str, data: MultimodalDataset, config: dict[str, Any], seed: int, progress: bool,
    score_stages: bool = False, state_file: Path | None = None,
    state_meta: dict[str, Any] | None = None, log_dir: Path | None = None, **trainer_options: Any,
) -> tuple[Trainer, FitResult]:
    """A fresh model trained with `seed` (training noise as configured), selected on validation.

    With `score_stages`, the result's `stage_reports` hold each stage's selected epoch, validation
    score and test score (a report of every stage; each still selects on validation only).
    `state_file` and `state_meta` go to `Trainer.fit` (resumable training); with
    `training.log: tensorboard`, `log_dir` receives the TensorBoard scalars.
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

    board = TensorBoardLog(log_dir) if train_cfg.log == "tensorboard" and log_dir is not None else None
    if board is not None:
        trainer_options["on_epoch"] = _both(board, trainer_options.get("on_epoch"))
    trainer = Trainer(net, train_cfg, data.metric_family, train_transform=noise, progress=progress,
                      valid_transform=valid_transform, **trainer_options)

    def score(result: FitResult) -> dict[str, Any]:
        return {
            "stage": result.stage, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "valid": result.best_valid, "test": trainer.evaluate(data.test),
        }

    try:
        fit = trainer.fit(data.train, data.valid, seed, after_stage=score if score_stages else None,
                          state_file=state_file, state_meta=state_meta)
    finally:
        if board is not None:
            board.close()
    return trainer, fit


def _both(first: EpochObserver, second: EpochObserver | None) -> EpochObserver:
    if second is None:
        return first

    def observe(record: EpochRecord, step: int, rates: list[float]) -> None:
        first(record, step, rates)
        second(record, step, rates)

    return observe


SeedTraining = Callable[[int, dict[str, Any]], tuple[Trainer, dict[str, Any], dict[str, Any]]]


def run_meta(command: str, model: str, config: dict[str, Any], data: MultimodalDataset) -> dict[str, Any]:
    """What makes two trainings the same run (with the seed: checked before resuming one)."""
    return {"command": command, "model": model, "config": config, "dataset": dataset_info(data)}


def seed_runs(
    seeds: Sequence[int], out_dir: Path | None, resume: bool, config: dict[str, Any],
    data: MultimodalDataset, meta: dict[str, Any], train_seed: SeedTraining,
    normalization: dict[str, Any], overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Each seed's results: with `resume`, read back from the checkpoint this same run already
    wrote; otherwise from `train_seed(seed, state)`, which passes `state` (the resumable training
    state) on to `fit_one_seed` and returns the trainer, the seed's results and the metrics its
    checkpoint keeps. Before training, modalities that their raw scale keeps out of the untrained
    model are a warning in the seed's results (`msakit.training.raw_scale`); after it, the selected
    model's validation predictions are checked (a constant model is a warning there too). The
    checkpoint, with the input `normalization`, is then written into `out_dir`, when given, which
    must hold no other run (`_claim_run_folder`).
    Under torchrun every rank trains and reads; rank 0 alone changes files, and the others wait
    for it before they read what it may have removed."""
    _claim_run_folder(out_dir, resume, overwrite)
    probe = functools.cache(lambda: shuffle_probe(data.train))  # built once, when a seed first trains
    runs = []
    for seed in seeds:
        seed_meta = {**meta, "seed": seed}
        run = _finished_run(out_dir, seed_meta, resume)
        if run is None:
            state = {"state_file": _state_file(out_dir, seed, resume), "state_meta": seed_meta,
                     "log_dir": None if out_dir is None else out_dir / "tensorboard" / f"seed-{seed}"}
            distributed.barrier()
            silenced = silence_warnings(
                silenced_modalities(meta["model"], config["model"], data.dims, probe(), seed), probe())
            _log_warnings(seed, silenced)
            trainer, run, metrics = train_seed(seed, state)
            preds, labels = trainer.predict(data.valid)
            degenerate = prediction_warnings(preds, labels, data.train.labels)
            _log_warnings(seed, degenerate)
            run["warnings"] = [*silenced, *degenerate]
            if out_dir is not None and distributed.is_main():
                _save_seed(out_dir, trainer, config, data, metrics, run, seed_meta, normalization)
        runs.append(run)
    return runs


def _log_warnings(seed: int, lines: list[str]) -> None:
    for line in lines:
        logger.warning("seed %d: %s", seed, line)


# what a run leaves in its folder besides the seeds' checkpoints and training states
RUN_RESULTS = ("results.json", "results.csv", "reproduce.json", "reproduce.csv", "dg.json", "dg.csv",
               "dg.md")


def _claim_run_folder(out_dir: Path | None, resume: bool, overwrite: bool) -> None:
    """A run folder describes one run. Files of an earlier run there (results, seed checkpoints or
    training states) are continued with `resume`, removed first with `overwrite` (so a killed rerun
    never leaves one run's results beside another's checkpoints), else refused."""
    if out_dir is None:
        return
    # under torchrun, rank 0's look at the folder, before it removes anything, decides for all
    found = distributed.from_main([] if not out_dir.is_dir() else sorted(
        p.name for p in out_dir.iterdir()
        if p.name in RUN_RESULTS or (p.name.startswith("seed-") and p.name.endswith(".pt"))))
    if not found or resume:
        return
    if not overwrite:
        raise MsakitError(f"{out_dir} already holds a run ({', '.join(found[:3])}"
                          f"{', ...' if len(found) > 3 else ''}): use --resume to continue it, "
                          "--overwrite to replace it, or another --output")
    if distributed.is_main():
        for name in found:
            (out_dir / name).unlink()
        shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)  # the replaced run's curves
    distributed.barrier()


def _state_file(out_dir: Path | None, seed: int, resume: bool) -> Path | None:
    """Where a seed's training state is kept while it trains; without `resume`, a state left by
    an earlier interrupted run is discarded (this run starts over)."""
    if out_dir is None:
        return None
    path = out_dir / f"seed-{seed}.state.pt"
    if not resume and distributed.is_main():
        _remove_state(path)
    return path


def _remove_state(path: Path) -> None:
    """A seed's training state file and the best-weights files beside it."""
    for file in [path, *best_weight_files(path)]:
        file.unlink(missing_ok=True)


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
    saved_meta, meta = comparable_run(saved["run_meta"]), comparable_run(meta)
    if saved_meta != meta:
        raise MsakitError(
            f"--resume: {path} was written by a run with other settings "
            f"({first_difference(saved_meta, meta)}); use another output folder to keep it"
        )
    return saved["run"]


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
                    dataset=dataset_info(data),
                    extra={"seed": seed, "metrics": metrics, "run": run, "run_meta": meta,
                           "normalization": normalization})
    _remove_state(out_dir / f"seed-{seed}.state.pt")


def checkpoint_trainer(
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
    check_inputs(data, dataclasses.asdict(net.config),
                  data_config(parsed["data"]).label_range or trained.get("label_range"))
    settings = training_config({**meta["training_config"], "device": device})
    data = normalize_dataset(data, meta.get("normalization") or {})
    saved = {"model": dataclasses.asdict(net.config), "training": meta["training_config"]}
    data, _ = side_inputs(meta["model_name"], saved, data, training=False)
    return Trainer(net, settings, data.metric_family, progress=False), meta, data


def train_seeds(setup: RunSetup, seeds: Sequence[int], out_dir: Path | None, *, resume: bool,
                overwrite: bool, progress: bool) -> list[dict[str, Any]]:
    """`msakit train`'s seeds: each trained and selected on validation, scored on valid and test
    (every stage, when the model trains in several), with its checkpoint in `out_dir`; under
    torchrun, on every process (`msakit.training.distributed`)."""
    data, config = setup.data, setup.config
    multi_stage = len(config["training"]["stages"]) > 1

    def train_seed(seed: int, state: dict[str, Any]) -> tuple[Trainer, dict[str, Any], dict[str, Any]]:
        trainer, fit = fit_one_seed(setup.model, data, config, seed, progress, score_stages=multi_stage,
                                    **state)
        stages = fit.stage_reports
        run = {
            "seed": seed, "best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
            "valid": fit.best_valid,  # the restored weights' own validation score
            "test": stages[-1]["test"] if stages else trainer.evaluate(data.test),
            "history": [dataclasses.asdict(r) for r in fit.history],
            **({"stages": stages} if stages else {}),
        }
        return trainer, run, {"valid": run["valid"], "test": run["test"]}

    with distributed.session(select_device(config["training"]["device"])):
        return seed_runs(seeds, out_dir, resume, config, data,
                         run_meta("train", setup.model, config, data), train_seed, setup.normalization,
                         overwrite)
