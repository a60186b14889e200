"""The results store of studies: one row per job (its training's metrics) and one per evaluation.

An embedded SQLite file by default (`<study output>/study.db`); any SQLAlchemy URL (e.g.
`postgresql://user@host/msakit`) when several machines write to one store. Rows are keyed by job
identity (`msakit.study.spec.job_identity`), so studies that share cells share their records. Each
record is written in one transaction as its job finishes.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from msakit.errors import MsakitError
from msakit.study.spec import Job


def _sqlalchemy() -> Any:
    try:
        import sqlalchemy
    except ImportError:
        raise MsakitError("studies need SQLAlchemy, Ray and Optuna: pip install 'msakit[study]'") from None
    return sqlalchemy


def store_url(where: str | Path) -> str:
    """An SQLAlchemy URL as given, or the SQLite URL of a file path."""
    text = str(where)
    return text if "://" in text else f"sqlite:///{Path(text).expanduser().resolve()}"


class ResultStore:
    """Job and evaluation records, read and written through SQLAlchemy."""

    def __init__(self, where: str | Path) -> None:
        sa = _sqlalchemy()
        self.url = store_url(where)
        if self.url.startswith("sqlite:///"):
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine = sa.create_engine(self.url)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as exc:
            raise MsakitError(f"--store {where}: not a usable database URL ({exc})") from None
        metadata = sa.MetaData()
        self.jobs = sa.Table(
            "msakit_jobs", metadata,
            sa.Column("id", sa.String(32), primary_key=True),
            sa.Column("dataset", sa.Text), sa.Column("model", sa.Text), sa.Column("label", sa.Text),
            sa.Column("seed", sa.BigInteger), sa.Column("fingerprint", sa.String(64)),
            sa.Column("config", sa.Text), sa.Column("train", sa.Text), sa.Column("host", sa.Text),
            sa.Column("seconds", sa.Float), sa.Column("finished", sa.Float),
        )
        self.evaluations = sa.Table(
            "msakit_evaluations", metadata,
            sa.Column("job_id", sa.String(32), primary_key=True),
            sa.Column("key", sa.String(32), primary_key=True),
            sa.Column("protocol", sa.Text), sa.Column("spec", sa.Text), sa.Column("result", sa.Text),
        )
        try:
            metadata.create_all(self.engine)
        except sa.exc.OperationalError as exc:
            raise MsakitError(f"--store {where}: cannot open the database ({exc.orig})") from None

    def records(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The records of the jobs in `ids` that have one: {"train", "evaluations": {key: ...}, ...}."""
        sa = _sqlalchemy()
        ids = list(ids)
        out: dict[str, dict[str, Any]] = {}
        with self.engine.connect() as connection:
            for row in connection.execute(sa.select(self.jobs).where(self.jobs.c.id.in_(ids))).mappings():
                out[row["id"]] = {
                    "job": row["id"], "dataset": row["dataset"], "model": row["model"],
                    "label": row["label"], "seed": row["seed"], "config": json.loads(row["config"]),
                    "train": json.loads(row["train"]), "host": row["host"], "seconds": row["seconds"],
                    "evaluations": {},
                }
            query = sa.select(self.evaluations).where(self.evaluations.c.job_id.in_(list(out)))
            for row in connection.execute(query).mappings():
                out[row["job_id"]]["evaluations"][row["key"]] = json.loads(row["result"])
        return out

    def save(self, job: Job, record: dict[str, Any]) -> None:
        """The job's record (its training, and the evaluations it ran) in one transaction."""
        with self.engine.begin() as connection:
            connection.execute(self.jobs.delete().where(self.jobs.c.id == job.id))
            connection.execute(self.jobs.insert().values(
                id=job.id, dataset=job.dataset.label, model=job.model.model, label=job.model.label,
                seed=job.seed, fingerprint=job.fingerprint, config=json.dumps(job.config, sort_keys=True),
                train=json.dumps(record["train"]), host=record.get("host", platform.node()),
                seconds=record.get("seconds"), finished=time.time(),
            ))
            for key, result in record["evaluations"].items():
                connection.execute(self.evaluations.delete().where(
                    (self.evaluations.c.job_id == job.id) & (self.evaluations.c.key == key)))
                connection.execute(self.evaluations.insert().values(
                    job_id=job.id, key=key, protocol=result["protocol"],
                    spec=json.dumps(result["spec"], sort_keys=True), result=json.dumps(result)))
