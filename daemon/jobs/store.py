"""The queue: the jobs table's statements for intake, the worker and the operator's writes.

Every method is one short transaction (or a part of the single writer's batch, see
``daemon.jobs.writer``). Several instances may share one database: a job is worked on
only by the instance that claimed it. A claim locks the due rows (``FOR UPDATE SKIP
LOCKED`` on PostgreSQL; SQLite's write lock does the same for its one writer) and writes
``owner`` and a lease expiry; the holder renews the lease while it works, every change
it makes is conditional on still being the owner, and once a lease expires any instance
may claim the job and resume it from its stage. What operators only read lives apart,
in ``daemon.jobs.views``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import (
    Select,
    Update,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row
from sqlalchemy.exc import NoResultFound
from sqlalchemy.sql.dml import ReturningInsert
from sqlalchemy.sql.elements import ColumnElement

from daemon.errors import BudgetReached, LeaseLost
from daemon.jobs.database import Database
from daemon.jobs.model import (
    FINAL_STAGES,
    JOB_FIELDS,
    JOB_ORDER,
    STAGES,
    STATUSES,
    Claim,
    Entry,
    Instance,
    Job,
    NameClaims,
    NewJob,
    RemoteRecord,
    Stage,
    Status,
    check_transition,
    resume_point,
    status_of,
)
from daemon.jobs.tables import (
    durations_table,
    instances_table,
    jobs_table,
    locks_table,
    remote_jobs_table,
    unfinished,
    usage_table,
    waiting_table,
)

_STATUS_AT, _STAGE_AT = JOB_ORDER.index("status"), JOB_ORDER.index("stage")
_TABLE_ORDER = tuple(column.name for column in jobs_table.columns)


def job_from_row(row: Row[Any]) -> Job:
    """A Job from a result row of ``jobs_table`` (by position when it is the whole
    table in order, four times faster than by name)."""
    if row._fields == _TABLE_ORDER and _TABLE_ORDER == JOB_ORDER:
        values = list(row)
        values[_STATUS_AT] = STATUSES[values[_STATUS_AT]]
        values[_STAGE_AT] = STAGES[values[_STAGE_AT]]
        return Job(*values)
    return Job.from_mapping(dict(row._mapping))


@functools.lru_cache(maxsize=128)
def _advance_statement(columns: frozenset[str], returning: bool, guarded: bool) -> Update:
    """The UPDATE of one job's ``columns``, built once per set of columns.

    SQLAlchemy caches compiled SQL, but still derives a cache key from every new
    statement object; reusing one object per shape skips that (half an advance's cost).
    ``guarded``: only while the job is still held by ``owner`` (a lease taken over by
    another instance changes nothing).
    """
    values: dict[str, Any] = {name: bindparam(f"new_{name}") for name in sorted(columns)}
    statement = update(jobs_table).where(jobs_table.c.id == bindparam("job_id")).values(values)
    if guarded:
        statement = statement.where(jobs_table.c.owner == bindparam("holder"))
    return statement.returning(jobs_table) if returning else statement


_VERSION_KEY = ("path", "size", "mtime_ns", "inode")


def _insert_once(dialect: str) -> ReturningInsert[Any]:
    """INSERT of a job that does nothing when its input version is already there (another
    instance's intake won): ``ON CONFLICT DO NOTHING``, which both back ends speak."""
    if dialect == "postgresql":
        pg = postgresql.insert(jobs_table).on_conflict_do_nothing(index_elements=_VERSION_KEY)
        return pg.returning(jobs_table)
    lite = sqlite.insert(jobs_table).on_conflict_do_nothing(index_elements=_VERSION_KEY)
    return lite.returning(jobs_table)


def _claimable() -> ColumnElement[bool]:
    # Not held, held by an instance whose lease expired, or held by this instance (from
    # before a restart; its running jobs are excluded by id).
    return or_(
        jobs_table.c.lease_until.is_(None),
        jobs_table.c.lease_until < bindparam("now"),
        jobs_table.c.owner == bindparam("me"),
    )


_OUTPUTS_TAKEN = select(jobs_table.c.output).where(
    jobs_table.c.output.in_(bindparam("candidates", expanding=True)),
    jobs_table.c.path != bindparam("path"),
)
_CLAIM = (
    select(jobs_table.c.id, jobs_table.c.owner, jobs_table.c.lease_until)
    .where(
        unfinished(),
        or_(
            jobs_table.c.next_attempt_at.is_(None),
            jobs_table.c.next_attempt_at <= bindparam("now"),
        ),
        _claimable(),
        jobs_table.c.id.not_in(bindparam("exclude", expanding=True)),
    )
    .order_by(jobs_table.c.id)
    .limit(bindparam("limit"))
    .with_for_update(skip_locked=True)  # SQLite: nothing; its write lock is held anyway
)
# Jobs whose next step pays for no new conversion: converting at the hub or past it, or
# one whose creation may have been sent (adopted, not paid again) unless it already
# waits for the page budget. What runs while the page budget holds new conversions.
_NO_NEW_CONVERSION = or_(
    jobs_table.c.stage.in_(
        [s.value for s in (Stage.SUBMITTED, Stage.DOWNLOADING, Stage.DOWNLOADED, Stage.PUBLISHED)]
    ),
    and_(
        jobs_table.c.stage == Stage.SUBMITTING.value,
        or_(jobs_table.c.error_code.is_(None), jobs_table.c.error_code != BudgetReached.code),
    ),
)
_CLAIM_PAID = _CLAIM.where(_NO_NEW_CONVERSION)
_TAKE = (
    update(jobs_table)
    .where(jobs_table.c.id.in_(bindparam("ids", expanding=True)), _claimable())
    .values(owner=bindparam("me"), lease_until=bindparam("until"))
    .returning(jobs_table)
)
_NEXT_DUE = select(
    func.min(jobs_table.c.next_attempt_at),
    # Another instance's lease: when it expires, its job may be ours to take over.
    func.min(
        case(
            (jobs_table.c.owner != bindparam("me"), jobs_table.c.lease_until),
            else_=None,
        )
    ),
).where(unfinished())
_NEXT_DUE_PAID = _NEXT_DUE.where(_NO_NEW_CONVERSION)
_LOCK_INTAKE = select(locks_table.c.name).where(locks_table.c.name == "intake").with_for_update()
_NAME_CLAIMS = (
    select(
        jobs_table.c.path,
        jobs_table.c.size,
        jobs_table.c.mtime_ns,
        jobs_table.c.inode,
        jobs_table.c.output,
    )
    .where(
        or_(
            jobs_table.c.path.in_(bindparam("paths", expanding=True)),
            jobs_table.c.output.in_(bindparam("names", expanding=True)),
        )
    )
    .order_by(jobs_table.c.id.desc())
)


def _converted_before_query() -> Select[Any]:
    newer = jobs_table.alias("newer")
    superseded = (
        select(newer.c.id)
        .where(
            newer.c.output == jobs_table.c.output,
            newer.c.id > jobs_table.c.id,
            newer.c.id != bindparam("exclude_id"),
            newer.c.status != Status.FAILED.value,
        )
        .exists()
    )
    return (
        select(jobs_table, superseded.label("superseded"))
        .where(
            jobs_table.c.sha256 == bindparam("sha256"),
            jobs_table.c.engine == bindparam("engine"),
            jobs_table.c.language == bindparam("language"),
            jobs_table.c.output_format == bindparam("output_format"),
            # coalesce() keeps SQLite's planner off the status index: without it every
            # lookup scanned all completed rows (O(table) per upload) instead of the
            # few of one hash. status is never NULL, so the meaning is unchanged.
            func.coalesce(jobs_table.c.status, "") == Status.COMPLETED.value,
            jobs_table.c.output.is_not(None),
            jobs_table.c.id != bindparam("exclude_id"),
        )
        .order_by(jobs_table.c.id.desc())
        .limit(1)
    )


_CONVERTED_BEFORE = _converted_before_query()


def _new_row(
    new: NewJob, output: str, refused: tuple[str, str] | None, now: float
) -> dict[str, Any]:
    """The jobs row of a new input: queued, or failed at once when refused."""
    stage = Stage.PENDING if refused is None else Stage.FAILED
    code, message = refused if refused is not None else (None, None)
    return {
        **dataclasses.asdict(new),
        "output": output,
        "stage": stage.value,
        "status": status_of(stage).value,
        "attempts": 0,
        "submits": 0,
        "rearms": 0,
        "error_code": code,
        "error_message": message,
        "created_at": now,
        "updated_at": now,
        "finished_at": None if refused is None else now,
    }


def _gone(job_id: int, guarded: bool) -> Exception:
    if guarded:
        return LeaseLost(f"job {job_id} is held by another instance now")
    return NoResultFound(f"job {job_id} is no longer in the table")


class Store(Database):
    """The queue's statements over one state database."""

    def __init__(self, url: str, *, upgrade: bool = False) -> None:
        super().__init__(url, upgrade=upgrade)
        self._insert_job = _insert_once(self.dialect)

    # -- intake --------------------------------------------------------------------

    def lock_intake(self) -> None:
        """Hold intake's lock row until the transaction ends: output-name claims of
        several instances then happen one after the other."""
        with self.write() as conn:
            conn.execute(_LOCK_INTAKE).all()

    def add_jobs(self, entries: Sequence[Entry], now: float) -> dict[str, Job]:
        """Insert one job per (input, output name, refusal) in one statement: queued, or
        failed before anything was sent when refused as (code, message). Returns the new
        jobs by path; a version the table already has (another instance inserted it) is
        left out. The paths must differ."""
        rows = [_new_row(new, output, refused, now) for new, output, refused in entries]
        if not rows:
            return {}
        with self.write() as conn:
            inserted = conn.execute(self._insert_job, rows).all()
        return {job.path: job for job in map(job_from_row, inserted)}

    def outputs_taken(self, candidates: Sequence[str], except_path: str) -> set[str]:
        """Which of ``candidates`` another input's job already claims."""
        params = {"candidates": list(candidates), "path": except_path}
        with self.read() as conn:
            return {row.output for row in conn.execute(_OUTPUTS_TAKEN, params)}

    def name_claims(self, wanted: Sequence[tuple[str, Sequence[str]]]) -> list[NameClaims]:
        """What queueing each input needs to know, for a whole batch in one statement: per
        (path, candidate names), the version its newest job took, the output names its
        jobs claimed, and which candidates the jobs of other inputs claim."""
        params = {
            "paths": [path for path, _ in wanted],
            "names": sorted({name for _, names in wanted for name in names}),
        }
        newest: dict[str, tuple[int, int, int]] = {}
        mine: dict[str, set[str]] = {}
        claimants: dict[str, set[str]] = {}  # output name -> paths whose jobs claim it
        with self.read() as conn:
            for row in conn.execute(_NAME_CLAIMS, params):  # newest first
                newest.setdefault(row.path, (row.size, row.mtime_ns, row.inode))
                if row.output is not None:
                    mine.setdefault(row.path, set()).add(row.output)
                    claimants.setdefault(row.output, set()).add(row.path)
        return [
            NameClaims(
                newest.get(path),
                frozenset(mine.get(path, ())),
                frozenset(name for name in names if claimants.get(name, {path}) - {path}),
            )
            for path, names in wanted
        ]

    def versions(self) -> dict[str, tuple[int, int, int]]:
        """Latest (size, mtime_ns, inode) per input path: the versions intake already took."""
        latest = (
            select(func.max(jobs_table.c.id).label("id")).group_by(jobs_table.c.path).subquery()
        )
        columns = (jobs_table.c.path, jobs_table.c.size, jobs_table.c.mtime_ns, jobs_table.c.inode)
        query = select(*columns).join(latest, jobs_table.c.id == latest.c.id)
        with self.read() as conn:
            return {r.path: (r.size, r.mtime_ns, r.inode) for r in conn.execute(query)}

    def converted_before(
        self, sha256: str, engine: str, language: str, output_format: str, exclude_id: int
    ) -> tuple[Job, bool] | None:
        """The newest completed job of the same content and settings, and whether its
        output name still holds its output (no newer job of that path claims the name)."""
        params: dict[str, Any] = {"sha256": sha256, "engine": engine, "language": language}
        params |= {"output_format": output_format, "exclude_id": exclude_id}
        with self.read() as conn:
            row = conn.execute(_CONVERTED_BEFORE, params).first()
        if row is None:
            return None
        data = dict(row._mapping)
        current = not data.pop("superseded")
        return Job.from_mapping(data), current

    def note_waiting(self, path: str, code: str, reason: str, since: float, now: float) -> None:
        """Record (or update) an input that intake waits on for too long."""
        with self.write() as conn:
            conn.execute(delete(waiting_table).where(waiting_table.c.path == path))
            conn.execute(
                insert(waiting_table).values(
                    path=path, code=code, reason=reason, since=since, noted_at=now
                )
            )

    def clear_waiting(self, paths: Iterable[str] | None = None) -> None:
        """Forget waiting inputs (all of them when ``paths`` is None)."""
        query = delete(waiting_table)
        if paths is not None:
            query = query.where(waiting_table.c.path.in_(list(paths)))
        with self.write() as conn:
            conn.execute(query)

    def record_hook_error(self, job_id: int, message: str) -> None:
        """Remember that a job's hook failed (the job itself is not affected)."""
        with self.write() as conn:
            conn.execute(
                update(jobs_table).where(jobs_table.c.id == job_id).values(hook_error=message)
            )

    # -- worker ----------------------------------------------------------------------

    def claim(
        self,
        now: float,
        limit: int,
        exclude: Iterable[int],
        owner: str,
        lease: float,
        *,
        new_work: bool = True,
    ) -> list[Claim]:
        """Claim up to ``limit`` due jobs for ``owner`` until ``now + lease``, oldest
        first: those nobody holds, and those whose holder's lease expired (without
        ``new_work``, only those whose next step pays for no new conversion)."""
        params = {"now": now, "exclude": list(exclude), "limit": limit, "me": owner}
        due = _CLAIM if new_work else _CLAIM_PAID
        with self.write() as conn:
            before = {row.id: (row.owner, row.lease_until) for row in conn.execute(due, params)}
            if not before:
                return []
            taken = conn.execute(_TAKE, {**params, "ids": list(before), "until": now + lease})
            jobs = sorted((job_from_row(row) for row in taken), key=lambda job: job.id)
        return [Claim(job, *before[job.id]) for job in jobs]

    def renew(
        self, owner: str, job_ids: Sequence[int], until: float, now: float | None = None
    ) -> set[int]:
        """Extend ``owner``'s leases of ``job_ids`` (and, with ``now``, note that it is
        alive); return the ids it no longer holds (taken over, or withdrawn)."""
        with self.write() as conn:
            if now is not None:
                seen = update(instances_table).where(instances_table.c.id == owner)
                conn.execute(seen.values(seen_at=now))
            if not job_ids:
                return set()
            held = jobs_table.c.id.in_(list(job_ids)), jobs_table.c.owner == owner
            conn.execute(update(jobs_table).where(*held, unfinished()).values(lease_until=until))
            still = conn.execute(select(jobs_table.c.id).where(*held)).scalars().all()
        return set(job_ids) - set(still)

    def release(self, owner: str, now: float | None = None) -> int:
        """Give up every lease of ``owner`` (a clean stop): others may take its jobs now.
        With ``now``, also note that the instance stopped then (its id is free)."""
        query = (
            update(jobs_table)
            .where(jobs_table.c.owner == owner, jobs_table.c.lease_until.is_not(None))
            .values(lease_until=None)
        )
        stopped = update(instances_table).where(instances_table.c.id == owner)
        with self.write() as conn:
            released = int(conn.execute(query).rowcount)
            if now is not None:
                conn.execute(stopped.values(stopped_at=now))
        return released

    def next_due(self, owner: str = "", *, new_work: bool = True) -> float | None:
        """When a job may next become runnable for ``owner``: the earliest
        ``next_attempt_at`` of a deferred job, or another instance's lease expiry
        (without ``new_work``, of the jobs ``claim`` would then take)."""
        with self.read() as conn:
            row = conn.execute(_NEXT_DUE if new_work else _NEXT_DUE_PAID, {"me": owner}).one()
        found = [float(value) for value in row if value is not None]
        return min(found) if found else None

    def advance(
        self,
        job_id: int,
        stage: Stage,
        now: float,
        *,
        current: Job | None = None,
        owner: str | None = None,
        **changes: Any,
    ) -> Job:
        """Move a job to ``stage`` and record ``changes`` (remote ids, errors...).

        A caller that holds the row as it stands (``current``, as the worker does) gets
        the new row built from it instead of read back, which halves the cost, and the
        transition is checked against the model. With ``owner``, nothing changes unless
        that instance still holds the job (LeaseLost).
        """
        unknown = set(changes) - JOB_FIELDS
        if unknown:
            raise ValueError(f"unknown job fields: {sorted(unknown)}")
        if current is not None:
            check_transition(current.stage, stage)
        values: dict[str, Any] = {
            **changes,
            "stage": stage.value,
            "status": status_of(stage).value,
            "updated_at": now,
        }
        if stage in FINAL_STAGES:
            values.setdefault("finished_at", now)
            values.setdefault("next_attempt_at", None)
        guarded = owner is not None
        statement = _advance_statement(frozenset(values), current is None, guarded)
        params = {f"new_{name}": value for name, value in values.items()}
        params |= {"job_id": job_id, "holder": owner} if guarded else {"job_id": job_id}
        with self.write() as conn:
            result = conn.execute(statement, params)
            if current is None:
                row = result.first()
                if row is None:
                    raise _gone(job_id, guarded)
                return job_from_row(row)
        if result.rowcount != 1:
            raise _gone(job_id, guarded)
        values |= {"stage": stage, "status": status_of(stage)}
        return dataclasses.replace(current, **values)

    def withdraw(self, job_id: int, owner: str) -> None:
        """Delete a job that ``owner`` still holds (LeaseLost when it does not)."""
        query = delete(jobs_table).where(jobs_table.c.id == job_id, jobs_table.c.owner == owner)
        with self.write() as conn:
            if conn.execute(query).rowcount != 1:
                raise _gone(job_id, guarded=True)

    def unfinished_count(self) -> int:
        """How many jobs are not finished (their input may still need handling)."""
        query = select(func.count()).where(unfinished())
        with self.read() as conn:
            return int(conn.execute(query).scalar() or 0)

    def get(self, job_id: int) -> Job | None:
        """One job by id."""
        with self.read() as conn:
            row = conn.execute(select(jobs_table).where(jobs_table.c.id == job_id)).first()
        return job_from_row(row) if row is not None else None

    # -- what the hub holds ------------------------------------------------------------

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

    # -- instances -------------------------------------------------------------------

    def instance(self, instance_id: str) -> Instance | None:
        """The row of one instance."""
        query = select(instances_table).where(instances_table.c.id == instance_id)
        with self.read() as conn:
            row = conn.execute(query).first()
        return Instance(**dict(row._mapping)) if row is not None else None

    def register_instance(self, instance_id: str, host: str, pid: int, now: float) -> None:
        """Record that this instance started (or restarted)."""
        with self.write() as conn:
            conn.execute(delete(instances_table).where(instances_table.c.id == instance_id))
            conn.execute(
                insert(instances_table).values(
                    id=instance_id, host=host, pid=pid, started_at=now, seen_at=now
                )
            )

    # -- operator's writes -------------------------------------------------------------

    def delete(self, job_ids: Sequence[int]) -> int:
        """Delete jobs by id (``purge``); their usage stays, no longer tied to a job."""
        if not job_ids:
            return 0
        ids = list(job_ids)
        with self.write() as conn:
            conn.execute(
                update(usage_table).where(usage_table.c.job_id.in_(ids)).values(job_id=None)
            )
            conn.execute(delete(remote_jobs_table).where(remote_jobs_table.c.job_id.in_(ids)))
            result = conn.execute(delete(jobs_table).where(jobs_table.c.id.in_(ids)))
            return int(result.rowcount)

    def requeue(
        self,
        job_ids: Iterable[int],
        now: float,
        *,
        output_kept: Callable[[Job], bool] = lambda job: False,
        rearm: bool = False,
    ) -> list[Job]:
        """Put failed jobs back in the queue, each resuming from the furthest point the hub
        (or a kept output) still holds: nothing paid for is paid for again. ``rearm``
        counts it as an automatic re-arm rather than a person's retry."""
        requeued: list[Job] = []
        for job_id in job_ids:
            job = self.get(job_id)
            if job is None or job.status is not Status.FAILED:
                continue
            records = self.remote_records(job.id)
            stage, changes = resume_point(job, records, now, output_kept=output_kept(job))
            if not rearm:
                changes["submits"] = 0  # a person's retry allows new conversions again
            requeued.append(
                self.advance(
                    job.id,
                    stage,
                    now,
                    attempts=0,
                    error_code=None,
                    error_message=None,
                    finished_at=None,
                    next_attempt_at=None,
                    rearms=job.rearms + 1 if rearm else job.rearms,
                    **changes,
                )
            )
        return requeued

    def rearm_due(
        self,
        now: float,
        older_than: float,
        codes: Iterable[str],
        limit: int,
        output_kept: Callable[[Job], bool] = lambda job: False,
    ) -> list[Job]:
        """Re-queue failed jobs of a cause that may pass once they have cooled down."""
        query = select(jobs_table.c.id).where(
            jobs_table.c.status == Status.FAILED.value,
            jobs_table.c.error_code.in_(list(codes)),
            jobs_table.c.finished_at <= now - older_than,
            jobs_table.c.rearms < limit,
        )
        with self.read() as conn:
            ids = [row.id for row in conn.execute(query)]
        return self.requeue(ids, now, output_kept=output_kept, rearm=True)
