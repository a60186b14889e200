"""`msakit study run`: the jobs of a study executed on Ray (or in this process), records to the store.

The driver expands the study into jobs (`msakit.study.spec`), asks the store which are done, and
submits the rest as Ray tasks: to a local Ray instance it starts and stops itself, or to an existing
cluster (`address`). Each task asks for the study's `resources`; a task whose worker dies is retried
by Ray and resumes from the training state its run folder holds (`<study folder>/jobs/<job id>/`; on a
cluster that folder must be on a shared file system). Each record goes to the store as its job
finishes, so an interrupted study loses only the jobs in flight, and a rerun executes only what is
missing. A job trains under a claim in the store (`ResultStore.holding`): drivers that share a store
leave each other's jobs alone, so one study may be run by several drivers at once. A job that fails
(bad settings, data that changed since the study was planned) is reported and the others go on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from msakit import api
from msakit.errors import MsakitError
from msakit.study.executors import make_executor
from msakit.study.search import best_settings, load_search, tune
from msakit.study.spec import Job, Study, job_identity, load_data, load_study, study_recipe
from msakit.study.store import CLAIM_STALE_S, ResultStore
from msakit.training.runs import aligned_input, resolved_config
from msakit.training.trainer import state_seconds

logger = logging.getLogger(__name__)


def default_folder(study: Study) -> Path:
    return Path("runs") / "studies" / study.name


def study_store(study: Study, study_dir: str | Path | None, store: str | None) -> tuple[Path, ResultStore]:
    """The study's folder (`study_dir`, default runs/studies/<name>) and its results store (`store`,
    default the folder's study.db)."""
    root = Path(study_dir).expanduser() if study_dir is not None else default_folder(study)
    return root, ResultStore(store if store is not None else root / "study.db")


def plan_jobs(study: Study, tuned: Mapping[tuple[str, str], tuple[str, ...]] | None = None) -> list[Job]:
    """Every cell of the study, its identity computed from the resolved settings and the data;
    `tuned` adds the settings a search chose, per (dataset label, model label)."""
    jobs, loaded = [], {}
    for ref in study.datasets:
        for model in study.models:
            aligned = aligned_input(model.model, ref.aligned)
            if (ref, aligned) not in loaded:
                loaded[ref, aligned] = load_data(ref, model.model)
            data = loaded[ref, aligned]
            chosen = (tuned or {}).get((ref.label, model.label), ())
            model = dataclasses.replace(model, overrides=model.overrides + chosen)
            config = resolved_config(model.model, data, model.overrides, None)
            if model.reproduce:
                recipe = study_recipe(model.model)
                for seed in study.seeds:
                    key = job_identity(model.model, config, seed, data.fingerprint, recipe=recipe)
                    jobs.append(Job(key, ref, model, seed, data.fingerprint, config, (), data.metric_family,
                                    recipe=recipe))
                continue
            if model.dg is None:
                for seed in study.seeds:
                    jobs.append(Job(job_identity(model.model, config, seed, data.fingerprint), ref, model,
                                    seed, data.fingerprint, config, model.evaluations, data.metric_family))
                continue
            for target in model.dg.targets:
                for seed in study.seeds:
                    key = job_identity(model.model, config, seed, data.fingerprint, target, model.dg.group_by)
                    jobs.append(Job(key, ref, model, seed, data.fingerprint, config, (), data.metric_family,
                                    target, model.dg.group_by))
    return jobs


def _record(train: dict[str, Any], evaluations: dict[str, Any], start: float) -> dict[str, Any]:
    """A job's record: what its training reported, its evaluations, where and how long it ran."""
    return {"train": train, "evaluations": evaluations, "host": platform.node(),
            "seconds": time.perf_counter() - start}


def _dg_job(job: Job, data: Any, run_dir: Path, start: float) -> dict[str, Any]:
    """Train on every group but the job's target, select on their validation data, score in and
    out of domain (`api.dg`)."""
    result = api.dg(job.model.model, job.target, dataset=data, group_by=job.group_by, seeds=[job.seed],
                    overrides=list(job.model.overrides), output=run_dir, resume=True, progress=False,
                    command=f"msakit study run (job {job.id})")
    seed = result["seeds"][0]
    kept = ("valid", "in_domain", "out_of_domain", "gap", "per_domain", "best_epoch", "epochs_run")
    return _record({"target": job.target, "group_by": job.group_by, **{key: seed.get(key) for key in kept},
                    "warnings": result.get("warnings")}, {}, start)


def _reproduce_job(job: Job, data: Any, run_dir: Path, start: float) -> dict[str, Any]:
    """Train and score the job's seed by the model's `reproduce:` recipe (`api.reproduce`)."""
    result = api.reproduce(job.model.model, data, seeds=[job.seed], overrides=list(job.model.overrides),
                           output=run_dir, resume=True, progress=False,
                           command=f"msakit study run (job {job.id})")
    seed = result["seeds"][0]
    scored = {"protocol": "reproduce", "spec": job.recipe, "selection": result["selection"],
              "rows": seed["rows"], "mean": seed["mean"], "epochs": seed.get("epochs")}
    return _record({"selection": result["selection"], "warnings": result.get("warnings")},
                   {"reproduce": scored}, start)


def run_claimed_job(job: Job, root: str, store_url: str, owner: str) -> dict[str, Any]:
    """`run_job` while `owner` holds the job's claim in the store; `{"skipped": why}` when another
    driver holds it or recorded it after this driver planned it."""
    store = ResultStore(store_url)
    with store.holding(job.id, owner) as holder:
        if holder is not None:
            return {"skipped": f"held by {holder}"}
        if not _todo([job], store):
            return {"skipped": "recorded by another driver"}
        return run_job(job, root)


def run_job(job: Job, root: str) -> dict[str, Any]:
    """Train the job's seed (or read it back from its run folder) and run its evaluations. The
    record's seconds are this execution's and, for a training it resumes, the earlier executions'
    that its state files carry."""
    run_dir = Path(root) / "jobs" / job.id
    start = time.perf_counter() - sum(state_seconds(path) for path in run_dir.rglob("*.state.pt"))
    data = load_data(job.dataset, job.model.model)
    if data.fingerprint != job.fingerprint:
        raise MsakitError(f"{job.dataset.dataset} changed since the study was planned (content fingerprint "
                          f"{data.fingerprint[:12]}, planned {job.fingerprint[:12]}): run the study again")
    if job.target is not None:
        return _dg_job(job, data, run_dir, start)
    if job.recipe is not None:
        return _reproduce_job(job, data, run_dir, start)
    trained = api.train(job.model.model, data, seeds=[job.seed], overrides=list(job.model.overrides),
                        output=run_dir, resume=True, progress=False,
                        command=f"msakit study run (job {job.id})")
    seed = trained["seeds"][0]
    checkpoint = run_dir / f"seed-{job.seed}.pt"
    evaluations = {}
    for evaluation in job.evaluations:
        result = api.robustness(checkpoint, data, protocol=evaluation.protocol, rates=evaluation.rates,
                                subsets=evaluation.subsets, seeds=evaluation.seeds, device="auto",
                                overrides=evaluation.overrides)
        evaluations[evaluation.key] = {"protocol": evaluation.protocol,
                                       "spec": dataclasses.asdict(evaluation),
                                       "rows": result["rows"], "mean": result["mean"]}
    train = {key: seed.get(key) for key in ("valid", "test", "best_epoch", "epochs_run", "warnings")}
    if seed.get("stages"):  # per stage: its test
        train["stages"] = seed["stages"]
    return _record(train, evaluations, start)


def _merged(jobs: list[Job]) -> list[Job]:
    """One job per identity: model entries that train alike share a training and their evaluations."""
    out: dict[str, Job] = {}
    for job in jobs:
        if job.id in out:
            evaluations = tuple(dict.fromkeys(out[job.id].evaluations + job.evaluations))
            job = dataclasses.replace(out[job.id], evaluations=evaluations)
        out[job.id] = job
    return list(out.values())


def _todo(jobs: list[Job], store: ResultStore) -> list[Job]:
    """The jobs without a record, or with evaluations their record lacks (those only)."""
    records = store.records(job.id for job in jobs)
    todo = []
    for job in _merged(jobs):
        done = records.get(job.id, {}).get("evaluations")
        if done is None:
            todo.append(job)
            continue
        missing = tuple(e for e in job.evaluations if e.key not in done)
        if missing:
            todo.append(dataclasses.replace(job, evaluations=missing))
    return todo


def run_study(
    path: str | Path, *, study_dir: str | Path | None = None, store: str | None = None,
    address: str | None = None, executor: str = "ray", only: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Runs the study at `path`: its search first (if it has one; see `msakit.study.search`), then
    every job the store has no record of. Returns a summary (jobs, ran, skipped, failures,
    elsewhere: the jobs another driver held or recorded meanwhile, store, study_dir). `study_dir`
    holds the jobs' run folders and the default store (default: runs/studies/<name>); `only` names
    the model labels to run."""
    study = load_study(path)
    if only is not None:
        labels = [m.label for m in study.models]
        unknown = sorted(set(only) - set(labels))
        if unknown:
            raise MsakitError(f"--only {unknown[0]!r}: not a model of {path}; its models: "
                              f"{', '.join(labels)}")
        study = dataclasses.replace(study, models=tuple(m for m in study.models if m.label in only))
    root, results = study_store(study, study_dir, store)
    search = load_search(study)
    runner = make_executor(executor, address, study.cpus, study.gpus)
    failures: list[dict[str, str]] = []
    elsewhere: list[dict[str, str]] = []
    owner = f"{platform.node()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    try:
        tuned = tune(study, search, results.url, runner) if search is not None else {}
        jobs = plan_jobs(study, tuned)
        todo = _todo(jobs, results)
        count = len({job.id for job in jobs})
        logger.info("study %s: %d jobs, %d to run, store %s", study.name, count, len(todo), results.url)
        root_text = str(root.resolve())
        for job in todo:
            runner.submit(job.id, run_claimed_job, job, root_text, results.url, owner)
        by_id = {job.id: job for job in todo}
        while runner.pending:
            key, record, error = runner.next_done()
            job = by_id[key]
            target = "" if job.target is None else f", target {job.target}"
            name = f"{job.model.label} on {job.dataset.label}{target}, seed {job.seed}"
            if record is None:
                failures.append({"job": job.id, "what": name, "error": error or ""})
                logger.warning("job %s (%s) failed: %s", job.id, name, error)
                continue
            if "skipped" in record:
                elsewhere.append({"job": job.id, "what": name, "why": record["skipped"]})
                logger.info("job %s (%s) left alone: %s", job.id, name, record["skipped"])
                continue
            results.save(job, record)
            logger.info("job %s (%s) done in %.0f s", job.id, name, record["seconds"])
    finally:
        runner.close()
        results.release_quietly(owner)  # the claims of jobs cancelled with their workers
    return {"study": study.name, "jobs": count, "ran": len(todo) - len(failures) - len(elsewhere),
            "skipped": count - len(todo), "failures": failures, "elsewhere": elsewhere,
            "store": results.url, "study_dir": str(root)}


def planned_jobs(study: Study, results: ResultStore) -> tuple[list[Job], list[str]]:
    """The study's jobs as far as `results` knows them, without running anything: a searched entry
    has its jobs once its search has finished in that store; the labels of those that have not are
    returned apart."""
    search = load_search(study)
    if search is None:
        return plan_jobs(study), []
    try:
        tuned = best_settings(study, search, results.url)
    except MsakitError:
        unsearched = [m.label for m in study.models if m.label in search.models]
        known = dataclasses.replace(study, models=tuple(m for m in study.models if m.label not in unsearched))
        return plan_jobs(known), unsearched
    return plan_jobs(study, tuned), []


def study_status(path: str | Path, *, study_dir: str | Path | None = None,
                 store: str | None = None) -> dict[str, Any]:
    """Where the study at `path` stands in its store, without running anything: per model entry its
    jobs, how many are recorded, which are being trained now (the driver holding each and the
    seconds since its heartbeat) and how many are left to run (a stale claim counts as left).
    Entries whose search has not finished are listed apart (their jobs are not known yet)."""
    study = load_study(path)
    _, results = study_store(study, study_dir, store)
    jobs, unsearched = planned_jobs(study, results)
    todo = {job.id for job in _todo(jobs, results)}
    held = {key: value for key, value in results.holders(job.id for job in jobs).items()
            if key in todo and value[1] < CLAIM_STALE_S}
    rows = []
    for model in (m for m in study.models if m.label not in unsearched):
        mine = [job for job in jobs if job.model.label == model.label]
        running = [{"job": job.id, "dataset": job.dataset.label, "seed": job.seed, "owner": held[job.id][0],
                    "heartbeat_s": held[job.id][1]} for job in mine if job.id in held]
        rows.append({"model": model.label, "jobs": len(mine),
                     "recorded": sum(job.id not in todo for job in mine), "running": running,
                     "to_run": sum(job.id in todo and job.id not in held for job in mine)})
    return {"study": study.name, "store": results.url, "models": rows, "unsearched": unsearched}
