"""Domain generalization, scored: the in-domain (the sources' test split) and out-of-domain (the
target) metrics of a trained model, their gap, and their means over seeds. The tasks themselves
(whole datasets or groups as domains) are built in `msakit.data.domains`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from msakit.data.domains import DomainTask
from msakit.evaluation.report import mean_std
from msakit.metrics import compute_metrics
from msakit.training.runs import RunSetup, fit_one_seed, run_meta, seed_runs
from msakit.training.trainer import Trainer


def score_task(trainer: Trainer, task: DomainTask) -> dict[str, Any]:
    """In-domain (sources' test) and out-of-domain (target) metrics, their gap, and each domain's."""
    family = trainer.metric_family
    preds, labels = trainer.predict(task.data.test)
    target_preds, target_labels = trainer.predict(task.target)
    in_domain = compute_metrics(preds, labels, family)
    out_of_domain = compute_metrics(target_preds, target_labels, family)
    per_domain = {}
    for index in np.unique(task.data.test.domains):
        rows = task.data.test.domains == index
        per_domain[task.domain_names[index]] = compute_metrics(preds[rows], labels[rows], family)
    per_domain[task.target_name] = out_of_domain
    return {"in_domain": in_domain, "out_of_domain": out_of_domain,
            "gap": {k: out_of_domain[k] - in_domain[k] for k in in_domain}, "per_domain": per_domain}


PARTS = ("in_domain", "out_of_domain", "gap")


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of every part and of every domain's metrics."""
    mean, std = {}, {}
    for part in PARTS:
        mean[part], std[part] = mean_std([r[part] for r in runs])
    domains = list(runs[0]["per_domain"])
    per_domain = {d: dict(zip(("mean", "std"), mean_std([r["per_domain"][d] for r in runs]), strict=True))
                  for d in domains}
    return {"mean": mean, "std": std, "per_domain": per_domain}


def dg_runs(
    setup: RunSetup, task: DomainTask, seeds: Sequence[int], out_dir: Path | None, *, resume: bool,
    overwrite: bool, progress: bool,
) -> list[dict[str, Any]]:
    """Train on the task's sources once per seed, select on their validation data, and score each
    seed in-domain and out-of-domain (`score_task`), with its checkpoint in `out_dir`."""

    def train_seed(seed: int, state: dict[str, Any]) -> tuple[Trainer, dict[str, Any], dict[str, Any]]:
        trainer, fit = fit_one_seed(setup.model, task.data, setup.config, seed, progress, **state)
        run = {
            "seed": seed, "best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
            "valid": fit.best_valid, **score_task(trainer, task),
            "history": [asdict(r) for r in fit.history],
        }
        return trainer, run, {"valid": run["valid"]}

    meta = {**run_meta("dg", setup.model, setup.config, task.data), "task": task.describe()}
    return seed_runs(seeds, out_dir, resume, setup.config, task.data, meta, train_seed,
                     setup.normalization, overwrite)
