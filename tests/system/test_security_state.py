"""Issue #35, the state database: removed while running, lost, or on a full disk.

``rm state.db*`` while the daemon runs stops it with a clear error (exit 2); a daemon
started on a new, empty database adopts the outputs already in the outbox instead of
paying for their inputs again; a full disk under the database holds intake until space
is freed, and ``once`` still returns. Real subprocesses, real files, a real full
filesystem (a small tmpfs in a mount namespace of the daemon's own).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from daemon.emulator.hub import paid_conversions
from daemon.emulator.server import EmulatorServer
from daemon.inbox.enqueue import ADOPTED_NOTE
from tests.conftest import IN_CI, daemon_config
from tests.helpers import Daemon, cli, wait_for
from tests.intake_support import done, outputs, running
from tests.scans import make_scan

DB_CHECK_WINDOW = 6.0  # longer than the daemon's check of its database file (5 s)


def remove_database(state: Path) -> None:
    """``rm state.db*``."""
    for path in state.glob("state.db*"):
        path.unlink()


def test_removing_the_database_stops_the_daemon_with_a_clear_error(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """rm state.db* while running: the daemon stops within seconds, exit 2, and says why;
    while idle before that, it wrote nothing to the database."""
    (folders["inbox"] / "a.png").write_bytes(make_scan("png", 1))
    db = folders["state"] / "state.db"
    config = daemon_config(tmp_path, folders, emulator.url)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    assert daemon.proc is not None
    try:
        wait_for(lambda: "a.png" in done(db), 30, "the scan to convert")
        files = [db, db.with_name("state.db-wal")]
        before = [(p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        time.sleep(DB_CHECK_WINDOW)  # an idle spell to observe (nothing to synchronise with)
        assert [(p.stat().st_size, p.stat().st_mtime_ns) for p in files] == before
        remove_database(folders["state"])
        code = daemon.proc.wait(timeout=30)
    finally:
        daemon.stop()
    assert code == 2, daemon.log()[-2000:]
    assert "was removed or replaced while the daemon ran" in daemon.log()


def test_a_lost_database_adopts_outputs_instead_of_paying_again(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """After rm state.db*, a start adopts trivial.docx (a log line says so): no second
    payment and no trivial.pdf.docx; an output older than its input is not adopted."""
    inbox, outbox = folders["inbox"], folders["outbox"]
    (inbox / "trivial.pdf").write_bytes(make_scan("pdf", 1))
    config = daemon_config(tmp_path, folders, emulator.url)
    assert cli(config, "once").returncode == 0
    assert outputs(outbox) == ["trivial.docx"]
    remove_database(folders["state"])
    (inbox / "stale.png").write_bytes(make_scan("png", 2))  # newer than its "output" below
    shutil.copy(outbox / "trivial.docx", outbox / "stale.docx")
    os.utime(outbox / "stale.docx", ns=(0, (inbox / "stale.png").stat().st_mtime_ns - 10**9))
    second = cli(config, "once")
    assert second.returncode == 0, second.stdout + second.stderr
    assert outputs(outbox) == ["stale.docx", "stale.png.docx", "trivial.docx"]
    assert paid_conversions(emulator.hub.ledger()) == 2  # trivial once, stale once
    assert "output already in the outbox adopted" in second.stdout + second.stderr
    jobs = {job["path"]: job for job in _jobs(config)}
    assert jobs["trivial.pdf"]["status"] == "completed"
    assert jobs["trivial.pdf"]["error"] == {"code": "adopted", "message": ADOPTED_NOTE}


def _jobs(config: Path) -> list[dict[str, object]]:
    result = cli(config, "jobs", "--json")
    assert result.returncode == 0, result.stderr
    parsed: list[dict[str, object]] = json.loads(result.stdout)
    return parsed


# -- a full disk under the state database ----------------------------------------------


def namespaces_work() -> bool:
    """Whether this process may mount a tmpfs in a mount namespace of its own."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


@pytest.fixture
def small_state_disk() -> None:
    """Skip unless a small tmpfs can be mounted privately (root); CI must be able to."""
    if not namespaces_work():
        if IN_CI:
            pytest.fail("CI must run the full-disk tests, but mount namespaces do not work")
        pytest.skip("needs root and unshare/nsenter to mount a private tmpfs")


def in_namespace(pid: int, *command: str) -> None:
    """Run ``command`` in the mount namespace of process ``pid``."""
    subprocess.run(["nsenter", "-t", str(pid), "-m", "--", *command], check=False, timeout=30)


def on_small_disk(state: Path, *command: str) -> list[str]:
    """``command`` run with a 16 MiB tmpfs mounted over ``state`` in its own namespace."""
    script = 'mount -t tmpfs -o size=16m tmpfs "$0" && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, str(state), *command]


def clean_env() -> dict[str, str]:
    """The environment of a daemon under test (no LDX_HOTFOLDER_ settings leaking in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDX_HOTFOLDER_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.usefixtures("small_state_disk")
def test_a_full_state_disk_holds_intake_which_recovers(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """The state disk fills up: intake holds (no crash, no restart), and takes the scans
    once space is freed."""
    state = folders["state"]
    config = daemon_config(tmp_path, folders, emulator.url, min_free_space_mb=0)
    log_path = tmp_path / "daemon.log"
    command = on_small_disk(state, sys.executable, "-m", "daemon", "run", "-c", str(config))
    with log_path.open("ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=clean_env())
    try:
        wait_for(lambda: "start-up scan done" in log_path.read_text(), 30, "the daemon to start")
        in_namespace(proc.pid, "sh", "-c", f'cat /dev/zero > "{state}/filler"')
        for seed in range(3):
            (folders["inbox"] / f"scan-{seed}.png").write_bytes(make_scan("png", seed))
        wait_for(lambda: "intake holds" in log_path.read_text(), 30, "intake to hold")
        assert proc.poll() is None
        in_namespace(proc.pid, "rm", f"{state}/filler")
        wait_for(lambda: len(outputs(folders["outbox"])) == 3, 60, "the scans to convert")
        text = log_path.read_text()
        assert "the state database works again; intake resumes" in text
    finally:
        proc.terminate()
        code = proc.wait(timeout=30)
    assert code == 0, log_path.read_text()[-3000:]
    assert "intake" not in _dead_parts(log_path.read_text())


def _dead_parts(log: str) -> str:
    """The log lines of parts that died (the supervisor's complaints)."""
    return "\n".join(line for line in log.splitlines() if "died" in line or "unhealthy" in line)


ONCE = textwrap.dedent(
    """
    import asyncio, os, sys
    from pathlib import Path
    from daemon.config import load_settings
    from daemon.service import Service, prepare

    def fill(folder):
        fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, bytes(1 << 20))
        except OSError:
            pass
        finally:
            os.close(fd)

    async def main():
        settings = load_settings(Path(sys.argv[1]))
        service = Service(settings, prepare(settings), once=True, max_wait=3.0)
        runner = asyncio.create_task(service.run())
        await service.ready.wait()  # started; the scan is taken after the quiet period
        fill(Path(sys.argv[2]))
        outcome = await runner
        print("held:", outcome.held, flush=True)
        return outcome.exit_code

    sys.exit(asyncio.run(main()))
    """
)


@pytest.mark.usefixtures("small_state_disk")
def test_once_returns_on_a_full_state_disk(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """``once`` with the state disk full returns (work held, exit 3) instead of hanging."""
    state = folders["state"]
    (folders["inbox"] / "scan.png").write_bytes(make_scan("png", 1))
    config = daemon_config(tmp_path, folders, emulator.url, min_free_space_mb=0, quiet_period=2.0)
    command = on_small_disk(state, sys.executable, "-c", ONCE, str(config), str(state))
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=clean_env(), check=False
    )
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-3000:]
    assert "held: the state database failed" in result.stdout
    assert "intake holds" in result.stdout + result.stderr
    with running(config, tmp_path / "daemon.log"):  # room again (no tmpfs): it converts
        wait_for(lambda: outputs(folders["outbox"]) == ["scan.docx"], 60, "the scan to convert")
