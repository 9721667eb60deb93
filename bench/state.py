"""Bench state: a big table of completed jobs with their inputs and outputs, made fast.

The idle and restart benchmarks need tens of thousands of completed conversions. Going
through the hub would take many minutes, so this writes what the daemon would have left
behind: small inputs in the inbox (kept after success), an output for each in the
outbox, and a ``done`` row per input whose signature matches the file on disk, inserted
in one transaction through the daemon's own schema.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Any

from sqlalchemy import insert

from bench.harness import Folders
from daemon.jobs.model import Stage, Status
from daemon.jobs.store import Store
from daemon.jobs.tables import jobs_table
from tests.scans import make_pdf

PER_FOLDER = 1000


def populate(folders: Folders, count: int) -> Folders:
    """Fill ``folders`` with ``count`` completed inputs, outputs and rows."""
    now = time.time()
    rows = [_row(folders, index, now) for index in range(count)]
    store = Store(f"sqlite:///{folders.db}")
    try:
        with store.engine.begin() as conn:
            conn.execute(insert(jobs_table), rows)
    finally:
        store.close()
    return folders


def _row(folders: Folders, index: int, now: float) -> dict[str, Any]:
    rel = f"archive-{index // PER_FOLDER:03d}/scan-{index:06d}.pdf"
    output = rel.removesuffix(".pdf") + ".docx"
    source = folders.inbox / rel
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(make_pdf(1, marker=f"kept {index}"))
    target = folders.outbox / output
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty ZIP: never read again
    st = os.lstat(source)
    return {
        "path": rel,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "inode": st.st_ino,
        "input_format": "pdf",
        "sha256": secrets.token_hex(32),
        "status": Status.COMPLETED.value,
        "stage": Stage.DONE.value,
        "engine": "ki/ocr",
        "language": "jpn",
        "output_format": "docx",
        "output": output,
        "remote_file_id": secrets.token_hex(16),
        "remote_job_id": secrets.token_hex(16),
        "output_file_id": secrets.token_hex(16),
        "attempts": 0,
        "submits": 1,
        "rearms": 0,
        "created_at": now - 3600,
        "updated_at": now - 3500,
        "finished_at": now - 3500,
    }
