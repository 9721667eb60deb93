"""Inputs that change, vanish or move after intake took them, before they were converted."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from daemon.emulator.server import EmulatorServer
from tests.conftest import daemon_config
from tests.helpers import wait_for
from tests.intake_support import big_pdf, done, outputs, rows, running, uploads
from tests.scans import make_scan


def upload_requests(emulator: EmulatorServer) -> int:
    """How many upload requests reached the hub (counted before their latency)."""
    requests: dict[str, int] = emulator.hub.ledger()["requests"]
    return sum(n for route, n in requests.items() if route.startswith("POST /files"))


def test_content_changed_during_upload_is_taken_again(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """A change during upload discards it; no job fails, and the new version converts once."""
    # The changed content keeps the same size, mtime and inode.
    scan = folders["inbox"] / "scan.pdf"
    original = big_pdf(12 * 1024 * 1024, seed=5)
    changed = bytearray(original)
    middle = len(changed) - 600_000  # far past what sockets buffer before the hub reads
    changed[middle : middle + 16] = b"CHANGED-CONTENT!"
    config = daemon_config(tmp_path, folders, emulator.url, rescan_interval=3600.0)
    db = folders["state"] / "state.db"
    with running(config, tmp_path / "daemon.log") as daemon:
        emulator.hub.update_faults({"latency": 2.0})  # holds the upload open
        scan.write_bytes(original)
        wait_for(lambda: upload_requests(emulator) >= 1, 30, "the upload to start")
        stamp = scan.stat()
        with scan.open("r+b") as out:  # rewrite in place, then put the mtime back
            out.seek(middle)
            out.write(b"CHANGED-CONTENT!")
        os.utime(scan, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        emulator.hub.update_faults({"latency": 0.0})
        wait_for(lambda: "scan.pdf" in done(db), 60, "the new version to convert")
    assert "changed while it was uploaded" in daemon.log()
    table = rows(db)
    assert [r["status"] for r in table] == ["completed"]
    assert table[0]["sha256"] == hashlib.sha256(changed).hexdigest()
    ledger = emulator.hub.ledger()
    assert len(ledger["uploads"]) == 2  # the first was discarded, never converted
    assert len(ledger["jobs"]) == 1
    converted = next(u for u in ledger["uploads"] if u["file_id"] == ledger["jobs"][0]["file_id"])
    assert converted["sha256"] == hashlib.sha256(changed).hexdigest()
    assert outputs(folders["outbox"]) == ["scan.docx"]


def test_deleted_and_renamed_before_upload(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """A deleted input leaves no job; a renamed one converts once under its new name."""
    # Both happen after the input is queued, before its upload; nothing fails, the daemon goes on.
    inbox = folders["inbox"]
    db = folders["state"] / "state.db"
    config = daemon_config(tmp_path, folders, emulator.url, max_in_flight=1)
    with running(config, tmp_path / "daemon.log"):
        emulator.hub.update_faults({"latency": 1.5})  # the only slot stays busy
        (inbox / "first.png").write_bytes(make_scan("png", 1))
        wait_for(lambda: upload_requests(emulator) >= 1, 30, "the first upload")
        (inbox / "gone.png").write_bytes(make_scan("png", 2))
        (inbox / "old name.png").write_bytes(make_scan("png", 3))
        queued = {"gone.png", "old name.png"}
        wait_for(lambda: queued <= {r["path"] for r in rows(db)}, 30, "both to be queued")
        (inbox / "gone.png").unlink()
        (inbox / "old name.png").rename(inbox / "new name.png")
        emulator.hub.update_faults({"latency": 0.0})
        wait_for(
            lambda: set(done(db)) == {"first.png", "new name.png"} and len(rows(db)) == 2,
            60,
            "the first and the renamed file to convert, the others withdrawn",
        )
    assert {r["status"] for r in rows(db)} == {"completed"}
    assert uploads(emulator) == {"first.png": 1, "new name.png": 1}
    assert outputs(folders["outbox"]) == ["first.docx", "new name.docx"]
