"""Real writers against a running daemon: every file is uploaded once, and whole.

A slow writer (5 MB PDF in 20 chunks), a duplex scanner that closes and reopens the
file between pages, a writer that reserves the final size and then fills it, an
rsync-style temp-then-rename writer and a program saving a PDF incrementally (each
state complete in itself) all write at once while the daemon watches, with
inotify and with polling. The writers' pauses are far shorter than the quiet period,
their total time far longer. The emulator's ledger records the SHA-256 of every upload.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.emulator.server import EmulatorServer
from tests.conftest import daemon_config
from tests.helpers import wait_for
from tests.intake_support import (
    big_pdf,
    done,
    outputs,
    running,
    uploads,
    write_preallocated,
    write_reopening,
    write_slowly,
    write_then_rename,
)
from tests.scans import make_pdf, make_scan

QUIET = 0.8
PAUSE = 0.15  # under a fifth of the quiet period; 20 pauses make 3 s, well over it

Writer = Callable[[Path, bytes, int, float], None]


@pytest.mark.parametrize("use_polling", [False, True], ids=["inotify", "polling"])
def test_slow_reopening_preallocating_and_renaming_writers(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer, use_polling: bool
) -> None:
    """Each file is uploaded exactly once and the hub received the writer's final bytes."""
    inbox = folders["inbox"]
    (inbox / "adf").mkdir()
    jobs: dict[str, tuple[Writer, bytes, int]] = {
        "slow.pdf": (write_slowly, big_pdf(5 * 1024 * 1024, seed=1), 20),
        "adf/duplex.tif": (write_reopening, make_scan("tiff", seed=2, pages=6), 6),
        "reserved.pdf": (write_preallocated, big_pdf(300_000, seed=3), 12),
        "synced.jpg": (write_then_rename, make_scan("jpeg", seed=4), 8),
        # Incremental saves: every intermediate state is a complete PDF, so only the
        # quiet period keeps the daemon from taking one of them.
        "revised.pdf": (write_reopening, b"".join(make_pdf(1, f"rev {i}") for i in range(8)), 8),
    }
    config = daemon_config(
        tmp_path,
        folders,
        emulator.url,
        quiet_period=QUIET,
        rescan_interval=3600.0,
        use_polling=use_polling,
        polling_interval=0.5,
    )
    with running(config, tmp_path / "daemon.log"):
        writers = [
            threading.Thread(target=write, args=(inbox / rel, data, chunks, PAUSE))
            for rel, (write, data, chunks) in jobs.items()
        ]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
        db = folders["state"] / "state.db"
        wait_for(lambda: len(done(db)) == len(jobs), 60, "every file to be converted")
    ledger = emulator.hub.ledger()
    assert uploads(emulator) == {Path(rel).name: 1 for rel in jobs}
    received = {u["filename"]: u["sha256"] for u in ledger["uploads"]}
    for rel, (_, data, _) in jobs.items():
        assert received[Path(rel).name] == hashlib.sha256(data).hexdigest(), rel
    assert len(ledger["jobs"]) == len(jobs)
    assert outputs(folders["outbox"]) == sorted(
        ["slow.docx", "adf/duplex.docx", "reserved.docx", "synced.docx", "revised.docx"]
    )
