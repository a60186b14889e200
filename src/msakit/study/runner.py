"""`msakit study run`: the jobs of a study executed on Ray (or in this process), records to the store.

The driver expands the study into jobs (`msakit.study.spec`), asks the store which are done, and
submits the rest as Ray tasks: to a local Ray instance it starts and stops itself, or to an existing
cluster (`address`). Each task asks for the study's `resources`; a task whose worker dies is retried
by Ray and resumes from the training state its run folder holds (`<study folder>/jobs/<job id>/`; on a
cluster that folder must be on a shared file system). Each record goes to the store as its job
finishes, so an interrupted study loses only the jobs in flight, and a rerun executes only what is
missing. A job that fails (bad settings, data that changed since the study was planned) is reported
and the others go on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from msakit import api
from msakit.data.schema import MultimodalDataset
from msakit.errors import MsakitError, one_line
from msakit.study.spec import DatasetRef, Job, Study, job_identity, load_study
from msakit.study.store import ResultStore
from msakit.training.runs import aligned_input, resolved_config

logger = logging.getLogger(__name__)

TASK_RETRIES = 3  # attempts after a worker dies (Ray's system failures), each resuming the training


def default_folder(study: Study) -> Path:
    return Path("runs") / "studies" / study.name


def load_data(ref: DatasetRef, model: str) -> MultimodalDataset:
    return api.load_dataset(ref.dataset, ref.data_dir, family=ref.family,
                            aligned=aligned_input(model, ref.aligned))


def plan_jobs(study: Study) -> list[Job]:
    """Every cell of the study, its identity computed from the resolved settings and the data."""
    jobs, loaded = [], {}
    for ref in study.datasets:
        for model in study.models:
            aligned = aligned_input(model.model, ref.aligned)
            if (ref, aligned) not in loaded:
                loaded[ref, aligned] = load_data(ref, model.model)
            data = loaded[ref, aligned]
            config = resolved_config(model.model, data, model.overrides, None)
            for seed in study.seeds:
                jobs.append(Job(job_identity(model.model, config, seed, data.fingerprint), ref, model, seed,
                                data.fingerprint, config, study.evaluations))
    return jobs


def run_job(job: Job, root: str) -> dict[str, Any]:
    """Train the job's seed (or read it back from its run folder) and run its evaluations."""
    start = time.perf_counter()
    data = load_data(job.dataset, job.model.model)
    if data.fingerprint != job.fingerprint:
        raise MsakitError(f"{job.dataset.dataset} changed since the study was planned (content fingerprint "
                          f"{data.fingerprint[:12]}, planned {job.fingerprint[:12]}): run the study again")
    run_dir = Path(root) / "jobs" / job.id
    trained = api.train(job.model.model, data, seeds=[job.seed], overrides=list(job.model.overrides),
                        output=run_dir, resume=True, progress=False,
                        command=f"msakit study run (job {job.id})")
    seed = trained["seeds"][0]
    checkpoint = run_dir / f"seed-{job.seed}.pt"
    evaluations = {}
    for evaluation in job.evaluations:
        result = api.robustness(checkpoint, data, protocol=evaluation.protocol, rates=evaluation.rates,
                                subsets=evaluation.subsets, seeds=evaluation.seeds, device="auto")
        evaluations[evaluation.key] = {"protocol": evaluation.protocol,
                                       "spec": dataclasses.asdict(evaluation),
                                       "rows": result["rows"], "mean": result["mean"]}
    return {
        "train": {key: seed.get(key) for key in ("valid", "test", "best_epoch", "epochs_run", "warnings")},
        "evaluations": evaluations, "host": platform.node(), "seconds": time.perf_counter() - start,
    }


def _job_task(job: Job, root: str, threads: int) -> dict[str, Any]:
    """`run_job` in a Ray worker, with as many torch threads as the job asked CPUs."""
    import torch

    torch.set_num_threads(max(1, threads))
    logging.basicConfig(level=logging.WARNING)
    return run_job(job, root)


def _todo(jobs: list[Job], store: ResultStore) -> list[Job]:
    """The jobs without a record, or with evaluations their record lacks (those only)."""
    records = store.records(job.id for job in jobs)
    todo = []
    for job in jobs:
        done = records.get(job.id, {}).get("evaluations")
        if done is None:
            todo.append(job)
            continue
        missing = tuple(e for e in job.evaluations if e.key not in done)
        if missing:
            todo.append(dataclasses.replace(job, evaluations=missing))
    return todo


Finished = Callable[[Job, dict[str, Any] | None, str | None], None]


def _run_here(jobs: list[Job], root: str, finished: Finished) -> None:
    for job in jobs:
        try:
            record = run_job(job, root)
        except MsakitError as exc:
            finished(job, None, one_line(exc))
            continue
        finished(job, record, None)


def _run_on_ray(jobs: list[Job], root: str, study: Study, address: str | None, finished: Finished) -> None:
    try:
        import ray
    except ImportError:
        raise MsakitError("running a study on Ray needs ray: pip install 'msakit[study]' "
                          "(or --executor local)") from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry from an offline machine
    started = not ray.is_initialized()
    if started:
        try:
            if address is None:
                ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            else:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise MsakitError(f"--address {address}: cannot join the Ray cluster ({one_line(exc)})") from None
    task = ray.remote(_job_task).options(num_cpus=study.cpus, num_gpus=study.gpus, max_retries=TASK_RETRIES,
                                         retry_exceptions=False)
    threads = max(1, int(study.cpus))
    pending = {task.remote(job, root, threads): job for job in jobs}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                record = ray.get(ready[0])
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                finished(job, None, one_line(cause))
                continue
            except ray.exceptions.RayError as exc:  # the worker died more often than it was retried
                finished(job, None, one_line(exc))
                continue
            finished(job, record, None)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def run_study(
    path: str | Path, *, study_dir: str | Path | None = None, store: str | None = None,
    address: str | None = None, executor: str = "ray", only: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Runs every job of the study at `path` that the store has no record of; returns a summary
    (jobs, ran, skipped, failures, store, study_dir). `study_dir` holds the jobs' run folders and
    the default store (default: runs/studies/<name>); `only` names the model labels to run."""
    if executor not in ("ray", "local"):
        raise MsakitError(f"--executor {executor!r}: use ray or local")
    study = load_study(path)
    if only is not None:
        labels = [m.label for m in study.models]
        unknown = sorted(set(only) - set(labels))
        if unknown:
            raise MsakitError(f"--only {unknown[0]!r}: not a model of {path}; its models: "
                              f"{', '.join(labels)}")
        study = dataclasses.replace(study, models=tuple(m for m in study.models if m.label in only))
    root = Path(study_dir).expanduser() if study_dir is not None else default_folder(study)
    results = ResultStore(store if store is not None else root / "study.db")
    jobs = plan_jobs(study)
    todo = _todo(jobs, results)
    logger.info("study %s: %d jobs, %d to run, store %s", study.name, len(jobs), len(todo), results.url)
    failures: list[dict[str, str]] = []

    def finished(job: Job, record: dict[str, Any] | None, error: str | None) -> None:
        name = f"{job.model.label} on {job.dataset.label}, seed {job.seed}"
        if record is None:
            failures.append({"job": job.id, "what": name, "error": error or ""})
            logger.warning("job %s (%s) failed: %s", job.id, name, error)
            return
        results.save(job, record)
        logger.info("job %s (%s) done in %.0f s", job.id, name, record["seconds"])

    root_text = str(root.resolve())
    if todo and executor == "local":
        _run_here(todo, root_text, finished)
    elif todo:
        _run_on_ray(todo, root_text, study, address, finished)
    return {"study": study.name, "jobs": len(jobs), "ran": len(todo) - len(failures),
            "skipped": len(jobs) - len(todo), "failures": failures, "store": results.url,
            "study_dir": str(root)}
