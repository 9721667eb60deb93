"""A remote job recorded at its creation but not yet taken into the job's row is followed."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

from daemon.config import load_settings
from daemon.emulator.hub import DEFAULT_API_KEY, paid_conversions
from daemon.emulator.server import EmulatorServer
from daemon.hub.client import HubClient
from daemon.jobs.model import NewJob, RemoteRecord, Stage
from daemon.jobs.store import Store
from daemon.service import run_service
from tests.conftest import daemon_config
from tests.helpers import enqueue
from tests.scans import make_scan


async def upload_and_create(url: str, data: bytes) -> tuple[str, str]:
    """Upload ``data`` and create a job on it, as the daemon's steps do: (file id, job id)."""
    async with HubClient.connect(url, DEFAULT_API_KEY) as client:
        info = await client.upload(io.BytesIO(data), "a.png", "image/png", len(data))
        job = await client.create_job(info.file_id, "ki/ocr", "jpn", "docx")
    return info.file_id, job.job_id


def test_a_creation_recorded_before_a_crash_is_followed_not_paid_again(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """Killed between recording the remote job and advancing the row: the next run follows
    that remote job (one paid conversion), it does not create another."""
    # The crash suite hit this now and then (``after-create`` in another job's step).
    data = make_scan("png", 12)
    scan = folders["inbox"] / "a.png"
    scan.write_bytes(data)
    st = scan.stat()
    file_id, remote_job_id = asyncio.run(upload_and_create(emulator.url, data))
    config = daemon_config(tmp_path, folders, emulator.url)
    store = Store(f"sqlite:///{folders['state'] / 'state.db'}", upgrade=True)
    try:
        new = NewJob("a.png", st.st_size, st.st_mtime_ns, st.st_ino, "png", "ki/ocr", "jpn", "docx")
        job = enqueue(store, new, "a.docx", time.time())
        assert job is not None
        store.advance(job.id, Stage.SUBMITTING, time.time(), remote_file_id=file_id)
        record = RemoteRecord(job.id, remote_job_id, file_id, time.time(), "queued")
        store.record_remote(record, time.time())
    finally:
        store.close()
    outcome = asyncio.run(run_service(load_settings(config), once=True))
    assert outcome is not None
    assert outcome.completed == ["a.png"]
    assert paid_conversions(emulator.hub.ledger()) == 1
    assert (folders["outbox"] / "a.docx").stat().st_size > 0
