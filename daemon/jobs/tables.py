"""The state database's tables as they are now, and how an engine connects to it.

SQLAlchemy Core over SQLite (WAL, ``synchronous=FULL``, busy timeout, ``BEGIN
IMMEDIATE``) by default, or PostgreSQL (psycopg 3) when several instances share one
database; nothing SQLite-specific is used outside ``make_engine``, so the same
statements run on both. ``daemon.jobs.schema`` brings an older database to this shape.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Connection
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql.elements import ColumnElement

from daemon.errors import ConfigError, StateMissing
from daemon.jobs.model import UNFINISHED_STAGES

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
    Column("pages", Integer),
    Column("upload_expires_at", Float),
    Column("output_expires_at", Float),
    # One row per version of an input: intake on several instances inserts it once.
    Index("uq_jobs_version", "path", "size", "mtime_ns", "inode", unique=True),
)

# Every remote job the hub made for a job (each one a paid conversion), as last seen:
# what a retry, a restart or a takeover resumes from instead of paying again.
remote_jobs_table = Table(
    "remote_jobs",
    metadata,
    Column("remote_job_id", String(64), primary_key=True),
    Column("job_id", Integer, nullable=False, index=True),
    Column("remote_file_id", String(64), nullable=False),
    Column("created_at", Float),  # the hub's clock
    Column("status", String(16), nullable=False),
    Column("output_file_id", String(64)),
    Column("expires_at", Float),  # the hub's clock
    Column("pages", Integer),
    Column("error_code", String(64)),
    Column("recorded_at", Float, nullable=False),
)

# What the hub billed: one row per remote job it reported usage for, kept when the jobs
# are purged (``ldx-hotfolder usage``).
usage_table = Table(
    "usage",
    metadata,
    Column("remote_job_id", String(64), primary_key=True),
    Column("job_id", Integer),  # None once the job was purged
    Column("path", Text, nullable=False),
    Column("folder", Text, nullable=False),  # the first folder below the inbox ("" at top)
    Column("rule", Text),
    Column("pages", Integer, nullable=False),
    Column("outcome", String(16), nullable=False),  # completed or failed
    Column("billed_at", Float, nullable=False, index=True),
)

# How long the hub's jobs take, learned as the daemon runs (per engine): the poll
# scheduler's estimate of when a job ends, kept across restarts.
durations_table = Table(
    "durations",
    metadata,
    Column("engine", String(100), primary_key=True),
    Column("per_page", Float, nullable=False),  # seconds per page
    Column("base", Float, nullable=False),  # seconds per job whatever its length
    Column("samples", Integer, nullable=False),
    Column("updated_at", Float, nullable=False),
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


def unfinished() -> ColumnElement[bool]:
    """Jobs not finished yet (by stage, not status: a published job still has its input
    to handle). IN, not NOT IN, so that the stage index finds the few among many."""
    return jobs_table.c.stage.in_(UNFINISHED_STAGES)


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


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    """The SQLAlchemy engine, with SQLite's durability settings when it is SQLite.

    ``read_only`` is for commands that only look (``status``, ``jobs``, ``explain``, ``db
    version``): an SQLite file is opened as it is, never created (a mistyped path is a
    ConfigError naming it, not a new empty database), and a PostgreSQL session refuses
    writes.
    """
    if not url.startswith("sqlite"):
        if read_only:
            options = {"options": "-c default_transaction_read_only=on"}
            return create_engine(url, pool_pre_ping=True, connect_args=options)
        return create_engine(url, pool_pre_ping=True)
    if read_only:
        path = url.removeprefix("sqlite:///")
        _check_exists(path)
        return create_engine("sqlite://", creator=lambda: connect_read_only(path))
    engine = create_engine(url, connect_args={"timeout": 10, "check_same_thread": False})
    event.listen(engine, "connect", _sqlite_pragmas)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _check_exists(path: str) -> None:
    if not os.path.lexists(path):
        raise StateMissing(
            f"the state database {path} does not exist: check state_db (no daemon has run "
            "with this configuration yet, or it points elsewhere)"
        )
    if not os.path.isfile(path):
        raise ConfigError(f"the state database {path} is not a file: check state_db")
    if not os.access(path, os.R_OK):
        raise ConfigError(
            f"the state database {path} is not readable by this user: run the command as "
            "the daemon's user (or as root)"
        )


def connect_read_only(path: str) -> sqlite3.Connection:
    """A connection that can only read ``path``.

    ``mode=ro`` sees what the running daemon committed, through its write-ahead log. In
    a folder this user may not write, SQLite cannot make the log's index files; then,
    when no log holds unmerged commits (the daemon stopped cleanly), the file alone is
    the whole truth and is opened ``immutable``; else a ConfigError says what to do.
    """
    uri = Path(path).absolute().as_uri()  # percent-encoded: a "?" or "#" in a name is no option
    conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=10, check_same_thread=False)
    try:
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
    wal = Path(f"{path}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise ConfigError(
            f"the state database {path} cannot be read here: the daemon's recent changes "
            "are in its write-ahead log, which this user may not open in a folder it "
            "cannot write; run the command as the daemon's user"
        )
    return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, check_same_thread=False)
