"""State store: the jobs table, the single source of truth and the queue.

SQLAlchemy Core over SQLite (WAL, ``synchronous=FULL``, busy timeout, ``BEGIN
IMMEDIATE``) by default, or PostgreSQL (psycopg 3) when several instances share one
database; nothing SQLite-specific is used outside engine setup, so the same code runs on
both. Every method is one short transaction. A daemon calls them from a single thread
(its writer), which keeps SQLite to one writer.

Several instances: a job is worked on only by the instance that claimed it. A claim
locks the due rows (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite's write lock does
the same for its one writer) and writes ``owner`` and a lease expiry; the holder renews
the lease while it works, every change it makes is conditional on still being the owner,
and once a lease expires any instance may claim the job and resume it from its stage.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    Select,
    String,
    Table,
    Text,
    Update,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import DatabaseError, NoResultFound
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql.dml import ReturningInsert
from sqlalchemy.sql.elements import ColumnElement

from daemon.errors import ConfigError, LeaseLost
from daemon.jobs import schema


class Status(enum.StrEnum):
    """Public job status, as shown by ``status`` and ``jobs``."""

    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


class Stage(enum.StrEnum):
    """How far a job got; finer than ``Status`` and what a restart resumes from."""

    PENDING = "pending"  # taken from the inbox, nothing sent yet
    UPLOADING = "uploading"  # upload may have reached the hub
    UPLOADED = "uploaded"  # remote_file_id known
    SUBMITTING = "submitting"  # a remote job may exist for remote_file_id
    SUBMITTED = "submitted"  # remote_job_id known; converting at the hub
    DOWNLOADING = "downloading"  # output_file_id known
    PUBLISHED = "published"  # output in place; the input is still to be handled
    DONE = "done"
    FAILED = "failed"


_STATUS_OF_STAGE = {
    Stage.PENDING: Status.QUEUED,
    Stage.PUBLISHED: Status.COMPLETED,
    Stage.DONE: Status.COMPLETED,
    Stage.FAILED: Status.FAILED,
}


def status_of(stage: Stage) -> Status:
    """The public status a stage shows as."""
    return _STATUS_OF_STAGE.get(stage, Status.PROCESSING)


FINAL_STAGES = frozenset({Stage.DONE, Stage.FAILED})

metadata = MetaData()

jobs_table = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("path", Text, nullable=False, index=True),
    Column("size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("inode", BigInteger, nullable=False),
    Column("input_format", String(8)),
    Column("sha256", String(64), index=True),  # duplicate lookups (on_duplicate)
    Column("status", String(16), nullable=False, index=True),
    Column("stage", String(16), nullable=False, index=True),  # the unfinished few
    Column("engine", String(100), nullable=False),
    Column("language", String(40), nullable=False),
    Column("output_format", String(8), nullable=False),
    Column("on_success", String(16)),
    Column("rule", Text),
    Column("hook_error", Text),
    Column("output", Text, index=True),  # output name claims
    Column("remote_file_id", String(64)),
    Column("remote_job_id", String(64)),
    Column("output_file_id", String(64)),
    Column("attempts", Integer, nullable=False, default=0),
    Column("submits", Integer, nullable=False, default=0),
    Column("rearms", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float),
    Column("error_code", String(64)),
    Column("error_message", Text),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("finished_at", Float),
    # Which instance holds the job (or last held it), and until when: a claim is a lease
    # that the holder renews; once it expires another instance takes the job over.
    Column("owner", String(200), index=True),
    Column("lease_until", Float),
    # One row per version of an input: intake on several instances inserts it once.
    Index("uq_jobs_version", "path", "size", "mtime_ns", "inode", unique=True),
)

# Inputs intake has waited on for too long (an empty placeholder, an incomplete file):
# intake's own view, kept here so that ``status`` and ``explain`` can show it.
waiting_table = Table(
    "waiting",
    metadata,
    Column("path", Text, primary_key=True),
    Column("code", String(32), nullable=False),
    Column("reason", Text, nullable=False),
    Column("since", Float, nullable=False),
    Column("noted_at", Float, nullable=False),
)


# Rows locked to serialise intake's output-name claims across instances (one row,
# "intake"); SQLite's write lock does the same for a single instance.
locks_table = Table("locks", metadata, Column("name", String(32), primary_key=True))

# The instances sharing the database: who they are and when they were last alive.
instances_table = Table(
    "instances",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("seen_at", Float, nullable=False),
    # Set by a clean stop: the id is free at once, and status says "stopped", not "alive".
    Column("stopped_at", Float),
)

schema_version_table = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
)


@dataclass(frozen=True)
class Instance:
    """A daemon sharing the state database (a row of ``instances``)."""

    id: str
    host: str
    pid: int
    started_at: float
    seen_at: float
    stopped_at: float | None = None


@dataclass(frozen=True)
class Claim:
    """A job an instance just claimed, and who held it before (a takeover when that
    was another instance whose lease had expired)."""

    job: Job
    previous_owner: str | None
    previous_lease: float | None

    @property
    def taken_over(self) -> bool:
        """Whether the job came from another instance whose lease expired."""
        return (
            self.previous_owner is not None
            and self.previous_owner != self.job.owner
            and self.previous_lease is not None
        )


@dataclass(frozen=True)
class Waiting:
    """An input that intake still waits on, and why (a row of ``waiting``)."""

    path: str
    code: str
    reason: str
    since: float
    noted_at: float


UNFINISHED_STAGES = tuple(stage.value for stage in Stage if stage not in FINAL_STAGES)


def _unfinished() -> ColumnElement[bool]:
    # By stage, not status: a published job still has its input to handle. IN, not NOT IN,
    # so that the stage index finds the few unfinished rows among many finished ones.
    return jobs_table.c.stage.in_(UNFINISHED_STAGES)


@dataclass(frozen=True)
class Job:
    """One row of the jobs table."""

    id: int
    path: str
    size: int
    mtime_ns: int
    inode: int
    input_format: str | None
    sha256: str | None
    status: Status
    stage: Stage
    engine: str
    language: str
    output_format: str
    on_success: str | None
    rule: str | None
    hook_error: str | None
    output: str | None
    remote_file_id: str | None
    remote_job_id: str | None
    output_file_id: str | None
    attempts: int
    submits: int
    rearms: int
    next_attempt_at: float | None
    error_code: str | None
    error_message: str | None
    created_at: float
    updated_at: float
    finished_at: float | None
    owner: str | None = None
    lease_until: float | None = None

    @classmethod
    def from_row(cls, row: Row[Any]) -> Job:
        """Build a Job from a result row of ``jobs_table``."""
        if row._fields == _JOB_ORDER:  # the whole table, in order: by position (4x faster)
            values = list(row)
            values[_STATUS_AT] = _STATUSES[values[_STATUS_AT]]
            values[_STAGE_AT] = _STAGES[values[_STAGE_AT]]
            return cls(*values)
        data = dict(row._mapping)
        data["status"] = Status(data["status"])
        data["stage"] = Stage(data["stage"])
        return cls(**data)


_JOB_ORDER = tuple(f.name for f in fields(Job))
_JOB_FIELDS = frozenset(_JOB_ORDER)
_STATUS_AT, _STAGE_AT = _JOB_ORDER.index("status"), _JOB_ORDER.index("stage")
_STATUSES = {status.value: status for status in Status}
_STAGES = {stage.value: stage for stage in Stage}


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


# The daemon's frequent queries, built once (see _advance_statement); values are bound
# at execution.
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


_LATEST_FOR_PATH = (
    select(jobs_table)
    .where(jobs_table.c.path == bindparam("path"))
    .order_by(jobs_table.c.id.desc())
    .limit(1)
)
_OUTPUTS_TAKEN = select(jobs_table.c.output).where(
    jobs_table.c.output.in_(bindparam("candidates", expanding=True)),
    jobs_table.c.path != bindparam("path"),
)
_CLAIM = (
    select(jobs_table.c.id, jobs_table.c.owner, jobs_table.c.lease_until)
    .where(
        _unfinished(),
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
).where(_unfinished())
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


@dataclass(frozen=True)
class NameClaims:
    """What intake knows of an input's path before it claims an output name for it."""

    latest: tuple[int, int, int] | None  # (size, mtime_ns, inode) its newest job took
    mine: frozenset[str]  # output names its own jobs claimed
    taken: frozenset[str]  # the candidate names the jobs of other inputs claim


@dataclass(frozen=True)
class NewJob:
    """What intake knows about a stable input when it enters the queue."""

    path: str
    size: int
    mtime_ns: int
    inode: int
    input_format: str | None
    engine: str
    language: str
    output_format: str
    on_success: str | None = None
    rule: str | None = None


Entry = tuple[NewJob, str, tuple[str, str] | None]  # (input, output name, refusal)


def _new_row(
    new: NewJob, output: str, refused: tuple[str, str] | None, now: float
) -> dict[str, Any]:
    """The jobs row of a new input: queued, or failed at once when refused."""
    stage = Stage.PENDING if refused is None else Stage.FAILED
    code, message = refused if refused is not None else (None, None)
    return {
        **new.__dict__,
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


def _sqlite_pragmas(dbapi_conn: Any, _record: ConnectionPoolEntry) -> None:
    # Durable commits (FULL), concurrent readers (WAL), waits instead of "database is locked".
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see _sqlite_begin)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    # A deferred transaction that upgrades to a write fails at once with SQLITE_BUSY in
    # WAL mode, whatever the busy timeout; BEGIN IMMEDIATE takes the write lock up front.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """Create the SQLAlchemy engine, with SQLite's durability settings when it is SQLite."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": 10, "check_same_thread": False})
    event.listen(engine, "connect", _sqlite_pragmas)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


class StateDamaged(ConfigError):
    """The SQLite state file is not a database, or a damaged one."""


def damaged_message(where: str, detail: str) -> str:
    """What to tell a person whose state database is damaged."""
    # Deleting it would look like the fix, but the table is what remembers every kept
    # input: without it they are all converted, and paid for, again.
    return (
        f"the state database {where} is damaged ({detail}); restore it from a backup, or "
        f"try `sqlite3 {where} .recover`; deleting it would make the daemon convert "
        "(and pay for) every input still in the inbox again"
    )


def _is_damage(exc: DatabaseError) -> bool:
    # SQLITE_NOTADB and SQLITE_CORRUPT; OperationalError (locked, unreachable, read-only)
    # may pass, and is left as it is.
    orig = exc.orig
    return isinstance(orig, sqlite3.DatabaseError) and not isinstance(
        orig, sqlite3.OperationalError
    )


class Store:
    """The jobs table and the queries the daemon and the CLI need."""

    def __init__(self, url: str, *, upgrade: bool = False) -> None:
        """Open the database at ``url``; an empty one gets the schema, an older one is
        upgraded when ``upgrade`` (else SchemaMismatch, as for a newer one)."""
        self.engine = make_engine(url)
        self._local = threading.local()  # the open batch of the thread committing it, if any
        try:
            schema.ensure(self.engine, upgrade_older=upgrade)
        except DatabaseError as exc:
            self.engine.dispose()
            if not _is_damage(exc):
                raise
            where = url.removeprefix("sqlite:///")
            raise StateDamaged(damaged_message(where, str(exc.orig))) from None
        except BaseException:
            self.engine.dispose()
            raise
        self._insert_job = _insert_once(self.engine.dialect.name)

    def close(self) -> None:
        """Release every connection."""
        self.engine.dispose()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Run the calls made inside in one transaction, committed once at the end.

        Used by the single writer to commit many small changes with one fsync.
        """
        with self.engine.begin() as conn:
            self._local.conn = conn
            try:
                yield
            finally:
                self._local.conn = None

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        batched: Connection | None = getattr(self._local, "conn", None)
        if batched is not None:
            yield batched
            return
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        batched: Connection | None = getattr(self._local, "conn", None)
        if batched is not None:
            yield batched
            return
        with self.engine.connect() as conn:
            yield conn

    def integrity_ok(self) -> bool:
        """Run SQLite's quick check (always true on other databases)."""
        if self.engine.dialect.name != "sqlite":
            return True
        with self.engine.connect() as conn:
            return conn.execute(text("PRAGMA quick_check")).scalar() == "ok"

    # -- intake --------------------------------------------------------------------

    def fingerprints(self) -> dict[str, tuple[int, int]]:
        """Latest (size, mtime_ns) per input path: what intake already knows."""
        latest = (
            select(func.max(jobs_table.c.id).label("id")).group_by(jobs_table.c.path).subquery()
        )
        query = select(jobs_table.c.path, jobs_table.c.size, jobs_table.c.mtime_ns).join(
            latest, jobs_table.c.id == latest.c.id
        )
        with self._read() as conn:
            return {row.path: (row.size, row.mtime_ns) for row in conn.execute(query)}

    def lock_intake(self) -> None:
        """Hold intake's lock row until the transaction ends: output-name claims of
        several instances then happen one after the other."""
        with self._write() as conn:
            conn.execute(_LOCK_INTAKE).all()

    def enqueue(self, new: NewJob, output: str, now: float) -> Job | None:
        """Insert a queued job whose output name is ``output`` (None: the table already
        has this version of the input, inserted by another instance)."""
        return self.add_jobs([(new, output, None)], now).get(new.path)

    def reject(self, new: NewJob, output: str, code: str, message: str, now: float) -> Job | None:
        """Insert a job that failed before anything was sent (bad input)."""
        return self.add_jobs([(new, output, (code, message))], now).get(new.path)

    def add_jobs(self, entries: Sequence[Entry], now: float) -> dict[str, Job]:
        """Insert one job per (input, output name, refusal) in one statement: queued, or
        failed before anything was sent when refused as (code, message). Returns the new
        jobs by path; a version the table already has (another instance inserted it) is
        left out. The paths must differ."""
        rows = [_new_row(new, output, refused, now) for new, output, refused in entries]
        if not rows:
            return {}
        with self._write() as conn:
            inserted = conn.execute(self._insert_job, rows).all()
        return {job.path: job for job in map(Job.from_row, inserted)}

    def outputs_taken(self, candidates: Sequence[str], except_path: str) -> set[str]:
        """Which of ``candidates`` another input's job already claims."""
        params = {"candidates": list(candidates), "path": except_path}
        with self._read() as conn:
            return {row.output for row in conn.execute(_OUTPUTS_TAKEN, params)}

    def record_hook_error(self, job_id: int, message: str) -> None:
        """Remember that a job's hook failed (the job itself is not affected)."""
        with self._write() as conn:
            conn.execute(
                update(jobs_table).where(jobs_table.c.id == job_id).values(hook_error=message)
            )

    def hook_failures(self, limit: int) -> list[Job]:
        """Jobs whose hook failed, newest first."""
        query = (
            select(jobs_table)
            .where(jobs_table.c.hook_error.is_not(None))
            .order_by(jobs_table.c.id.desc())
            .limit(limit)
        )
        with self._read() as conn:
            return [Job.from_row(r) for r in conn.execute(query)]

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
        with self._read() as conn:
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
        with self._read() as conn:
            return {r.path: (r.size, r.mtime_ns, r.inode) for r in conn.execute(query)}

    def converted_before(
        self, sha256: str, engine: str, language: str, output_format: str, exclude_id: int
    ) -> tuple[Job, bool] | None:
        """The newest completed job of the same content and settings, and whether its
        output name still holds its output (no newer job of that path claims the name)."""
        params: dict[str, Any] = {"sha256": sha256, "engine": engine, "language": language}
        params |= {"output_format": output_format, "exclude_id": exclude_id}
        with self._read() as conn:
            row = conn.execute(_CONVERTED_BEFORE, params).first()
        if row is None:
            return None
        data = dict(row._mapping)
        current = not data.pop("superseded")
        data["status"], data["stage"] = Status(data["status"]), Stage(data["stage"])
        return Job(**data), current

    def note_waiting(self, path: str, code: str, reason: str, since: float, now: float) -> None:
        """Record (or update) an input that intake waits on for too long."""
        with self._write() as conn:
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
        with self._write() as conn:
            conn.execute(query)

    def waiting(self, path: str | None = None) -> list[Waiting]:
        """Inputs intake waits on for too long, longest first (or the one of ``path``)."""
        query = select(waiting_table).order_by(waiting_table.c.since)
        if path is not None:
            query = query.where(waiting_table.c.path == path)
        with self._read() as conn:
            return [Waiting(**dict(r._mapping)) for r in conn.execute(query)]

    # -- worker ----------------------------------------------------------------------

    def claim(
        self, now: float, limit: int, exclude: Iterable[int], owner: str, lease: float
    ) -> list[Claim]:
        """Claim up to ``limit`` due jobs for ``owner`` until ``now + lease``, oldest
        first: those nobody holds, and those whose holder's lease expired."""
        params = {"now": now, "exclude": list(exclude), "limit": limit, "me": owner}
        with self._write() as conn:
            before = {row.id: (row.owner, row.lease_until) for row in conn.execute(_CLAIM, params)}
            if not before:
                return []
            taken = conn.execute(_TAKE, {**params, "ids": list(before), "until": now + lease})
            jobs = sorted((Job.from_row(row) for row in taken), key=lambda job: job.id)
        return [Claim(job, *before[job.id]) for job in jobs]

    def renew(self, owner: str, job_ids: Sequence[int], until: float, now: float) -> set[int]:
        """Extend ``owner``'s leases of ``job_ids`` and note that it is alive; return
        the ids it no longer holds (taken over by another instance, or withdrawn)."""
        seen = update(instances_table).where(instances_table.c.id == owner).values(seen_at=now)
        with self._write() as conn:
            conn.execute(seen)
            if not job_ids:
                return set()
            held = jobs_table.c.id.in_(list(job_ids)), jobs_table.c.owner == owner
            conn.execute(update(jobs_table).where(*held, _unfinished()).values(lease_until=until))
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
        with self._write() as conn:
            released = int(conn.execute(query).rowcount)
            if now is not None:
                conn.execute(stopped.values(stopped_at=now))
        return released

    def next_due(self, owner: str = "") -> float | None:
        """When a job may next become runnable for ``owner``: the earliest
        ``next_attempt_at`` of a deferred job, or another instance's lease expiry."""
        with self._read() as conn:
            row = conn.execute(_NEXT_DUE, {"me": owner}).one()
        found = [float(value) for value in row if value is not None]
        return min(found) if found else None

    def held(self, now: float) -> dict[str, int]:
        """Unfinished jobs per instance whose lease is current."""
        query = (
            select(jobs_table.c.owner, func.count())
            .where(_unfinished(), jobs_table.c.lease_until >= now)
            .group_by(jobs_table.c.owner)
        )
        with self._read() as conn:
            return {str(owner): int(count) for owner, count in conn.execute(query)}

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
        the new row built from it instead of read back, which halves the cost. With
        ``owner``, nothing changes unless that instance still holds the job (LeaseLost).
        """
        unknown = set(changes) - _JOB_FIELDS
        if unknown:
            raise ValueError(f"unknown job fields: {sorted(unknown)}")
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
        with self._write() as conn:
            result = conn.execute(statement, params)
            if current is None:
                row = result.first()
                if row is None:
                    raise self._gone(job_id, guarded)
                return Job.from_row(row)
        if result.rowcount != 1:
            raise self._gone(job_id, guarded)
        values |= {"stage": stage, "status": status_of(stage)}
        return dataclasses.replace(current, **values)

    @staticmethod
    def _gone(job_id: int, guarded: bool) -> Exception:
        if guarded:
            return LeaseLost(f"job {job_id} is held by another instance now")
        return NoResultFound(f"job {job_id} is no longer in the table")

    def unfinished_count(self) -> int:
        """How many jobs are not finished (their input may still need handling)."""
        query = select(func.count()).where(_unfinished())
        with self._read() as conn:
            return int(conn.execute(query).scalar() or 0)

    # -- instances -------------------------------------------------------------------

    def instance(self, instance_id: str) -> Instance | None:
        """The row of one instance."""
        query = select(instances_table).where(instances_table.c.id == instance_id)
        with self._read() as conn:
            row = conn.execute(query).first()
        return Instance(**dict(row._mapping)) if row is not None else None

    def instances(self) -> list[Instance]:
        """Every instance that ever used the database, the most recently seen first."""
        query = select(instances_table).order_by(instances_table.c.seen_at.desc())
        with self._read() as conn:
            return [Instance(**dict(row._mapping)) for row in conn.execute(query)]

    def register_instance(self, instance_id: str, host: str, pid: int, now: float) -> None:
        """Record that this instance started (or restarted)."""
        with self._write() as conn:
            conn.execute(delete(instances_table).where(instances_table.c.id == instance_id))
            conn.execute(
                insert(instances_table).values(
                    id=instance_id, host=host, pid=pid, started_at=now, seen_at=now
                )
            )

    # -- operator views ------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Number of jobs per public status (every status present, zero included)."""
        query = select(jobs_table.c.status, func.count()).group_by(jobs_table.c.status)
        counts = {status.value: 0 for status in Status}
        with self._read() as conn:
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
        with self._read() as conn:
            return [Job.from_row(r) for r in conn.execute(query)]

    def get(self, job_id: int) -> Job | None:
        """One job by id."""
        with self._read() as conn:
            row = conn.execute(select(jobs_table).where(jobs_table.c.id == job_id)).first()
        return Job.from_row(row) if row is not None else None

    def latest_for_path(self, path: str) -> Job | None:
        """The newest job for an input path."""
        with self._read() as conn:
            row = conn.execute(_LATEST_FOR_PATH, {"path": path}).first()
        return Job.from_row(row) if row is not None else None

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
        with self._read() as conn:
            return [Job.from_row(r) for r in conn.execute(query)]

    def oldest_unfinished(self) -> float | None:
        """When the oldest job that is still queued or processing was queued."""
        query = select(func.min(jobs_table.c.created_at)).where(_unfinished())
        with self._read() as conn:
            value = conn.execute(query).scalar()
        return float(value) if value is not None else None

    def counts_since(self, since: float) -> dict[str, int]:
        """Jobs per status among those unfinished or changed since ``since`` (one run's work)."""
        query = (
            select(jobs_table.c.status, func.count())
            .where(
                or_(
                    jobs_table.c.updated_at >= since,
                    _unfinished(),
                )
            )
            .group_by(jobs_table.c.status)
        )
        counts = {status.value: 0 for status in Status}
        with self._read() as conn:
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
        with self._read() as conn:
            return [(int(r[0]), str(r[1]), bool(r[2])) for r in conn.execute(query)]

    def delete(self, job_ids: Sequence[int]) -> int:
        """Delete jobs by id; return how many went."""
        if not job_ids:
            return 0
        with self._write() as conn:
            result = conn.execute(delete(jobs_table).where(jobs_table.c.id.in_(list(job_ids))))
            return int(result.rowcount)

    def withdraw(self, job_id: int, owner: str) -> None:
        """Delete a job that ``owner`` still holds (LeaseLost when it does not)."""
        query = delete(jobs_table).where(jobs_table.c.id == job_id, jobs_table.c.owner == owner)
        with self._write() as conn:
            if conn.execute(query).rowcount != 1:
                raise self._gone(job_id, guarded=True)

    def requeue(self, job_ids: Iterable[int], now: float) -> list[Job]:
        """Put failed jobs back in the queue, resuming from what the hub still has."""
        requeued: list[Job] = []
        for job_id in job_ids:
            job = self.get(job_id)
            if job is None or job.status is not Status.FAILED:
                continue
            requeued.append(self._rearm(job, now))
        return requeued

    def rearm_due(
        self, now: float, older_than: float, codes: Iterable[str], limit: int
    ) -> list[Job]:
        """Re-queue failed jobs of a transient cause once they have cooled down."""
        query = select(jobs_table.c.id).where(
            jobs_table.c.status == Status.FAILED.value,
            jobs_table.c.error_code.in_(list(codes)),
            jobs_table.c.finished_at <= now - older_than,
            jobs_table.c.rearms < limit,
        )
        with self._read() as conn:
            ids = [row.id for row in conn.execute(query)]
        rearmed = []
        for job_id in ids:
            job = self.get(job_id)
            if job is not None:
                rearmed.append(self._rearm(job, now, rearms=job.rearms + 1))
        return rearmed

    def _rearm(self, job: Job, now: float, **extra: Any) -> Job:
        # Start over from the input: the uploaded file may have expired at the hub, and
        # uploads are not billed, conversions are.
        return self.advance(
            job.id,
            Stage.PENDING,
            now,
            remote_file_id=None,
            remote_job_id=None,
            output_file_id=None,
            attempts=0,
            error_code=None,
            error_message=None,
            finished_at=None,
            next_attempt_at=None,
            submits=0,
            **extra,
        )
