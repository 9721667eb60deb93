"""Watching the inbox: lost events, dead observers, folders moved in, network shares, limits."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from watchdog.events import FileSystemEvent, FileSystemEventHandler

from daemon.config import Settings, load_settings
from daemon.emulator.hub import HubSettings as EmulatorSettings
from daemon.emulator.server import EmulatorServer
from daemon.inbox.intake import Intake
from daemon.inbox.watcher import Watcher
from daemon.service import Service, prepare
from tests.conftest import daemon_config
from tests.helpers import wait_for
from tests.intake_support import completed, done, outputs, running, uploads
from tests.scans import make_pdf, make_scan

MODES = pytest.mark.parametrize("use_polling", [False, True], ids=["inotify", "polling"])
IN_CI = os.environ.get("CI", "").lower() == "true"


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait (in the event loop) until ``predicate`` holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


def in_process(settings: Settings, scenario: Callable[[Service], object]) -> None:
    """Run the daemon in this process while ``scenario(service)`` (a coroutine) runs."""

    async def main() -> None:
        service = Service(settings, prepare(settings), once=False)
        runner = asyncio.create_task(service.run())
        try:
            await asyncio.wait_for(service.ready.wait(), 15)
            await scenario(service)  # type: ignore[misc]
        finally:
            service.request_stop()
            await runner

    asyncio.run(main())


@MODES
def test_lost_events_are_recovered_by_the_rescan(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    use_polling: bool,
) -> None:
    """With every filesystem event dropped, files convert via the rescan; later ones find none."""
    monkeypatch.setattr(Intake, "hint", lambda self, path, is_dir: None)  # events lost
    config = daemon_config(
        tmp_path, folders, emulator.url, rescan_interval=1.0, use_polling=use_polling
    )
    db = folders["state"] / "state.db"

    async def scenario(service: Service) -> None:
        (folders["inbox"] / "lost").mkdir()
        for i in range(3):
            (folders["inbox"] / "lost" / f"s{i}.png").write_bytes(make_scan("png", i))
        await until(lambda: len(done(db)) == 3, 30, "the rescan to find the files")
        for _ in range(2):  # known versions: no candidate, so nothing is read or queued
            assert await service.intake.scan() == 0
            assert service.intake.sightings == {}

    in_process(load_settings(config), scenario)
    captured = capsys.readouterr()
    assert "rescan found files the watcher missed" in captured.out + captured.err
    assert uploads(emulator) == {"s0.png": 1, "s1.png": 1, "s2.png": 1}


def test_inotify_overflow_rescans_at_once(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An inotify overflow makes the daemon rescan at once, long before the rescan interval."""
    # watchdog reports the overflow only as a log line; the files' own events are lost.
    monkeypatch.setattr(Intake, "hint", lambda self, path, is_dir: None)  # events lost
    config = daemon_config(
        tmp_path, folders, emulator.url, rescan_interval=3600.0, use_polling=False
    )
    db = folders["state"] / "state.db"

    async def scenario(service: Service) -> None:
        (folders["inbox"] / "deep").mkdir()
        (folders["inbox"] / "deep" / "lost.png").write_bytes(make_scan("png", 81))
        # What watchdog's inotify reader logs when the kernel reports IN_Q_OVERFLOW.
        logging.getLogger("watchdog.observers.inotify_c").warning(
            "Inotify queue overflowed; filesystem events were lost"
        )
        await until(lambda: "deep/lost.png" in done(db), 30, "the rescan after the overflow")

    in_process(load_settings(config), scenario)
    captured = capsys.readouterr()
    assert "inotify queue overflow" in captured.out + captured.err
    assert uploads(emulator) == {"lost.png": 1}


def test_dead_observer_is_noticed_and_restarted(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """When the observer's thread dies, the daemon restarts it and rescans at once."""
    config = daemon_config(tmp_path, folders, emulator.url, rescan_interval=3600.0)
    db = folders["state"] / "state.db"

    async def scenario(service: Service) -> None:
        assert service.watcher is not None
        for observer in service.watcher.observers:
            for emitter in list(observer.emitters):
                emitter.stop()  # the thread ends, as after an exception in it
        (folders["inbox"] / "after.jpg").write_bytes(make_scan("jpeg", 1))
        await until(lambda: "after.jpg" in done(db), 30, "the file to convert")
        assert service.watcher.healthy()

    in_process(load_settings(config), scenario)
    captured = capsys.readouterr()
    assert "the filesystem observer stopped; restarting it" in captured.out + captured.err


@MODES
def test_folder_moved_in_as_a_whole(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer, use_polling: bool
) -> None:
    """A finished folder tree renamed into the inbox is picked up without a rescan."""
    staging = tmp_path / "staging" / "batch"
    for rel in ("a/one.pdf", "a/b/two.tif", "three.bmp"):
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        fmt = {"pdf": "pdf", "tif": "tiff", "bmp": "bmp"}[rel.rsplit(".", 1)[1]]
        (staging / rel).write_bytes(make_scan(fmt, len(rel)))
    config = daemon_config(
        tmp_path,
        folders,
        emulator.url,
        rescan_interval=3600.0,
        use_polling=use_polling,
        polling_interval=0.5,
    )
    db = folders["state"] / "state.db"
    with running(config, tmp_path / "daemon.log"):
        staging.rename(folders["inbox"] / "batch")
        wait_for(lambda: len(done(db)) == 3, 30, "the moved folder's files to convert")
    assert outputs(folders["outbox"]) == [
        "batch/a/b/two.docx",
        "batch/a/one.docx",
        "batch/three.docx",
    ]


@MODES
def test_thousand_files_copied_at_once(
    tmp_path: Path, folders: dict[str, Path], use_polling: bool
) -> None:
    """cp -r of a 1,000-file tree: 1,000 outputs, each file uploaded and converted once."""
    tree = tmp_path / "tree"
    for i in range(1000):
        folder = tree / f"d{i % 10}" / f"e{i % 7}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"scan {i}.pdf").write_bytes(make_pdf(1, marker=f"n{i}"))
    with EmulatorServer(EmulatorSettings(processing_time=0.05, seed=3)) as hub:
        config = daemon_config(
            tmp_path,
            folders,
            hub.url,
            rescan_interval=3600.0,
            use_polling=use_polling,
            polling_interval=0.5,
        )
        db = folders["state"] / "state.db"
        with running(config, tmp_path / "daemon.log"):
            subprocess.run(["cp", "-r", str(tree), str(folders["inbox"])], check=True)
            wait_for(lambda: completed(db) == 1000, 240, "1,000 conversions")
        counts = uploads(hub)
        assert len(counts) == 1000
        assert set(counts.values()) == {1}
        assert len(hub.hub.ledger()["jobs"]) == 1000
    assert len(outputs(folders["outbox"])) == 1000


def can_mount_fuse() -> str | None:
    """Why a FUSE mount cannot be made here, or None when it can."""
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("bindfs") is None:
        return "bindfs is not installed (apt-get install bindfs)"
    return None


@pytest.fixture
def share(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(backing folder, FUSE mount of it): a network share's server side and client side."""
    problem = can_mount_fuse()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"CI must run the FUSE share test, but: {problem}")
        pytest.skip(problem)
    backing, mount = tmp_path / "server-side", tmp_path / "inbox-share"
    backing.mkdir()
    mount.mkdir()
    subprocess.run(["bindfs", str(backing), str(mount)], check=True)
    try:
        yield backing, mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_network_share_inbox_is_polled(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer, share: tuple[Path, Path]
) -> None:
    """A FUSE inbox written behind its back is polled with use_polling = "auto"; files convert."""
    # Written as another SMB/NFS client would; no other setting is needed; files convert promptly.
    backing, mount = share
    folders = {**folders, "inbox": mount}
    # use_polling and polling_interval stay at their defaults; the rescan is pushed out
    # of reach, so only polling can find the files.
    config = daemon_config(tmp_path, folders, emulator.url, rescan_interval=3600.0)
    db = folders["state"] / "state.db"
    with running(config, tmp_path / "daemon.log") as daemon:
        assert '"polled": ["' + str(mount) in daemon.log()
        (backing / "scans").mkdir()
        (backing / "scans" / "remote.pdf").write_bytes(make_scan("pdf", 70))
        (backing / "top.png").write_bytes(make_scan("png", 71))
        wait_for(lambda: len(done(db)) == 2, 30, "files written on the server side to convert")
    assert outputs(folders["outbox"]) == ["scans/remote.docx", "top.docx"]


def test_inotify_watch_limit_falls_back_to_polling(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """Out of inotify watches, the daemon logs fs.inotify.max_user_watches and polls instead."""
    # Runs in a user namespace whose watch limit is 4.
    if (
        shutil.which("unshare") is None
        or subprocess.run(["unshare", "-Ur", "true"], check=False, capture_output=True).returncode
    ):
        if IN_CI:
            pytest.fail("CI must run the inotify limit test, but unshare -Ur does not work")
        pytest.skip("no user namespaces here")
    for i in range(12):
        (folders["inbox"] / f"dept {i}").mkdir()
    config = daemon_config(tmp_path, folders, emulator.url, rescan_interval=3600.0)
    log_path = tmp_path / "daemon.log"
    script = (
        "echo 4 > /proc/sys/user/max_inotify_watches && "
        f'exec "{sys.executable}" -m daemon run -c "{config}"'
    )
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["unshare", "-Ur", "sh", "-c", script], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_for(lambda: "start-up scan done" in log_path.read_text(), 30, "the daemon to start")
        text = log_path.read_text()
        assert "fs.inotify.max_user_watches" in text
        assert "watching by polling instead" in text
        (folders["inbox"] / "dept 7" / "late.jpg").write_bytes(make_scan("jpeg", 72))
        db = folders["state"] / "state.db"
        wait_for(lambda: "dept 7/late.jpg" in done(db), 30, "the file to convert by polling")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_reading_inbox_files_wakes_no_observer(tmp_path: Path) -> None:
    """Reading an inbox file makes no inotify event; only creations, writes and moves are seen."""
    # The daemon opens and reads inputs to hash and upload them.
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    seen: list[tuple[str, str]] = []

    class Recorder(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            seen.append((event.event_type, os.fsdecode(event.src_path)))

    async def main() -> None:
        watcher = Watcher(inbox, lambda path, is_dir: None, polling=False)
        watcher.start(asyncio.get_running_loop())
        try:
            (observer,) = watcher.observers
            (emitter,) = observer.emitters  # the one watch the watcher scheduled
            observer.add_handler_for_watch(Recorder(), emitter.watch)
            scan = inbox / "scan.pdf"
            scan.write_bytes(make_pdf(1))
            await until(lambda: ("closed", str(scan)) in seen, 10, "the write's events")
            seen.clear()
            for _ in range(3):
                with scan.open("rb") as stream:
                    stream.read()
            list(os.scandir(inbox))
            marker = inbox / "marker.pdf"
            marker.write_bytes(make_pdf(1))  # inotify keeps order: earlier events come first
            await until(lambda: ("closed", str(marker)) in seen, 10, "the marker's events")
        finally:
            watcher.stop()
        assert {path for _, path in seen} == {str(marker)}, seen

    asyncio.run(main())
