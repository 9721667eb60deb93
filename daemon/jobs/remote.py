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

from sqlalchemy import insert, select, update

from daemon.jobs.database import Database
from daemon.jobs.model import Job, RemoteRecord
from daemon.jobs.tables import durations_table, remote_jobs_table, usage_table


class HubRecords(Database):
    """The statements on what the hub holds and billed."""

    def record_remote(self, record: RemoteRecord, now: float) -> None:
        """Insert or update what the hub holds for a job: one row per remote job."""
        values = {**dataclasses.asdict(record), "recorded_at": now}
        table = remote_jobs_table
        with self.write() as conn:
            changed = conn.execute(
                update(table).where(table.c.remote_job_id == record.remote_job_id).values(values)
            ).rowcount
            if not changed:
                conn.execute(insert(table).values(values))

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
        table = usage_table
        with self.write() as conn:
            known = select(table.c.remote_job_id).where(
                table.c.remote_job_id == record.remote_job_id
            )
            if conn.execute(known).first() is not None:
                return False
            conn.execute(insert(table).values(values))
        return True

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
