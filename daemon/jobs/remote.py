"""What the hub holds for each job, and what it billed: the statements behind pay-once.

Every remote job the hub made for a job (each one a paid conversion) is a row of
``remote_jobs`` with its last known state, output and expiry, so that a retry, a
restart or another instance resumes from what the hub still holds; every conversion
the hub reported pages for is a row of ``usage`` (kept when jobs are purged); and the
poll scheduler's learned durations per engine live in ``durations``. ``Store`` (the
queue) inherits these statements.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Insert, ReturningInsert

from daemon.jobs.database import Database
from daemon.jobs.model import Job, RemoteRecord
from daemon.jobs.tables import durations_table, remote_jobs_table, usage_table


def _insert(dialect: str, table: Table) -> Any:
    """The dialect's INSERT, which knows ``ON CONFLICT`` (both back ends speak it)."""
    return (postgresql if dialect == "postgresql" else sqlite).insert(table)


@functools.lru_cache(maxsize=4)
def _upsert_remote(dialect: str) -> Insert:
    """One statement for "insert or update a remote job" (was an UPDATE, then an INSERT
    when it changed nothing). The creation time is the hub's, known only when the job
    was created: a later record without one keeps it."""
    table = remote_jobs_table
    statement = _insert(dialect, table)
    changes = {c.name: statement.excluded[c.name] for c in table.columns if not c.primary_key}
    changes["created_at"] = func.coalesce(statement.excluded.created_at, table.c.created_at)
    upsert: Insert = statement.on_conflict_do_update(
        index_elements=[table.c.remote_job_id], set_=changes
    )
    return upsert


@functools.lru_cache(maxsize=4)
def _insert_usage(dialect: str) -> ReturningInsert[Any]:
    """INSERT of what the hub billed for a remote job, doing nothing when it is noted
    already (was a SELECT, then an INSERT); it returns the row it inserted (psycopg
    gives no row count for it)."""
    statement = _insert(dialect, usage_table)
    key = usage_table.c.remote_job_id
    once = statement.on_conflict_do_nothing(index_elements=[key])
    returning: ReturningInsert[Any] = once.returning(key)
    return returning


class HubRecords(Database):
    """The statements on what the hub holds and billed."""

    def record_remote(self, record: RemoteRecord, now: float) -> None:
        """Insert or update what the hub holds for a job: one row per remote job (a
        record without ``created_at`` keeps the one known)."""
        values = {**record.__dict__, "recorded_at": now}
        with self.write() as conn:
            conn.execute(_upsert_remote(self.dialect), values)

    def remote_records(self, job_id: int) -> list[RemoteRecord]:
        """Every remote job made for ``job_id``, oldest first."""
        table = remote_jobs_table
        query = select(table).where(table.c.job_id == job_id).order_by(table.c.recorded_at)
        names = {f.name for f in dataclasses.fields(RemoteRecord)}
        with self.read() as conn:
            rows = [dict(row._mapping) for row in conn.execute(query)]
        return [RemoteRecord(**{k: v for k, v in row.items() if k in names}) for row in rows]

    def record_usage(self, job: Job, record: RemoteRecord, folder: str, billed_at: float) -> bool:
        """Note what the hub billed for one remote job (once, whatever happens after);
        True when it was noted now, False when there was nothing (new) to note."""
        if record.pages is None:
            return False
        values = {
            "remote_job_id": record.remote_job_id,
            "job_id": job.id,
            "path": job.path,
            "folder": folder,
            "rule": job.rule,
            "pages": record.pages,
            "outcome": record.status,
            "billed_at": billed_at,
        }
        with self.write() as conn:
            return conn.execute(_insert_usage(self.dialect), values).first() is not None

    def durations(self) -> dict[str, tuple[float, float, int]]:
        """Learned durations per engine: (seconds per page, base seconds, samples)."""
        table = durations_table
        with self.read() as conn:
            return {
                row.engine: (row.per_page, row.base, row.samples)
                for row in conn.execute(select(table))
            }

    def save_duration(
        self, engine: str, per_page: float, base: float, samples: int, now: float
    ) -> None:
        """Keep what was learned about ``engine``'s durations, across restarts."""
        table = durations_table
        values = {"per_page": per_page, "base": base, "samples": samples, "updated_at": now}
        with self.write() as conn:
            changed = conn.execute(
                update(table).where(table.c.engine == engine).values(values)
            ).rowcount
            if not changed:
                conn.execute(insert(table).values(engine=engine, **values))
