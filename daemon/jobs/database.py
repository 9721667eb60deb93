"""The state database: its engine, its schema check, and the transactions on it.

``Database`` opens the database at a URL (creating an empty one's schema, upgrading an
older SQLite file when asked), tells a damaged SQLite file from other failures, and
hands out connections: a write transaction, a read, or the batch the single writer
commits many calls in (``batch``). ``Store`` (the queue) and ``Views`` (what operators
read) build their statements over it.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DatabaseError, OperationalError

from daemon.errors import ConfigError, StateDamaged, StateMissing
from daemon.jobs import schema
from daemon.jobs.tables import make_engine


def damaged_message(where: str, detail: str) -> str:
    """What to tell a person whose state database is damaged."""
    # Deleting it would look like the fix, but the table is what remembers every kept
    # input: without it they are all converted, and paid for, again.
    return (
        f"the state database {where} is damaged ({detail}); restore it from a backup, or "
        f"try `sqlite3 {where} .recover`; deleting it would make the daemon convert "
        "(and pay for) every input still in the inbox again"
    )


def replaced_message(where: str) -> str:
    """What to tell a person whose state database was removed or replaced meanwhile."""
    return (
        f"the state database {where} was removed or replaced while the daemon ran; the "
        "daemon stopped rather than record work in a file nobody reads. Restore the file "
        "(from a backup) and start the daemon again; started on a new, empty database it "
        "adopts the outputs already in the outbox instead of converting their inputs again"
    )


def _is_damage(exc: DatabaseError) -> bool:
    # SQLITE_NOTADB and SQLITE_CORRUPT; OperationalError (locked, unreachable, read-only)
    # may pass, and is left as it is.
    orig = exc.orig
    return isinstance(orig, sqlite3.DatabaseError) and not isinstance(
        orig, sqlite3.OperationalError
    )


def _check_readable(engine: Engine, url: str) -> None:
    """Raise ConfigError unless ``engine`` holds a state database of this version."""
    try:
        found = schema.current(engine)
    except OperationalError as exc:
        where = url.removeprefix("sqlite:///")
        raise ConfigError(f"cannot read the state database {where}: {exc.orig}") from None
    if found == 0:
        where = url.removeprefix("sqlite:///")
        with engine.connect() as conn:
            tables = conn.execute(text("SELECT count(*) FROM sqlite_master")).scalar()
        if url.startswith("sqlite") and not tables:  # being made by a starting daemon
            raise StateMissing(f"the state database {where} is empty (no daemon has run yet)")
        raise ConfigError(
            f"{where} is not a state database of ldx-hotfolder (no jobs table); check state_db"
        )
    schema.ensure(engine, upgrade_older=False)  # an older or newer one: SchemaMismatch


class Database:
    """One state database: engine, schema, transactions."""

    def __init__(self, url: str, *, upgrade: bool = False, read_only: bool = False) -> None:
        """Open the database at ``url``; an empty one gets the schema, an older one is
        upgraded when ``upgrade`` (else SchemaMismatch, as for a newer one). ``read_only``
        (commands that only look): nothing is created or changed, and a missing,
        unreadable or foreign database is a ConfigError that says so."""
        self.url = url
        self.engine = make_engine(url, read_only=read_only)
        self._local = threading.local()  # the open batch of the thread committing it, if any
        try:
            if read_only:
                _check_readable(self.engine, url)
            else:
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
        self.identity = self.file_identity()

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    def close(self) -> None:
        """Release every connection."""
        self.engine.dispose()

    def file_identity(self) -> tuple[int, int] | None:
        """(device, inode) of an SQLite file, None for a server or a missing file."""
        if self.dialect != "sqlite":
            return None
        try:
            st = os.stat(self.url.removeprefix("sqlite:///"))
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def replaced(self) -> bool:
        """Whether the SQLite file was removed or replaced since it was opened: writes
        would go to a file nobody sees, and a restart would pay for every input again."""
        return self.identity is not None and self.file_identity() != self.identity

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
    def write(self) -> Iterator[Connection]:
        """A connection in a write transaction (the writer's batch when there is one)."""
        batched: Connection | None = getattr(self._local, "conn", None)
        if batched is not None:
            yield batched
            return
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection to read with (the writer's batch when there is one)."""
        batched: Connection | None = getattr(self._local, "conn", None)
        if batched is not None:
            yield batched
            return
        with self.engine.connect() as conn:
            yield conn

    def integrity_ok(self) -> bool:
        """Run SQLite's quick check (always true on other databases)."""
        if self.dialect != "sqlite":
            return True
        with self.engine.connect() as conn:
            return conn.execute(text("PRAGMA quick_check")).scalar() == "ok"
