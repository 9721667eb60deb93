"""Helpers for the intake tests: a running daemon, the table, the hub's ledger, writers."""

from __future__ import annotations

import os
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from daemon.emulator.server import EmulatorServer
from tests.helpers import Daemon, input_name, wait_for
from tests.scans import make_pdf


@contextmanager
def running(
    config: Path,
    log: Path,
    *,
    ready: float = 30.0,
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[Daemon]:
    """``ldx-hotfolder run`` as a subprocess, watching once this yields; stopped after."""
    daemon = Daemon(config, log, preexec_fn).start()
    try:
        wait_for(lambda: "start-up scan done" in daemon.log(), ready, "the daemon to start")
        yield daemon
    finally:
        code = daemon.stop()
        assert code == 0, daemon.log()[-3000:]


def rows(db: Path) -> list[dict[str, Any]]:
    """Every job row (empty while the table does not exist yet)."""
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM jobs ORDER BY id")]
        except sqlite3.OperationalError:
            return []


def completed(db: Path) -> int:
    """How many jobs completed (a cheap query, for waiting on many)."""
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        try:
            return int(
                conn.execute("SELECT count(*) FROM jobs WHERE status = 'completed'").fetchone()[0]
            )
        except sqlite3.OperationalError:
            return 0


def done(db: Path) -> dict[str, dict[str, Any]]:
    """Completed jobs by path."""
    return {r["path"]: r for r in rows(db) if r["status"] == "completed"}


def uploads(hub: EmulatorServer) -> Counter[str]:
    """How many times the hub received each file name."""
    return Counter(input_name(u["filename"]) for u in hub.hub.ledger()["uploads"])


def outputs(outbox: Path) -> list[str]:
    """Relative paths of the files in the outbox (hidden temporaries excluded)."""
    return sorted(
        p.relative_to(outbox).as_posix()
        for p in outbox.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    )


def big_pdf(size: int, seed: int) -> bytes:
    """A PDF of about ``size`` bytes: a real small PDF with a long comment inside."""
    base = make_pdf(1, marker=f"big {seed}")
    noise = random.Random(seed).randbytes(size).translate(bytes.maketrans(b"\r\n%", b"   "))
    head, rest = base.split(b"\n", 1)
    return head + b"\n%" + noise + b"\n" + rest


def pieces(data: bytes, count: int) -> list[bytes]:
    """``data`` cut into ``count`` nearly equal pieces."""
    step = -(-len(data) // count)
    return [data[i : i + step] for i in range(0, len(data), step)]


# Writers pace themselves with short sleeps: that is the scenario (a slow scanner), not a
# way to synchronise with the daemon. Each pause is far below the quiet period used.


def write_slowly(path: Path, data: bytes, chunks: int, pause: float) -> None:
    """One open, ``chunks`` writes with a pause after each (a scanner over a slow link)."""
    with path.open("wb") as out:
        for piece in pieces(data, chunks):
            out.write(piece)
            out.flush()
            time.sleep(pause)


def write_reopening(path: Path, data: bytes, pages: int, pause: float) -> None:
    """Open, append one page, close; again for every page (a duplex ADF)."""
    for piece in pieces(data, pages):
        with path.open("ab") as out:
            out.write(piece)
        time.sleep(pause)


def write_preallocated(path: Path, data: bytes, chunks: int, pause: float) -> None:
    """Reserve the final size first, then fill it in (Windows CopyFile, some SMB clients)."""
    with path.open("wb") as out:
        out.truncate(len(data))
        out.flush()
        time.sleep(pause)
        for piece in pieces(data, chunks):
            out.write(piece)
            out.flush()
            time.sleep(pause)


def write_then_rename(path: Path, data: bytes, chunks: int, pause: float) -> None:
    """Write a hidden temporary beside the target, then rename it (rsync's way)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}Xq")
    write_slowly(temp, data, chunks, pause)
    temp.rename(path)
