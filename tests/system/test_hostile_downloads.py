"""Issue #35, the hub side: answers a hostile hub (or a man in the middle) sends to fill
the outbox disk, hold a job for ever or exhaust memory.

Each test runs the real daemon (a subprocess) against the emulator on loopback answering
that way, and asserts the outcome: the job ends or waits with a clear reason, no partial
file is left, the daemon's peak RSS stays bounded, nothing is paid twice, and scans
dropped once the hub behaves again convert.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon.emulator.hub import paid_conversions
from daemon.emulator.server import EmulatorServer
from tests.conftest import daemon_config
from tests.helpers import wait_for
from tests.intake_support import done, outputs, running, uploads
from tests.scans import make_scan
from tests.system.test_security_inbox import MiB, by_path, peak_rss

HOSTILE_DOWNLOADS = {
    # A body that never ends: the outbox disk would fill every few seconds.
    "endless": {"download_mode": "endless"},
    # 1 GiB of zeros sent as a few MB of gzip: counted on decoded bytes.
    "gzip bomb": {"download_gzip_bomb": True},
    # One byte every few seconds behind a declared length of a tebibyte.
    "trickle": {"download_mode": "trickle", "trickle_interval": 2.0},
}
# The daemon converting a few scans peaks near 75 MiB; httpx inflating a bomb's pieces
# whole took it past 320 MiB.
PEAK_RSS_LIMIT = 150 * MiB
CALM: dict[str, Any] = {
    "download_mode": "normal",
    "download_gzip_bomb": False,
    "json_padding": 0,
    "gzip_json": False,
}


def convert_after(inbox: Path, db: Path, first: int) -> None:
    """Drop three scans and wait until they converted: the daemon carries on."""
    for seed in range(2, 5):
        (inbox / f"after-{seed}.png").write_bytes(make_scan("png", seed))
    wait_for(lambda: len(done(db)) == first + 3, 60, "the scans dropped afterwards to convert")


@pytest.mark.parametrize("attack", sorted(HOSTILE_DOWNLOADS))
def test_a_download_past_its_cap_fails_its_job_alone_in_bounded_memory(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer, attack: str
) -> None:
    """An endless, inflating or trickling download stops at the output's cap: the job
    fails with the reason, the partial file is removed, the output is fetched once and
    paid once, memory stays bounded, and later scans convert."""
    inbox, outbox, db = folders["inbox"], folders["outbox"], folders["state"] / "state.db"
    config = daemon_config(tmp_path, folders, emulator.url, hub={"deadline": 5.0})
    with running(config, tmp_path / "daemon.log") as daemon:
        assert daemon.proc is not None
        emulator.hub.update_knobs(HOSTILE_DOWNLOADS[attack])
        (inbox / "hostile.png").write_bytes(make_scan("png", 1))
        wait_for(
            lambda: by_path(db).get("hostile.png", {}).get("status") == "failed",
            60,
            "the hostile download to fail its job",
        )
        emulator.hub.update_knobs(CALM)
        convert_after(inbox, db, 0)
        peak = peak_rss(daemon.proc.pid)
    row = by_path(db)["hostile.png"]
    assert row["error_code"] == "output_too_large", row
    assert "the partial file was removed" in row["error_message"]
    assert sorted(outputs(outbox)) == [
        "after-2.docx",
        "after-3.docx",
        "after-4.docx",
        "hostile.png.error.txt",
    ]
    assert not list(outbox.rglob(".*"))  # no partial download left anywhere
    ledger = emulator.hub.ledger()
    assert len(ledger["downloads"]) == 4  # the hostile output fetched once, no retry
    assert paid_conversions(ledger) == 4
    assert uploads(emulator)["hostile.png"] == 1
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / MiB:.0f} MiB"


def test_a_json_bomb_is_refused_unread_and_the_job_resumes_paid_once(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """Job and list answers of a few hundred KB inflating to 300 MB are refused at the
    JSON cap in bounded memory; nothing fails, and once the hub answers plainly the scan
    converts, paid once."""
    inbox, outbox, db = folders["inbox"], folders["outbox"], folders["state"] / "state.db"
    config = daemon_config(tmp_path, folders, emulator.url)
    log = tmp_path / "daemon.log"
    with running(config, log) as daemon:
        assert daemon.proc is not None
        emulator.hub.update_knobs({"json_padding": 300_000_000, "gzip_json": True})
        (inbox / "scan.png").write_bytes(make_scan("png", 1))
        wait_for(lambda: "not read" in daemon.log(), 60, "the daemon to refuse a JSON bomb")
        peak = peak_rss(daemon.proc.pid)
        assert by_path(db)["scan.png"]["status"] != "failed"
        emulator.hub.update_knobs(CALM)
        wait_for(lambda: "scan.png" in done(db), 60, "the scan to convert once the hub calms")
        convert_after(inbox, db, 1)
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / MiB:.0f} MiB"
    assert sorted(outputs(outbox)) == ["after-2.docx", "after-3.docx", "after-4.docx", "scan.docx"]
    assert paid_conversions(emulator.hub.ledger()) == 4
    assert uploads(emulator)["scan.png"] == 1
