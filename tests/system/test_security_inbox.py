"""Issue #35, the inbox side: attacks by someone who may write the inbox, and hostile outputs.

Each test performs the attack against the real daemon (a subprocess) with real folders,
links and FIFOs, the emulator on loopback as the hub, and asserts the outcome: nothing
outside the daemon's folders moved, read or written; the daemon alive, its peak RSS
bounded where memory was the attack; every other scan converted.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.emulator.hub import HubSettings as EmulatorSettings
from daemon.emulator.hub import paid_conversions
from daemon.emulator.server import EmulatorServer
from daemon.inbox.routing import FOLDER_FILE
from tests.conftest import daemon_config
from tests.helpers import cli, wait_for
from tests.inbox.test_path_limits import deep_file
from tests.intake_support import done, outputs, rows, running, uploads
from tests.scans import make_pdf, make_scan

MiB = 1024 * 1024
SECRET = b"%PDF-1.4 a file outside the daemon's folders\n%%EOF\n"
# A daemon converting a few scans stays well under this; /dev/zero read into memory, a
# deep XML tree or 4 GiB of zeros would pass it within a second.
PEAK_RSS_LIMIT = 300 * MiB


def peak_rss(pid: int) -> int:
    """The peak resident set (VmHWM) of a running process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


@pytest.fixture
def slow_hub() -> Iterator[EmulatorServer]:
    """An emulator whose jobs end only when the test moves its clock on (an hour each)."""
    with EmulatorServer(EmulatorSettings(processing_time=3600.0, seed=5)) as server:
        yield server


def finish_hub_jobs(hub: EmulatorServer) -> None:
    """Let every job the slow hub holds end now."""
    hub.hub.clock.advance(3601.0)


def by_path(db: Path) -> dict[str, dict[str, Any]]:
    """The newest job row of each path."""
    return {row["path"]: row for row in rows(db)}


# -- archive and delete: the descriptor walk, the converted version ---------------------


@pytest.mark.parametrize("on_success", ["archive", "delete"])
def test_a_folder_swapped_for_a_link_during_conversion_leads_nowhere(
    tmp_path: Path, folders: dict[str, Path], slow_hub: EmulatorServer, on_success: str
) -> None:
    """mv x/secret.key OUTSIDE; mv x x.orig; ln -s OUTSIDE x while converting: the very
    file converted now lies outside, and is neither moved nor deleted there."""
    inbox, db = folders["inbox"], folders["state"] / "state.db"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_bytes(SECRET)
    archive = tmp_path / "archive"
    scan = make_pdf(1, marker="the scan")
    (inbox / "x").mkdir()
    (inbox / "x" / "secret.key").write_bytes(scan)
    (inbox / "y").mkdir()
    (inbox / "y" / "other.png").write_bytes(make_scan("png", 2))
    config = daemon_config(
        tmp_path, folders, slow_hub.url, on_success=on_success, archive_dir=str(archive)
    )
    with running(config, tmp_path / "daemon.log") as daemon:
        wait_for(lambda: len(slow_hub.hub.ledger()["jobs"]) == 2, 30, "both jobs at the hub")
        (inbox / "x" / "secret.key").rename(outside / "secret.key")  # same inode and mtime
        (inbox / "x").rename(inbox / "x.orig")
        (inbox / "x").symlink_to(outside)
        finish_hub_jobs(slow_hub)
        wait_for(lambda: len(done(db)) == 2, 30, "both jobs to complete")
        wait_for(lambda: all(r["stage"] == "done" for r in rows(db)), 30, "inputs handled")
        log = daemon.log()
    assert (outside / "keep.txt").read_bytes() == SECRET
    assert (outside / "secret.key").read_bytes() == scan
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt", "secret.key"]
    assert "cannot be reached without following a link" in log
    assert sorted(outputs(folders["outbox"])) == ["x/secret.docx", "y/other.docx"]
    archived = sorted(p.relative_to(archive).as_posix() for p in archive.rglob("*.*"))
    assert archived == (["y/other.png"] if on_success == "archive" else [])
    assert not (inbox / "y" / "other.png").exists()  # the other scan was handled


def test_archive_never_takes_a_version_written_during_conversion(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    """A newer file written while the hub converts is converted itself, never archived raw."""
    inbox, db, archive = folders["inbox"], folders["state"] / "state.db", tmp_path / "archive"
    first, second = make_scan("png", 1), make_scan("png", 2)
    (inbox / "a.png").write_bytes(first)
    # The hub takes 3 s per job: the new version is written long before the first ends.
    with EmulatorServer(EmulatorSettings(processing_time=3.0, seed=5)) as hub:
        config = daemon_config(
            tmp_path, folders, hub.url, on_success="archive", archive_dir=str(archive)
        )
        with running(config, tmp_path / "daemon.log") as daemon:
            wait_for(lambda: len(hub.hub.ledger()["jobs"]) == 1, 30, "the job at the hub")
            (inbox / "a.png").write_bytes(second)  # in place, during the conversion
            wait_for(lambda: len(rows(db)) == 2, 30, "the new version to be taken")
            wait_for(lambda: all(r["stage"] == "done" for r in rows(db)), 30, "both handled")
            log = daemon.log()
        sent = {upload["sha256"] for upload in hub.hub.ledger()["uploads"]}
    archived = [p.read_bytes() for p in archive.rglob("*") if p.is_file()]
    assert all(hashlib.sha256(data).hexdigest() in sent for data in archived)  # all converted
    assert second in archived
    if first not in archived:  # it was overwritten during its conversion, as intended
        assert "the input changed since it was converted; the new version is kept" in log
    assert not any(r["status"] == "failed" for r in rows(db))
    assert not (inbox / "a.png").exists()


# -- folder rules files ---------------------------------------------------------------


def test_hostile_folder_files_fail_their_folders_in_bounded_memory(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """A link to /dev/zero, a FIFO and a huge file as rules files: refused, never read."""
    inbox, db = folders["inbox"], folders["state"] / "state.db"
    for index, folder in enumerate(("zero", "fifo", "huge", "good"), start=1):
        (inbox / folder).mkdir()
        (inbox / folder / "scan.png").write_bytes(make_scan("png", index))
    (inbox / "zero" / FOLDER_FILE).symlink_to("/dev/zero")
    os.mkfifo(inbox / "fifo" / FOLDER_FILE)
    (inbox / "huge" / FOLDER_FILE).write_bytes(b"# comment\n" * (4 * MiB // 10))
    (inbox / "good" / FOLDER_FILE).write_text('language = "eng"\n', encoding="utf-8")
    config = daemon_config(tmp_path, folders, emulator.url)
    with running(config, tmp_path / "daemon.log") as daemon:
        assert daemon.proc is not None
        wait_for(lambda: len(rows(db)) == 4, 30, "every scan to get a job")
        wait_for(lambda: "good/scan.png" in done(db), 30, "the good folder's scan converted")
        peak = peak_rss(daemon.proc.pid)
    found = by_path(db)
    reasons = {
        "zero": "is a symbolic link",
        "fifo": "is not a regular file",
        "huge": "larger than 64 KiB",
    }
    for folder, reason in reasons.items():
        row = found[f"{folder}/scan.png"]
        assert (row["status"], row["error_code"]) == ("failed", "bad_folder_settings")
        assert reason in row["error_message"]
    assert found["good/scan.png"]["language"] == "eng"
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / MiB:.0f} MiB"


# -- paths over the system's limits ------------------------------------------------------


def test_paths_over_the_limit_fail_alone_and_once_returns(tmp_path: Path) -> None:
    """An output path over PATH_MAX fails with a reason (explain says so); an input path
    over it whose output fits converts; once returns; the rest converts."""
    folders = {
        "inbox": tmp_path / ("i" * 250) / "inbox",  # 252 bytes longer than the outbox
        "outbox": tmp_path / "outbox",
        "state": tmp_path / "state",
    }
    for folder in folders.values():
        folder.mkdir(parents=True)
    too_deep = deep_file(folders["inbox"], 21, make_scan("png", 1), "too-deep.png")
    long_input = deep_file(folders["inbox"], 19, make_scan("png", 2), "fits.png")
    (folders["inbox"] / "plain.png").write_bytes(make_scan("png", 3))
    with EmulatorServer(EmulatorSettings(processing_time=0.2, seed=3)) as hub:
        config = daemon_config(tmp_path, folders, hub.url)
        result = cli(config, "once", timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    found = by_path(folders["state"] / "state.db")
    assert (found[too_deep]["status"], found[too_deep]["error_code"]) == (
        "failed",
        "path_too_long",
    )
    assert found[long_input]["status"] == "completed"
    assert found["plain.png"]["status"] == "completed"
    given = os.fsdecode(os.path.join(os.fsencode(folders["inbox"]), os.fsencode(too_deep)))
    answer = cli(config, "explain", "--json", given)
    assert answer.returncode == 0, answer.stderr
    (explained,) = json.loads(answer.stdout)
    assert explained["state"] == "failed"
    assert any("too long for the system" in line for line in explained["reasons"])


# -- hostile outputs -------------------------------------------------------------------


@pytest.mark.parametrize("bomb", ["deep_xml", "zeros"])
def test_output_bombs_fail_at_once_in_bounded_memory(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer, bomb: str
) -> None:
    """A bomb output fails its job at once (one download), is removed, and memory stays
    bounded; scans converted right after show the daemon carries on."""
    inbox, outbox, db = folders["inbox"], folders["outbox"], folders["state"] / "state.db"
    config = daemon_config(tmp_path, folders, emulator.url)
    with running(config, tmp_path / "daemon.log") as daemon:
        assert daemon.proc is not None
        emulator.hub.update_knobs({"output_bomb": bomb})
        (inbox / "bomb.png").write_bytes(make_scan("png", 1))
        wait_for(lambda: by_path(db).get("bomb.png", {}).get("status") == "failed", 60, "bomb")
        emulator.hub.update_knobs({"output_bomb": "none"})
        for seed in range(2, 5):
            (inbox / f"after-{seed}.png").write_bytes(make_scan("png", seed))
        wait_for(lambda: len(done(db)) == 3, 60, "the scans after the bomb to convert")
        peak = peak_rss(daemon.proc.pid)
    row = by_path(db)["bomb.png"]
    assert row["error_code"] == "output_refused"
    assert "it was removed" in row["error_message"]
    assert len(emulator.hub.ledger()["downloads"]) == 4  # the bomb fetched once, no retry
    assert sorted(outputs(outbox)) == [
        "after-2.docx",
        "after-3.docx",
        "after-4.docx",
        "bomb.png.error.txt",
    ]
    assert not list(outbox.rglob(".*"))  # no partial download left
    assert paid_conversions(emulator.hub.ledger()) == 4
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / MiB:.0f} MiB"
    assert uploads(emulator)["bomb.png"] == 1


# -- a file rewritten just slower than the quiet period ----------------------------------


def test_a_file_rewritten_slower_than_the_quiet_period_gets_one_job_at_a_time(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    """Versions written while one converts wait for it: a few jobs, none failed, no error
    file, the last version converted; not a paid job per version."""
    inbox, db = folders["inbox"], folders["state"] / "state.db"
    versions = 8
    with EmulatorServer(EmulatorSettings(processing_time=2.0, seed=8)) as hub:
        config = daemon_config(tmp_path, folders, hub.url, quiet_period=0.3)
        with running(config, tmp_path / "daemon.log"):
            for seed in range(versions):
                (inbox / "a.png").write_bytes(make_scan("png", seed))
                time.sleep(0.45)  # the writer's pace (the scenario), just over the quiet period
            final = (inbox / "a.png").stat()
            wait_for(
                lambda: any(
                    r["size"] == final.st_size and r["status"] == "completed" for r in rows(db)
                ),
                60,
                "the last version to convert",
            )
            wait_for(lambda: all(r["stage"] == "done" for r in rows(db)), 30, "all jobs ended")
        paid = paid_conversions(hub.hub.ledger())
    found = rows(db)
    assert not [r for r in found if r["status"] == "failed"]
    assert len(found) <= 3, [r["size"] for r in found]  # the first, maybe one between, the last
    assert paid <= 3
    assert outputs(folders["outbox"]) == ["a.docx"]  # no error file


# -- placeholders ------------------------------------------------------------------------


def test_status_summarises_many_waiting_placeholders(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """2,000 empty placeholders: status prints a count per reason and a few examples."""
    inbox, db = folders["inbox"], folders["state"] / "state.db"
    for index in range(2000):
        (inbox / f"placeholder-{index:04d}.pdf").touch()
    (inbox / "real.png").write_bytes(make_scan("png", 1))
    config = daemon_config(tmp_path, folders, emulator.url, stalled_after=0.5)
    with running(config, tmp_path / "daemon.log"):
        wait_for(lambda: waiting_count(db) == 2000, 60, "the placeholders to show as stalled")
        wait_for(lambda: "real.png" in done(db), 30, "the real scan to convert")
        (inbox / "placeholder-0000.pdf").unlink()  # removed: it leaves the list at once
        wait_for(lambda: waiting_count(db) == 1999, 10, "the removed one to leave the list")
        status = cli(config, "status", "--no-hub")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert len(lines) < 30, status.stdout[-2000:]
    assert "stalled in the inbox (not taken yet): 1999" in lines
    assert "  empty_file: 1999" in lines
    assert "    ... and 1996 more" in lines


def waiting_count(db: Path) -> int:
    """Rows in the table's waiting list (what status shows as stalled)."""
    with sqlite3.connect(db) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM waiting").fetchone()[0])
        except sqlite3.OperationalError:
            return 0
