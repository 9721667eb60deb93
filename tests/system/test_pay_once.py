"""Pay once, and never fail a scan for a transient cause (issue #37, cases a and b), with
the real daemon as a subprocess and the emulator on loopback; paid conversions are read
from the emulator's ledger."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.emulator.hub import HubSettings, paid_conversions
from daemon.emulator.server import EmulatorServer
from daemon.outbox.verify import verify_package
from tests.conftest import IN_CI, daemon_config
from tests.faults import job_rows
from tests.helpers import Daemon, cli, wait_for
from tests.scans import make_scan


def mount_read_only(path: Path) -> bool:
    """A read-only tmpfs at ``path`` (False when mounting is not allowed here)."""
    path.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return made.returncode == 0


def test_a_retry_after_a_read_only_folder_publishes_without_paying_again(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """Outputs arriving in a read-only folder are kept; `once` ends (exit 1) instead of
    hanging; once the folder is writable, `retry --failed` publishes them, paying nothing."""
    shelf = folders["outbox"] / "shelf"
    if not mount_read_only(shelf):
        if IN_CI:
            pytest.fail("CI must run the read-only folder test, but tmpfs cannot be mounted")
        pytest.skip("mounting a tmpfs needs root")
    try:
        (folders["inbox"] / "shelf").mkdir()
        for n in range(3):
            (folders["inbox"] / "shelf" / f"s{n}.png").write_bytes(make_scan("png", 30 + n))
        config = daemon_config(tmp_path, folders, emulator.url, max_attempts=1)
        first = cli(config, "once")
        assert first.returncode == 1, first.stdout + first.stderr
        rows = job_rows(folders["state"] / "state.db")
        assert {row["error_code"] for row in rows} == {"publish_failed"}
        assert paid_conversions(emulator.hub.ledger()) == 3
        subprocess.run(["mount", "-o", "remount,rw", str(shelf)], check=True)
        retried = cli(config, "retry", "--failed")
        assert retried.returncode == 0, retried.stderr
        again = cli(config, "once")
        assert again.returncode == 0, again.stdout + again.stderr
        for n in range(3):
            verify_package(shelf / f"s{n}.docx", "docx")
    finally:
        subprocess.run(["umount", "-l", str(shelf)], check=False)
    assert paid_conversions(emulator.hub.ledger()) == 3, "the kept outputs cost nothing more"


def error_files(outbox: Path) -> list[Path]:
    """Every error file under the outbox."""
    return sorted(outbox.rglob("*.error.txt"))


@pytest.mark.timeout(300)
def test_b_an_outage_longer_than_every_retry_budget_fails_nothing(
    tmp_path: Path, folders: dict[str, Path], fault_counts: Callable[[str, str], None]
) -> None:
    """The hub unreachable for longer than any retry budget: nothing fails, no error file;
    every scan converts once within seconds of the hub's return."""
    with EmulatorServer(HubSettings(processing_time=0.5, seed=3)) as server:
        server.hub.update_knobs({"outage": True, "outage_mode": "drop"})
        config = daemon_config(
            tmp_path, folders, server.url, max_attempts=1, auth_recheck_interval=2.0
        )
        daemon = Daemon(config, tmp_path / "daemon.log").start()
        try:
            for n in range(6):
                (folders["inbox"] / f"s{n}.png").write_bytes(make_scan("png", 40 + n))
            wait_for(lambda: "hub unreachable since" in daemon.log(), 60, "the hold")
            held = time.monotonic()
            # Longer than every budget: 1 attempt, and more probes than any retry count.
            wait_for(lambda: server.hub.ledger()["faults"]["outage"] >= 15, 120, "probes meanwhile")
            rows = job_rows(folders["state"] / "state.db")
            assert len(rows) == 6
            assert all(row["status"] in ("queued", "processing") for row in rows)
            assert error_files(folders["outbox"]) == []
            server.hub.update_knobs({"outage": False})
            back = time.monotonic()
            wait_for(
                lambda: (
                    [r["status"] for r in job_rows(folders["state"] / "state.db")]
                    == ["completed"] * 6
                ),
                60,
                "every scan to convert after the hub's return",
            )
            recovered = time.monotonic() - back
        finally:
            assert daemon.stop() == 0
        fault_counts(
            "outage",
            f"held {back - held:.0f} s, 0 failed, 0 error files; all 6 converted "
            f"{recovered:.1f} s after the hub's return",
        )
        assert error_files(folders["outbox"]) == []
        assert paid_conversions(server.hub.ledger()) == 6
        assert "the hub answers again" in daemon.log()
        assert recovered < 35  # the probe interval (2 s here, at most 30 s) plus the work


def test_b_once_exits_3_when_work_stays_held_and_leaves_it_queued(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    """`once` with the hub down: past --max-wait it exits 3, the scans still queued."""
    with EmulatorServer(HubSettings(processing_time=0.2)) as server:
        server.hub.update_knobs({"outage": True, "outage_mode": "503"})
        (folders["inbox"] / "a.png").write_bytes(make_scan("png", 50))
        config = daemon_config(tmp_path, folders, server.url)
        result = cli(config, "once", "--max-wait", "5s")
        assert result.returncode == 3, result.stdout + result.stderr
        assert "hub unreachable" in result.stderr
        (row,) = job_rows(folders["state"] / "state.db")
        assert row["status"] in ("queued", "processing")
        assert error_files(folders["outbox"]) == []
        server.hub.update_knobs({"outage": False})
        assert cli(config, "once").returncode == 0
