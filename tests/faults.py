"""Shared checks of the fault-injection suite: what must hold after any crash or fault."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from daemon.emulator.hub import Hub
from daemon.outbox.layout import TEMP_MARKER


def job_rows(db: Path) -> list[dict[str, Any]]:
    """Every row of the jobs table (none while the daemon has not created it yet)."""
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in conn.execute("SELECT * FROM jobs ORDER BY id")]
        except sqlite3.OperationalError:
            return []


def failures(db: Path) -> list[str]:
    """Each failed row as "path: code: message", for an assertion's explanation."""
    return [
        f"{row['path']}: {row['error_code']}: {row['error_message']}"
        for row in job_rows(db)
        if row["status"] == "failed"
    ]


def integrity(db: Path) -> str:
    """SQLite's full integrity check."""
    with sqlite3.connect(db) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def outbox_files(outbox: Path) -> list[str]:
    """Every file under the outbox, relative, sorted."""
    return sorted(p.relative_to(outbox).as_posix() for p in outbox.rglob("*") if p.is_file())


def assert_exactly_once(inputs: list[str], outbox: Path, db: Path, hub: Hub) -> None:
    """One output per input, byte-identical to the hub's, no temporary file, a sound table."""
    rows = job_rows(db)
    done = {row["path"]: row for row in rows if row["status"] == "completed"}
    assert sorted(done) == sorted(inputs), "every input completed"
    outputs = outbox_files(outbox)
    assert not [p for p in outputs if TEMP_MARKER in p], "no temporary file left"
    assert sorted(row["output"] for row in done.values()) == outputs, "one output per input"
    for row in done.values():
        served = hub.open_download(row["output_file_id"]).path.read_bytes()
        assert (outbox / row["output"]).read_bytes() == served, row["path"]
    assert integrity(db) == "ok"
