"""Fault injection: HTTP faults from the emulator, crashes at every step, a full disk."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import subprocess
import sys
import time
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import HubSettings, load_settings
from daemon.emulator.app import STALL_EVENT
from daemon.emulator.hub import DEFAULT_API_KEY
from daemon.emulator.hub import HubSettings as EmulatorSettings
from daemon.emulator.server import EmulatorServer
from daemon.hub.client import HubClient
from daemon.ops.failpoints import POINTS
from daemon.outbox.layout import TEMP_MARKER
from daemon.outbox.verify import verify_package
from daemon.service import run_service
from tests.conftest import IN_CI, daemon_config
from tests.faults import assert_exactly_once, failures, job_rows, outbox_files
from tests.helpers import Daemon, daemon_in_process, wait_async, wait_for
from tests.scans import drop_scans, make_scan


def test_http_faults_every_file_completes(
    tmp_path: Path, folders: dict[str, Path], fault_counts: Callable[[str, str], None]
) -> None:
    """5xx, 429, drops, hub job failures and a stalled body: all files still complete."""
    faults = {
        "error_rate": 0.10,
        "rate_limit_rate": 0.05,
        "retry_after": 1.5,
        "drop_rate": 0.02,
        "job_failure_rate": 0.05,
        "stall_downloads": 1,
    }
    emulator_settings = EmulatorSettings(processing_time=0.2, seed=3)
    with EmulatorServer(emulator_settings) as server:
        server.hub.update_faults(faults)
        inputs = drop_scans(folders["inbox"], 40)
        config = daemon_config(
            tmp_path,
            folders,
            server.url,
            max_attempts=30,
            resubmit_delay=0.3,
            hub={"deadline": 3.0, "timeout": 30.0},
        )
        outcome = asyncio.run(run_service(load_settings(config), once=True))
        assert outcome is not None
        assert outcome.exit_code == 0, failures(folders["state"] / "state.db")
        ledger = server.hub.ledger()
        assert_exactly_once(inputs, folders["outbox"], folders["state"] / "state.db", server.hub)
        counts = ledger["faults"]
        assert counts["error"] > 0
        assert counts["rate_limit"] > 0
        assert counts["drop"] > 0
        assert counts["job_failure"] > 0
        assert counts["stall"] == 1
        retry_afters = check_retry_after_honoured(ledger["events"])
        held, allowed = check_stall_abandoned_at_deadline(
            ledger["events"], load_settings(config).hub
        )
        injected = ", ".join(f"{counts[kind]} {kind}" for kind in sorted(counts) if counts[kind])
        fault_counts(
            "HTTP faults",
            f"40 files completed, {len(ledger['jobs'])} remote jobs; injected {injected}; "
            f"{retry_afters} retries after Retry-After, none early; stalled download "
            f"abandoned after {held:.2f} s (deadline {allowed:.2f} s)",
        )


def by_trace(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        if event["trace"]:
            grouped[event["trace"]].append(event)
    return grouped


def check_retry_after_honoured(events: list[dict[str, Any]]) -> int:
    """After an answer with Retry-After (429), the same job's next request comes at least
    that long after the answer was sent (the client cannot have seen it sooner); return
    how many retries were checked."""
    checked = 0
    for trail in by_trace(events).values():
        requests = sorted((e for e in trail if "answered" in e), key=lambda e: e["at"])
        for before, after in itertools.pairwise(requests):
            if before["retry_after"] is not None:
                assert before["status"] == 429, before
                # 5 ms for the worker's wall-clock schedule against the emulator's monotonic
                waited = after["at"] - before["answered"]
                assert waited >= before["retry_after"] - 0.005, (before, after)
                checked += 1
    assert checked > 0
    return checked


# How much later than its deadline the client may be seen to give up: the emulator notices
# the closed connection on its own thread, and two busy cores can delay both loops. Without
# the deadline the stall would last until httpx's read timeout (30 s in this test).
STALL_NOTICE_SLACK = 2.0


def check_stall_abandoned_at_deadline(
    events: list[dict[str, Any]], hub: HubSettings
) -> tuple[float, float]:
    """The client hung up on the stalled download at its deadline, then fetched it again;
    return how long it held on and its deadline."""
    ends = [e for e in events if e["route"] == STALL_EVENT]
    assert len(ends) == 1, ends
    end = ends[0]
    assert end["status"] == "client gave up", end
    # The client's clock starts when the headers arrive (after ``held_from``) and allows
    # the deadline plus the time the announced length takes at the minimum rate.
    allowed = hub.deadline + end["length"] / hub.min_transfer_rate
    held = end["at"] - end["held_from"]
    assert allowed - 0.01 <= held <= allowed + STALL_NOTICE_SLACK, (held, allowed)
    retries = [
        e
        for e in by_trace(events)[end["trace"]]
        if e["route"] == "GET /files/{file_id}/content" and e["status"] == 200
        if e["path"] == end["path"] and e["at"] > end["held_from"]
    ]
    assert retries, "the stalled download was fetched again"
    return held, allowed


@pytest.fixture(scope="module")
def shared_hub() -> Iterator[EmulatorServer]:
    """One emulator for the failpoint sweep (its ledger is reset per case)."""
    with EmulatorServer(EmulatorSettings(processing_time=0.1, seed=9)) as server:
        yield server


def run_once(config: Path, failpoint: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDX_HOTFOLDER_")}
    if failpoint:
        env["LDX_HOTFOLDER_FAILPOINT"] = failpoint
    return subprocess.run(
        [sys.executable, "-m", "daemon", "once", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def archived(archive: Path) -> list[str]:
    """Every file under the archive folder, relative, sorted."""
    return sorted(p.relative_to(archive).as_posix() for p in archive.rglob("*") if p.is_file())


@pytest.mark.parametrize("hit", [1, 2, 3])
@pytest.mark.parametrize("point", POINTS)
def test_crash_at_each_step_recovers(
    tmp_path: Path,
    folders: dict[str, Path],
    shared_hub: EmulatorServer,
    fault_counts: Callable[[str, str], None],
    point: str,
    hit: int,
) -> None:
    """A crash at any step, at any of its first 3 hits, recovers to exactly one output each."""
    # Recovery adopts what the hub already has; a second start changes nothing.
    shared_hub.hub.reset_ledger()
    inputs = drop_scans(folders["inbox"], 3, seed=hit)
    archive = str(tmp_path / "archive")
    config = daemon_config(
        tmp_path,
        folders,
        shared_hub.url,
        on_success="archive",
        archive_dir=archive,
        quiet_period=0.1,
    )
    crashed = run_once(config, f"{point}:{hit}")
    assert crashed.returncode == 137, crashed.stderr[-2000:]
    assert once_in_process(config) == 0
    db = folders["state"] / "state.db"
    assert_exactly_once(inputs, folders["outbox"], db, shared_hub.hub)
    ledger = shared_hub.hub.ledger()
    # An upload or a job the crash left unrecorded is adopted from GET /files or
    # GET /renderocr/jobs: nothing is sent or paid for twice.
    assert len(ledger["uploads"]) == len(inputs), "no upload repeated"
    assert len(ledger["jobs"]) == len(inputs), "no remote job repeated"
    assert archived(tmp_path / "archive") == sorted(inputs)
    # A second start finds nothing to do and changes nothing.
    rows, files = job_rows(db), outbox_files(folders["outbox"])
    assert once_in_process(config) == 0
    assert job_rows(db) == rows
    assert outbox_files(folders["outbox"]) == files
    assert archived(tmp_path / "archive") == sorted(inputs)
    again = shared_hub.hub.ledger()
    assert (len(again["uploads"]), len(again["jobs"])) == (len(inputs), len(inputs))
    fault_counts(
        "failpoints",
        f"crash at {point}:{hit} -> {len(inputs)} outputs, {len(again['uploads'])} uploads, "
        f"{len(again['jobs'])} remote jobs; second start a no-op",
    )


def test_a_lost_upload_is_never_taken_for_another_input_of_the_same_name_and_size(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """After a crash before uploads are recorded, each input adopts its own upload only."""
    # Two scanners' fixed-size BMPs: same name, same size, different pixels. The crash
    # comes after the second upload reached the hub, before its id was recorded.
    contents = {f"s{n}/scan.bmp": make_scan("bmp", 50 + n) for n in (1, 2)}
    assert len({len(data) for data in contents.values()}) == 1
    for rel, data in contents.items():
        (folders["inbox"] / rel).parent.mkdir()
        (folders["inbox"] / rel).write_bytes(data)
    config = daemon_config(tmp_path, folders, emulator.url, quiet_period=0.1)
    crashed = run_once(config, "after-upload:2")
    assert crashed.returncode == 137, crashed.stderr[-2000:]
    assert once_in_process(config) == 0
    assert len(emulator.hub.ledger()["uploads"]) == 2, "both uploads adopted, none repeated"
    for rel, data in contents.items():
        # The emulator titles each output after the name of the upload it converted.
        output = folders["outbox"] / Path(rel).with_suffix(".docx")
        with zipfile.ZipFile(output) as package:
            title = package.read("docProps/core.xml").decode()
        assert f".ldx-{hashlib.sha256(data).hexdigest()[:16]}.bmp" in title, rel


def test_a_job_created_before_its_upload_was_recorded_is_adopted(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """A crash after the hub created the job of an unrecorded upload: both are adopted."""
    (folders["inbox"] / "a.png").write_bytes(make_scan("png", 12))
    config = daemon_config(tmp_path, folders, emulator.url, quiet_period=0.1)
    crashed = run_once(config, "after-upload:1")
    assert crashed.returncode == 137, crashed.stderr[-2000:]
    (upload,) = emulator.hub.ledger()["uploads"]
    assert emulator.hub.ledger()["jobs"] == []

    async def create() -> None:
        async with HubClient.connect(emulator.url, DEFAULT_API_KEY) as hub:
            await hub.create_job(upload["file_id"], "ki/ocr", "jpn", "docx")

    asyncio.run(create())
    assert once_in_process(config) == 0
    ledger = emulator.hub.ledger()
    assert (len(ledger["uploads"]), len(ledger["jobs"])) == (1, 1), "nothing sent twice"
    verify_package(folders["outbox"] / "a.docx", "docx")  # raises unless a whole docx


def test_a_failed_download_resumes_the_job_it_belongs_to(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """A download that fails after upload and create were done in one call is retried
    from the recorded job: nothing is uploaded or converted twice."""
    emulator.hub.update_faults({"stall_downloads": 1})
    (folders["inbox"] / "a.png").write_bytes(make_scan("png", 13))
    config = daemon_config(tmp_path, folders, emulator.url, quiet_period=0.1, hub={"deadline": 1.0})
    assert once_in_process(config) == 0
    ledger = emulator.hub.ledger()
    assert ledger["faults"]["stall"] == 1
    assert (len(ledger["uploads"]), len(ledger["jobs"])) == (1, 1)
    assert len(ledger["downloads"]) == 2, "the stalled download was fetched again"
    verify_package(folders["outbox"] / "a.docx", "docx")  # raises unless a whole docx


def once_in_process(config: Path) -> int:
    """Run ``once`` in this process; return its exit code."""
    outcome = asyncio.run(run_service(load_settings(config), once=True))
    assert outcome is not None
    return outcome.exit_code


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


@pytest.fixture
def small_outbox(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs to use as the outbox (root only)."""
    path = tmp_path / "small"
    if not mount_tmpfs(path, "512k"):
        if os.environ.get("CI"):
            pytest.fail("CI runs as root and must be able to mount a tmpfs")
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path, leave: int) -> Path:
    """Fill the filesystem of ``folder`` until about ``leave`` bytes are free."""
    filler = folder / "filler.bin"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with filler.open("wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


def test_full_disk_keeps_jobs_and_resumes(
    tmp_path: Path,
    folders: dict[str, Path],
    small_outbox: Path,
    emulator: EmulatorServer,
    fault_counts: Callable[[str, str], None],
) -> None:
    """ENOSPC on the outbox: no partial output, nothing failed, all done once space is back."""
    folders = {**folders, "outbox": small_outbox}
    inputs = drop_scans(folders["inbox"], 6, seed=4)
    filler = fill(small_outbox, leave=2048)
    config = daemon_config(tmp_path, folders, emulator.url, min_free_space_mb=0)
    settings = load_settings(config)
    db = folders["state"] / "state.db"

    async def scenario() -> None:
        async with daemon_in_process(settings):
            await wait_async(lambda: any(r["error_code"] == "disk_full" for r in job_rows(db)))
            rows = job_rows(db)
            held.extend(r for r in rows if r["error_code"] == "disk_full")
            assert not [r for r in rows if r["status"] == "failed"]
            for name in outbox_files(small_outbox):
                if name == "filler.bin" or TEMP_MARKER in name:
                    continue  # a download in progress is only ever under a hidden name
                verify_package(small_outbox / name, "docx")  # never a partial output
            filler.unlink()
            await wait_async(lambda: [r["status"] for r in job_rows(db)] == ["completed"] * 6, 40)

    held: list[dict[str, Any]] = []
    asyncio.run(scenario())
    assert_exactly_once(inputs, small_outbox, db, emulator.hub)
    fault_counts(
        "full disk",
        f"{len(inputs)} files on a 512 KiB tmpfs: {len(held)} held on ENOSPC, none failed, "
        f"no partial output; all {len(inputs)} completed once space was freed",
    )


def test_low_space_pauses_intake_with_one_message(
    tmp_path: Path,
    folders: dict[str, Path],
    small_outbox: Path,
    emulator: EmulatorServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Below the watermark nothing is taken; one log line; it resumes once space is freed."""
    folders = {**folders, "outbox": small_outbox}
    filler = fill(small_outbox, leave=100 * 1024)
    config = daemon_config(tmp_path, folders, emulator.url, min_free_space_mb=0.2)
    settings = load_settings(config)
    db = folders["state"] / "state.db"

    async def scenario() -> None:
        async with daemon_in_process(settings) as service:
            inputs = drop_scans(folders["inbox"], 3, seed=5)
            await wait_async(lambda: service.intake.paused and len(service.intake.sightings) == 3)
            assert job_rows(db) == []
            filler.unlink()
            await wait_async(lambda: len(outbox_files(small_outbox)) == len(inputs), 30)

    asyncio.run(scenario())
    captured = capsys.readouterr()
    logged = captured.out + captured.err
    assert logged.count("free disk space is low") == 1
    assert "free disk space is back" in logged


def test_a_job_failed_publishing_is_rearmed_without_a_new_conversion(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """An output whose folder is read-only is kept; the re-arm publishes it, paying nothing."""
    read_only = folders["outbox"] / "sub"
    if not mount_tmpfs(read_only, "1m"):
        if IN_CI:
            pytest.fail("CI must run the read-only folder test, but tmpfs cannot be mounted")
        pytest.skip("mounting a tmpfs needs root")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(read_only)], check=True)
        (folders["inbox"] / "sub").mkdir()
        (folders["inbox"] / "sub" / "a.png").write_bytes(make_scan("png", 21))
        config = daemon_config(
            tmp_path, folders, emulator.url, max_attempts=1, auto_retry_after=0.5
        )
        first = asyncio.run(run_service(load_settings(config), once=True))
        assert first is not None
        assert first.exit_code == 1
        (row,) = job_rows(folders["state"] / "state.db")
        assert row["error_code"] == "publish_failed"
        assert "is kept by the daemon" in row["error_message"]
        subprocess.run(["mount", "-o", "remount,rw", str(read_only)], check=True)

        async def scenario() -> None:
            async with daemon_in_process(load_settings(config)):
                db = folders["state"] / "state.db"
                await wait_async(lambda: job_rows(db)[0]["status"] == "completed", 20)

        asyncio.run(scenario())
        verify_package(read_only / "a.docx", "docx")
    finally:
        subprocess.run(["umount", "-l", str(read_only)], check=False)
    assert job_rows(folders["state"] / "state.db")[0]["rearms"] == 1
    assert len(emulator.hub.ledger()["jobs"]) == 1, "the kept output cost no new conversion"
    assert not list((folders["state"] / "held").iterdir())


def test_sigterm_stops_cleanly_and_resumes(tmp_path: Path, folders: dict[str, Path]) -> None:
    """SIGTERM mid-work exits 0 within the grace bound; a restart repeats and loses nothing."""
    with EmulatorServer(EmulatorSettings(processing_time=2.0, seed=2)) as server:
        inputs = drop_scans(folders["inbox"], 10, seed=6)
        config = daemon_config(tmp_path, folders, server.url)
        db = folders["state"] / "state.db"
        daemon = Daemon(config, tmp_path / "daemon.log").start()
        wait_for(
            lambda: db.exists() and any(r["remote_job_id"] for r in job_rows(db)),
            30,
            "a job to be at the hub",
        )
        stopping = time.monotonic()
        assert daemon.stop(timeout=30) == 0
        assert time.monotonic() - stopping < 15
        assert "stopped" in daemon.log()
        restarted = Daemon(config, tmp_path / "daemon2.log").start()
        try:
            wait_for(
                lambda: [r["status"] for r in job_rows(db)] == ["completed"] * 10,
                60,
                "every job to complete after the restart",
            )
        finally:
            assert restarted.stop() == 0
        assert_exactly_once(inputs, folders["outbox"], db, server.hub)
        ledger = server.hub.ledger()
        assert len(ledger["uploads"]) == 10
        assert len(ledger["jobs"]) == 10
