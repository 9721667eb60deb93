"""Real writers against a running daemon: every file is uploaded once, and whole.

A slow writer (a 5 MB PDF in 20 chunks over 10 s, as the intake issue states it), a
duplex scanner that closes and reopens the file between pages, a writer that reserves
the final size and then fills it, an rsync-style temp-then-rename writer and a program
saving a PDF incrementally (each state complete in itself) all write at once while the
daemon watches, with inotify and with polling, and the default quiet period. The
writers' pauses are far shorter than the quiet period, their total time far longer.
The emulator's ledger records the SHA-256 of every upload.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.emulator.server import EmulatorServer
from tests.conftest import daemon_config
from tests.helpers import input_name, wait_for
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

QUIET = 2.0  # the default
PAUSE = 0.15  # far under the quiet period; several pauses add up to more than it
SLOW_PAUSE = 0.5  # a quarter of the quiet period; 20 of them make the 10 s of the issue

Writer = Callable[[Path, bytes, int, float], None]


@pytest.mark.parametrize("use_polling", [False, True], ids=["inotify", "polling"])
def test_slow_reopening_preallocating_and_renaming_writers(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer, use_polling: bool
) -> None:
    """Each file is uploaded exactly once and the hub received the writer's final bytes."""
    inbox = folders["inbox"]
    (inbox / "adf").mkdir()
    revisions = b"".join(make_pdf(1, f"rev {i}") for i in range(24))
    jobs: dict[str, tuple[Writer, bytes, int, float]] = {
        "slow.pdf": (write_slowly, big_pdf(5 * 1024 * 1024, seed=1), 20, SLOW_PAUSE),
        "adf/duplex.tif": (write_reopening, make_scan("tiff", seed=2, pages=24), 24, PAUSE),
        "reserved.pdf": (write_preallocated, big_pdf(300_000, seed=3), 24, PAUSE),
        "synced.jpg": (write_then_rename, make_scan("jpeg", seed=4), 24, PAUSE),
        # Incremental saves: every intermediate state is a complete PDF, so only the
        # quiet period keeps the daemon from taking one of them.
        "revised.pdf": (write_reopening, revisions, 24, PAUSE),
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
            threading.Thread(target=write, args=(inbox / rel, data, chunks, pause))
            for rel, (write, data, chunks, pause) in jobs.items()
        ]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
        db = folders["state"] / "state.db"
        wait_for(lambda: len(done(db)) == len(jobs), 60, "every file to be converted")
    ledger = emulator.hub.ledger()
    assert uploads(emulator) == {Path(rel).name: 1 for rel in jobs}
    received = {input_name(u["filename"]): u["sha256"] for u in ledger["uploads"]}
    for rel, (_, data, _, _) in jobs.items():
        assert received[Path(rel).name] == hashlib.sha256(data).hexdigest(), rel
    assert len(ledger["jobs"]) == len(jobs)
    assert outputs(folders["outbox"]) == sorted(
        ["slow.docx", "adf/duplex.docx", "reserved.docx", "synced.docx", "revised.docx"]
    )
