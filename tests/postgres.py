"""A real PostgreSQL server for the tests: initdb and pg_ctl into a temporary folder.

The server runs as an unprivileged user (``nobody`` when the tests run as root, since
initdb refuses root), listens on a free loopback port and keeps its Unix socket in its
own folder. Each test gets a database of its own (``PostgresServer.new_database``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/local/bin", "/usr/bin")
START_TIMEOUT = 60


class PostgresUnavailable(Exception):
    """PostgreSQL cannot be started here (no binaries, or the server would not start)."""


def find_binary(name: str) -> str:
    """The path of a PostgreSQL program, or PostgresUnavailable."""
    for folder in BIN_DIRS:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise PostgresUnavailable(f"{name} not found in {', '.join(BIN_DIRS)} or PATH")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    """One running cluster; ``stop`` ends it and removes its folder."""

    root: Path
    port: int
    user: str | None  # the OS user the server runs as (None: this process's user)
    pg_ctl: str

    @property
    def socket_dir(self) -> Path:
        """Where the server's Unix socket lives."""
        return self.root / "socket"

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database`` over TCP on loopback."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self, name: str) -> str:
        """Create an empty database ``name``; return its URL."""
        import psycopg

        dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')  # type: ignore[arg-type]
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its folder."""
        command = [self.pg_ctl, "stop", "-D", str(self.root / "data"), "-m", "fast", "-w"]
        _run_in(self.root, self.user, command, 60)
        shutil.rmtree(self.root, ignore_errors=True)


def _as_user(user: str | None) -> dict[str, object]:
    if user is None:
        return {}
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


def start(attempts: int = 3) -> PostgresServer:
    """initdb a new cluster and start it; PostgresUnavailable when that is not possible."""
    pg_ctl = find_binary("pg_ctl")
    user = "nobody" if os.geteuid() == 0 else None
    root = _make_root(user)
    initdb = [find_binary("initdb"), "-D", str(root / "data"), "-U", "postgres"]
    init = _run_in(root, user, [*initdb, "--auth=trust", "-E", "UTF8"], START_TIMEOUT)
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise PostgresUnavailable(f"initdb failed: {init.stderr[-2000:]}")
    last_error = ""
    for _ in range(attempts):  # another process may take the free port before the server
        port = _free_port()
        options = f"-h 127.0.0.1 -p {port} -k {root / 'socket'} -c fsync=off -c max_connections=100"
        command = [pg_ctl, "start", "-D", str(root / "data"), "-w", "-t", str(START_TIMEOUT)]
        command += ["-l", str(root / "server.log"), "-o", options]
        started = _run_in(root, user, command, START_TIMEOUT + 10)
        if started.returncode == 0:
            return PostgresServer(root, port, user, pg_ctl)
        log = root / "server.log"
        last_error = started.stderr + (
            log.read_text(errors="replace")[-2000:] if log.exists() else ""
        )
    shutil.rmtree(root, ignore_errors=True)
    raise PostgresUnavailable(f"pg_ctl start failed: {last_error}")


def _make_root(user: str | None) -> Path:
    """A fresh folder for the cluster and its socket, owned by ``user`` if given."""
    root = Path(tempfile.mkdtemp(prefix="ldx-pg-"))
    (root / "socket").mkdir()
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
        shutil.chown(root / "socket", user)
    return root


def _run_in(
    root: Path, user: str | None, command: list[str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL tool in ``root`` as ``user``, output captured."""
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=root,
        **_as_user(user),  # type: ignore[arg-type]
    )
