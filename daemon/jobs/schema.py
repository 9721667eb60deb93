"""Schema versions and migrations of the state database, the same on SQLite and PostgreSQL.

The version is the one row of ``schema_version``. A database with a ``jobs`` table but no
version is one made before versions existed: version 1. Each migration is a function of
a connection written in portable SQLAlchemy (and SQL both back ends accept), and an
upgrade runs every missing step and the new version in one transaction, so a failed
upgrade leaves the database as it was. Checking costs one query at start.

Who upgrades: an empty database is created at once by whoever opens it; an older one is
upgraded by ``ldx-hotfolder db upgrade``, or by the daemon itself when it is an SQLite
file (one machine, one daemon). A shared PostgreSQL database is never changed behind the
other instances' backs: the daemon stops with a message instead. A database newer than
the code always stops it (exit 2): the program must be upgraded first.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    text,
)
from sqlalchemy.exc import DBAPIError

from daemon.errors import SchemaMismatch
from daemon.logs import get_logger

log = get_logger(component="schema")
Migration = Callable[[Connection], None]


def _v1_tables(meta: MetaData) -> None:
    """The schema as it was before versions existed (frozen; never edit)."""
    Table(
        "jobs",
        meta,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("path", Text, nullable=False, index=True),
        Column("size", BigInteger, nullable=False),
        Column("mtime_ns", BigInteger, nullable=False),
        Column("inode", BigInteger, nullable=False),
        Column("input_format", String(8)),
        Column("sha256", String(64), index=True),
        Column("status", String(16), nullable=False, index=True),
        Column("stage", String(16), nullable=False, index=True),
        Column("engine", String(100), nullable=False),
        Column("language", String(40), nullable=False),
        Column("output_format", String(8), nullable=False),
        Column("on_success", String(16)),
        Column("rule", Text),
        Column("hook_error", Text),
        Column("output", Text, index=True),
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
    )
    Table(
        "waiting",
        meta,
        Column("path", Text, primary_key=True),
        Column("code", String(32), nullable=False),
        Column("reason", Text, nullable=False),
        Column("since", Float, nullable=False),
        Column("noted_at", Float, nullable=False),
    )


def _to_v1(conn: Connection) -> None:
    meta = MetaData()
    _v1_tables(meta)
    meta.create_all(conn)


def _to_v2(conn: Connection) -> None:
    """Several instances: leases on jobs, one row per input version, intake's lock row,
    the instances table and the version table."""
    float_type = Float().compile(dialect=conn.dialect)
    conn.execute(text("ALTER TABLE jobs ADD COLUMN owner VARCHAR(200)"))
    conn.execute(text(f"ALTER TABLE jobs ADD COLUMN lease_until {float_type}"))
    conn.execute(text("CREATE INDEX ix_jobs_owner ON jobs (owner)"))
    # Before versions were unique, a path could show the same (size, mtime, inode) twice
    # (changed and changed back with its old mtime). Only the newest job of a path counts
    # as its version, so older twins get an inode that no file has (minus their id).
    conn.execute(
        text(
            "UPDATE jobs SET inode = -id WHERE EXISTS (SELECT 1 FROM jobs AS newer "
            "WHERE newer.path = jobs.path AND newer.size = jobs.size "
            "AND newer.mtime_ns = jobs.mtime_ns AND newer.inode = jobs.inode "
            "AND newer.id > jobs.id)"
        )
    )
    conn.execute(text("CREATE UNIQUE INDEX uq_jobs_version ON jobs (path, size, mtime_ns, inode)"))
    meta = MetaData()
    locks = Table("locks", meta, Column("name", String(32), primary_key=True))
    Table(
        "instances",
        meta,
        Column("id", String(200), primary_key=True),
        Column("host", String(255), nullable=False),
        Column("pid", Integer, nullable=False),
        Column("started_at", Float, nullable=False),
        Column("seen_at", Float, nullable=False),
        Column("stopped_at", Float),
    )
    Table(
        "schema_version",
        meta,
        Column("version", Integer, primary_key=True, autoincrement=False),
    )
    meta.create_all(conn)
    conn.execute(locks.insert().values(name="intake"))


def _to_v3(conn: Connection) -> None:
    """Pay once and count pages: what the hub holds for each job (every remote job, the
    upload's and the output's expiry), the pages counted at intake, the pages the hub
    billed, and the durations learned per engine."""
    float_type = Float().compile(dialect=conn.dialect)
    conn.execute(text("ALTER TABLE jobs ADD COLUMN pages INTEGER"))
    conn.execute(text(f"ALTER TABLE jobs ADD COLUMN upload_expires_at {float_type}"))
    conn.execute(text(f"ALTER TABLE jobs ADD COLUMN output_expires_at {float_type}"))
    meta = MetaData()
    Table(
        "remote_jobs",
        meta,
        Column("remote_job_id", String(64), primary_key=True),
        Column("job_id", Integer, nullable=False, index=True),
        Column("remote_file_id", String(64), nullable=False),
        Column("created_at", Float),
        Column("status", String(16), nullable=False),
        Column("output_file_id", String(64)),
        Column("expires_at", Float),
        Column("pages", Integer),
        Column("error_code", String(64)),
        Column("recorded_at", Float, nullable=False),
    )
    Table(
        "usage",
        meta,
        Column("remote_job_id", String(64), primary_key=True),
        Column("job_id", Integer),
        Column("path", Text, nullable=False),
        Column("folder", Text, nullable=False),
        Column("rule", Text),
        Column("pages", Integer, nullable=False),
        Column("outcome", String(16), nullable=False),
        Column("billed_at", Float, nullable=False, index=True),
    )
    Table(
        "durations",
        meta,
        Column("engine", String(100), primary_key=True),
        Column("per_page", Float, nullable=False),
        Column("base", Float, nullable=False),
        Column("samples", Integer, nullable=False),
        Column("updated_at", Float, nullable=False),
    )
    meta.create_all(conn)


# MIGRATIONS[n] brings a database from version n to n + 1.
MIGRATIONS: tuple[Migration, ...] = (_to_v1, _to_v2, _to_v3)
HEAD = len(MIGRATIONS)


def version_of(conn: Connection) -> int:
    """The schema version of the database (0 when it is empty)."""
    tables = set(inspect(conn).get_table_names())
    if "schema_version" in tables:
        found = conn.execute(text("SELECT max(version) FROM schema_version")).scalar()
        return int(found or 0)
    return 1 if "jobs" in tables else 0


def _set_version(conn: Connection, version: int) -> None:
    conn.execute(text("DELETE FROM schema_version"))
    conn.execute(text("INSERT INTO schema_version (version) VALUES (:v)"), {"v": version})


def upgrade(engine: Engine) -> tuple[int, int]:
    """Run the missing migrations in one transaction; return (before, after)."""
    with engine.begin() as conn:
        before = version_of(conn)
        if before > HEAD:
            raise _newer(before)
        for step in MIGRATIONS[before:]:
            step(conn)
        if before < HEAD:
            _set_version(conn, HEAD)
    if 0 < before < HEAD:  # creating an empty database is not news (and CLI output stays clean)
        log.info("state database upgraded", schema_from=before, schema_to=HEAD)
    return before, HEAD


def current(engine: Engine) -> int:
    """The schema version, read in a short transaction of its own."""
    with engine.connect() as conn:
        return version_of(conn)


def ensure(engine: Engine, *, upgrade_older: bool) -> int:
    """Make sure the schema is the code's: create an empty database, upgrade an older
    one when ``upgrade_older``, else raise SchemaMismatch with what to do."""
    found = current(engine)
    if found == HEAD:
        return found
    if found > HEAD:
        raise _newer(found)
    if found > 0 and not upgrade_older:
        raise SchemaMismatch(
            f"the state database has schema version {found}, older than this "
            f"ldx-hotfolder's ({HEAD}); run `ldx-hotfolder db upgrade` once (with every "
            "instance stopped or upgraded), then start again"
        )
    try:
        upgrade(engine)
    except DBAPIError:
        # Two instances creating an empty database at once: one wins, the other finds it.
        if current(engine) != HEAD:
            raise
    return HEAD


def _newer(found: int) -> SchemaMismatch:
    return SchemaMismatch(
        f"the state database has schema version {found}, newer than this ldx-hotfolder "
        f"knows ({HEAD}); upgrade ldx-hotfolder (on every instance) to a version that "
        "knows it"
    )
