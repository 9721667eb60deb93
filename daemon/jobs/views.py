"""What operators read: counts, job lists, failures, instances, waiting inputs, usage.

The read side of the state database, apart from the queue's statements
(``daemon.jobs.store``): ``status``, ``jobs``, ``explain``, ``usage``, the health
monitor and the progress bar ask here, and nothing here writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import case, func, or_, select

from daemon.jobs.database import Database
from daemon.jobs.model import Instance, Job, Stage, Status, Waiting
from daemon.jobs.store import job_from_row
from daemon.jobs.tables import (
    instances_table,
    jobs_table,
    unfinished,
    usage_table,
    waiting_table,
)


@dataclass(frozen=True)
class Billed:
    """One remote job the hub billed, as ``usage`` counts it."""

    path: str
    folder: str
    rule: str | None
    pages: int
    outcome: str
    billed_at: float


@dataclass(frozen=True)
class PagesUsed:
    """Pages billed today and this month, and the pages of the conversions at the hub
    that are not billed yet (job id -> pages counted at intake, 1 when unknown)."""

    today: int
    month: int
    at_hub: dict[int, int]


class Views:
    """Read-only queries over a state database."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def counts(self) -> dict[str, int]:
        """Number of jobs per public status (every status present, zero included)."""
        query = select(jobs_table.c.status, func.count()).group_by(jobs_table.c.status)
        counts = {status.value: 0 for status in Status}
        with self.database.read() as conn:
            for status, count in conn.execute(query):
                counts[status] = int(count)
        return counts

    def jobs(self, status: Status | None = None, limit: int | None = None) -> list[Job]:
        """Jobs, newest first, optionally of one status."""
        query = select(jobs_table).order_by(jobs_table.c.id.desc())
        if status is not None:
            query = query.where(jobs_table.c.status == status.value)
        if limit is not None:
            query = query.limit(limit)
        with self.database.read() as conn:
            return [job_from_row(r) for r in conn.execute(query)]

    def get(self, job_id: int) -> Job | None:
        """One job by id."""
        with self.database.read() as conn:
            row = conn.execute(select(jobs_table).where(jobs_table.c.id == job_id)).first()
        return job_from_row(row) if row is not None else None

    def latest_for_path(self, path: str) -> Job | None:
        """The newest job for an input path."""
        query = (
            select(jobs_table)
            .where(jobs_table.c.path == path)
            .order_by(jobs_table.c.id.desc())
            .limit(1)
        )
        with self.database.read() as conn:
            row = conn.execute(query).first()
        return job_from_row(row) if row is not None else None

    def find(
        self,
        status: Status | None = None,
        *,
        created_before: float | None = None,
        created_after: float | None = None,
    ) -> list[Job]:
        """Jobs, newest first, filtered by status and by when they were queued."""
        query = select(jobs_table).order_by(jobs_table.c.id.desc())
        if status is not None:
            query = query.where(jobs_table.c.status == status.value)
        if created_before is not None:
            query = query.where(jobs_table.c.created_at < created_before)
        if created_after is not None:
            query = query.where(jobs_table.c.created_at >= created_after)
        with self.database.read() as conn:
            return [job_from_row(r) for r in conn.execute(query)]

    def oldest_unfinished(self) -> float | None:
        """When the oldest job that is still queued or processing was queued."""
        query = select(func.min(jobs_table.c.created_at)).where(unfinished())
        with self.database.read() as conn:
            value = conn.execute(query).scalar()
        return float(value) if value is not None else None

    def counts_since(self, since: float) -> dict[str, int]:
        """Jobs per status among those unfinished or changed since ``since`` (one run's work)."""
        query = (
            select(jobs_table.c.status, func.count())
            .where(or_(jobs_table.c.updated_at >= since, unfinished()))
            .group_by(jobs_table.c.status)
        )
        counts = {status.value: 0 for status in Status}
        with self.database.read() as conn:
            for status, count in conn.execute(query):
                counts[status] = int(count)
        return counts

    def purge_candidates(
        self, statuses: Sequence[Status], finished_before: float
    ) -> list[tuple[int, str, bool]]:
        """(id, path, is the newest job of its path) of final jobs finished before a time."""
        newer = jobs_table.alias("newer")
        newest = (
            select(func.max(newer.c.id)).where(newer.c.path == jobs_table.c.path).scalar_subquery()
        )
        query = select(jobs_table.c.id, jobs_table.c.path, jobs_table.c.id == newest).where(
            jobs_table.c.status.in_([s.value for s in statuses]),
            jobs_table.c.finished_at < finished_before,
        )
        with self.database.read() as conn:
            return [(int(r[0]), str(r[1]), bool(r[2])) for r in conn.execute(query)]

    def hook_failures(self, limit: int) -> list[Job]:
        """Jobs whose hook failed, newest first."""
        query = (
            select(jobs_table)
            .where(jobs_table.c.hook_error.is_not(None))
            .order_by(jobs_table.c.id.desc())
            .limit(limit)
        )
        with self.database.read() as conn:
            return [job_from_row(r) for r in conn.execute(query)]

    def waiting(self, path: str | None = None) -> list[Waiting]:
        """Inputs intake waits on for too long, longest first (or the one of ``path``)."""
        query = select(waiting_table).order_by(waiting_table.c.since)
        if path is not None:
            query = query.where(waiting_table.c.path == path)
        with self.database.read() as conn:
            return [Waiting(**dict(r._mapping)) for r in conn.execute(query)]

    def instances(self) -> list[Instance]:
        """Every instance that ever used the database, the most recently seen first."""
        query = select(instances_table).order_by(instances_table.c.seen_at.desc())
        with self.database.read() as conn:
            return [Instance(**dict(row._mapping)) for row in conn.execute(query)]

    def held(self, now: float) -> dict[str, int]:
        """Unfinished jobs per instance whose lease is current."""
        query = (
            select(jobs_table.c.owner, func.count())
            .where(unfinished(), jobs_table.c.lease_until >= now)
            .group_by(jobs_table.c.owner)
        )
        with self.database.read() as conn:
            return {str(owner): int(count) for owner, count in conn.execute(query)}

    def billed(self, since: float, until: float) -> list[Billed]:
        """What the hub billed between ``since`` and ``until`` (epoch seconds)."""
        table = usage_table
        query = (
            select(table)
            .where(table.c.billed_at >= since, table.c.billed_at < until)
            .order_by(table.c.billed_at)
        )
        with self.database.read() as conn:
            return [
                Billed(r.path, r.folder, r.rule, int(r.pages), r.outcome, float(r.billed_at))
                for r in conn.execute(query)
            ]

    def pages_used(self, day_start: float, month_start: float, until: float) -> PagesUsed:
        """Pages billed since ``day_start`` and since ``month_start`` (before ``until``),
        and the jobs converting at the hub whose remote job is not billed yet."""
        table = usage_table
        today = func.sum(case((table.c.billed_at >= day_start, table.c.pages), else_=0))
        billed = select(today, func.sum(table.c.pages)).where(
            table.c.billed_at >= month_start, table.c.billed_at < until
        )
        unbilled = (
            ~select(table.c.remote_job_id)
            .where(table.c.remote_job_id == jobs_table.c.remote_job_id)
            .exists()
        )
        at_hub = select(jobs_table.c.id, jobs_table.c.pages).where(
            jobs_table.c.stage == Stage.SUBMITTED.value, unbilled
        )
        with self.database.read() as conn:
            day, month = conn.execute(billed).one()
            jobs = {int(r.id): max(1, int(r.pages or 1)) for r in conn.execute(at_hub)}
        return PagesUsed(int(day or 0), int(month or 0), jobs)
