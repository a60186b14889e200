"""A study's records as a text file: `msakit study export` writes them, `msakit study import` reads
them into another store.

One JSON object per line, a job's whole record as the store holds it (its training's summary and its
evaluations, with the label and host of the execution that trained it and the seconds it took, those
of the earlier executions it resumed included), sorted by model label, dataset, seed and job id, so
the same records make the same bytes. What it is for: records that travel without a shared database
(a study trained partly on a laptop and partly on a cluster, each with its own SQLite store), and
records published beside a leaderboard, so that `msakit study report` regenerates it without
training anything.

An import checks the whole file before it writes anything: a line that is not a record is one error
naming the file and the line, and the store is left as it was. A record whose job is not one of the
study's jobs as planned now (a changed setting, code default or dataset gives another job identity;
or another study's job) is skipped and counted, as is one the store already holds (the store keeps
its own; an imported record takes the importing study's label for its model). Job identities hash
the resolved settings and the data's fingerprint, so a record lands only on the job that trained it.
The records of a searched entry import only into a store that holds its finished search
(`optuna.copy_study` copies one), since the search decides its jobs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from msakit.errors import MsakitError
from msakit.fileio import atomic_write_text
from msakit.study.runner import planned_jobs, study_store
from msakit.study.spec import Job, identity_settings, load_study

RECORD_KEYS = ("job", "train", "evaluations")


def export_records(path: str | Path, output: str | Path, *, study_dir: str | Path | None = None,
                   store: str | None = None) -> dict[str, Any]:
    """Writes the store's records of the study at `path` to `output` (JSON lines); returns counts."""
    study = load_study(path)
    _, results = study_store(study, study_dir, store)
    jobs, _ = planned_jobs(study, results)
    records = results.records(job.id for job in jobs)
    if not records:
        raise MsakitError(f"the store {results.url} has no record of study {study.name}'s jobs: "
                          f"nothing to export")
    order = sorted(records.values(), key=lambda r: (r["label"], r["dataset"], r["seed"], r["job"]))
    out = Path(output).expanduser()
    atomic_write_text(out, "".join(json.dumps(record, sort_keys=True) + "\n" for record in order))
    return {"study": study.name, "records": len(records), "jobs": len({job.id for job in jobs}),
            "output": str(out)}


def read_records(source: Path) -> list[tuple[int, dict[str, Any]]]:
    """The records of a file `export_records` wrote, each with its line number; a line that is not a
    record is one error naming the file and the line."""
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MsakitError(f"{source}: cannot read the records ({exc})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MsakitError(f"{source} line {number}: not a JSON record ({exc.msg})") from None
        if not isinstance(record, dict):
            raise MsakitError(f"{source} line {number}: expected a JSON object, got {type(record).__name__}")
        missing = [key for key in RECORD_KEYS if key not in record]
        if missing:
            raise MsakitError(f"{source} line {number}: key {missing[0]!r} missing")
        evaluations = record["evaluations"]
        if not isinstance(record["train"], dict) or not isinstance(evaluations, dict) or not all(
                isinstance(e, dict) and "protocol" in e and "spec" in e for e in evaluations.values()):
            raise MsakitError(f"{source} line {number}: 'train' and each of 'evaluations' must be objects, "
                              f"each evaluation with its 'protocol' and 'spec'")
        records.append((number, record))
    return records


def _settings(config: Any) -> str:
    """The settings that make a job, as JSON (tuples read as the lists a record holds); a file
    setting by its presence only, since another machine's path to the same content differs (the job
    id holds the content)."""
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        return ""
    return json.dumps(identity_settings(config, files=lambda path: "a file"), sort_keys=True)


def _check(source: Path, number: int, record: dict[str, Any], job: Job) -> None:
    """A record on a known job id must be that job's: its settings and seed as the study plans them."""
    if _settings(record.get("config")) != _settings(job.config) or record.get("seed") != job.seed:
        raise MsakitError(f"{source} line {number}: record {record['job']} does not hold the settings and "
                          f"seed of the job with that identity (an edited or damaged record)")


def import_records(path: str | Path, source: str | Path, *, study_dir: str | Path | None = None,
                   store: str | None = None) -> dict[str, Any]:
    """Adds the records in `source` (as `export_records` writes them) to the store of the study at
    `path`; returns the counts: imported, already (in the store), foreign (not a job of the study)."""
    study = load_study(path)
    source = Path(source).expanduser()
    if not source.is_file():
        raise MsakitError(f"{source}: no such records file")
    records = read_records(source)
    _, results = study_store(study, study_dir, store)
    jobs, unsearched = planned_jobs(study, results)
    by_id = {job.id: job for job in jobs}
    known = results.records(by_id)
    for number, record in records:
        if record["job"] in by_id:
            _check(source, number, record, by_id[record["job"]])
    new = [(by_id[r["job"]], r) for _, r in records if r["job"] in by_id and r["job"] not in known]
    for job, record in new:
        results.save(job, {"train": record["train"], "evaluations": record["evaluations"],
                           "host": record.get("host"), "seconds": record.get("seconds")})
    return {"study": study.name, "store": results.url, "imported": len(new),
            "already": sum(r["job"] in known for _, r in records),
            "foreign": sum(r["job"] not in by_id for _, r in records), "unsearched": unsearched}
