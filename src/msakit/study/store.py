"""The results store of studies: one row per job (its training's metrics) and one per evaluation.

An embedded SQLite file by default (`<study output>/study.db`); any SQLAlchemy URL (e.g.
`postgresql://user@host/msakit`) when several machines write to one store. Rows are keyed by job
identity (`msakit.study.spec.job_identity`), so studies that share cells share their records. Each
record is written in one transaction as its job finishes.

A job being trained holds a claim (its id, the driver that runs it, a heartbeat renewed every
HEARTBEAT_S while it trains), so drivers sharing a store (several `msakit study run` on one study,
or studies that share cells) never train one job twice at once: a job another driver holds is left
to it. A claim whose heartbeat is older than CLAIM_STALE_S belongs to a driver or worker that died
and is taken over; the training resumes from its run folder.
"""

from __future__ import annotations

import json
import logging
import platform
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from msakit.errors import MsakitError
from msakit.study.spec import Job

logger = logging.getLogger(__name__)

HEARTBEAT_S = 60.0
CLAIM_STALE_S = 600.0  # ten missed heartbeats: the holder is gone, not slow


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
        self.claims = sa.Table(
            "msakit_claims", metadata,
            sa.Column("job_id", sa.String(32), primary_key=True),
            sa.Column("owner", sa.Text), sa.Column("heartbeat", sa.Float),
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
        """The job's record (its training, and the evaluations it ran) in one transaction. A job
        recorded before keeps the label, host and seconds of the execution that trained it: a later
        one (new evaluations for a checkpoint read back) adds its evaluations and its training's
        summary as read back."""
        train = json.dumps(record["train"])
        with self.engine.begin() as connection:
            connection.execute(self.claims.delete().where(self.claims.c.job_id == job.id))
            known = connection.execute(self.jobs.update().where(self.jobs.c.id == job.id).values(train=train))
            if not known.rowcount:
                connection.execute(self.jobs.insert().values(
                    id=job.id, dataset=job.dataset.label, model=job.model.model, label=job.model.label,
                    seed=job.seed, fingerprint=job.fingerprint, config=json.dumps(job.config, sort_keys=True),
                    train=train, host=record.get("host", platform.node()), seconds=record.get("seconds"),
                    finished=time.time(),
                ))
            for key, result in record["evaluations"].items():
                connection.execute(self.evaluations.delete().where(
                    (self.evaluations.c.job_id == job.id) & (self.evaluations.c.key == key)))
                connection.execute(self.evaluations.insert().values(
                    job_id=job.id, key=key, protocol=result["protocol"],
                    spec=json.dumps(result["spec"], sort_keys=True), result=json.dumps(result)))

    def claim(self, job_id: str, owner: str) -> str | None:
        """Claims `job_id` for `owner`: None when `owner` now holds it (a new claim, its own, or one
        gone stale), else who holds it and when its heartbeat was last renewed."""
        sa = _sqlalchemy()
        now = time.time()
        claims = self.claims
        with self.engine.begin() as connection:
            taken = connection.execute(claims.update().where(
                (claims.c.job_id == job_id)
                & ((claims.c.owner == owner) | (claims.c.heartbeat < now - CLAIM_STALE_S))
            ).values(owner=owner, heartbeat=now)).rowcount
        if taken:
            return None
        try:
            with self.engine.begin() as connection:
                connection.execute(claims.insert().values(job_id=job_id, owner=owner, heartbeat=now))
        except sa.exc.IntegrityError:  # another driver claimed it first
            with self.engine.connect() as connection:
                held = connection.execute(sa.select(claims.c.owner, claims.c.heartbeat)
                                          .where(claims.c.job_id == job_id)).first()
            if held is None:  # released meanwhile: its record is in the store
                return "another driver"
            return (f"{held.owner} (heartbeat {now - held.heartbeat:.0f} s ago; taken over "
                    f"{CLAIM_STALE_S:.0f} s after it)")
        return None

    def holders(self, ids: Iterable[str]) -> dict[str, tuple[str, float]]:
        """Job id -> (owner, seconds since its heartbeat) for the jobs of `ids` that are claimed."""
        sa = _sqlalchemy()
        now = time.time()
        query = sa.select(self.claims).where(self.claims.c.job_id.in_(list(ids)))
        with self.engine.connect() as connection:
            return {row.job_id: (row.owner, now - row.heartbeat) for row in connection.execute(query)}

    def renew(self, job_id: str, owner: str) -> None:
        """The claim's heartbeat, now (only while `owner` holds it)."""
        held = (self.claims.c.job_id == job_id) & (self.claims.c.owner == owner)
        with self.engine.begin() as connection:
            connection.execute(self.claims.update().where(held).values(heartbeat=time.time()))

    def release(self, owner: str, job_id: str | None = None) -> None:
        """`owner`'s claim on `job_id`, or all its claims (a driver that stops)."""
        held = self.claims.c.owner == owner
        if job_id is not None:
            held = held & (self.claims.c.job_id == job_id)
        with self.engine.begin() as connection:
            connection.execute(self.claims.delete().where(held))

    def release_quietly(self, owner: str) -> None:
        """All of `owner`'s claims, for a driver that stops, perhaps on an error of the store itself:
        a store that cannot be reached now is logged (the claims go stale) and the error kept."""
        try:
            self.release(owner)
        except _sqlalchemy().exc.SQLAlchemyError as exc:
            logger.warning("the claims of %s stay until they go stale: %s", owner, exc)

    @contextmanager
    def holding(self, job_id: str, owner: str) -> Iterator[str | None]:
        """Holds the claim on `job_id` while the block runs, renewing its heartbeat; yields None, or
        the other owner that holds it (the block should then leave the job alone). A block that
        fails releases the claim; one that ends keeps it (no longer renewed) until `save` records
        the job or the driver releases its claims, so no other driver starts the job in between."""
        holder = self.claim(job_id, owner)
        if holder is not None:
            yield holder
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                try:
                    self.renew(job_id, owner)
                except _sqlalchemy().exc.SQLAlchemyError as exc:  # a busy or unreachable store: next beat
                    logger.warning("job %s: its claim's heartbeat was not renewed (%s)", job_id, exc)

        thread = threading.Thread(target=beat, name=f"claim-{job_id}", daemon=True)
        thread.start()
        try:
            yield None
        except BaseException:
            self.release(owner, job_id)
            raise
        finally:
            stop.set()
            thread.join()
