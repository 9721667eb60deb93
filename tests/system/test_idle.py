"""Idle means idle: a running daemon with nothing to do writes nothing to disk."""

from __future__ import annotations

from pathlib import Path

from daemon.config import load_settings
from daemon.emulator.hub import HubSettings as EmulatorSettings
from daemon.emulator.server import EmulatorServer
from daemon.ops.healthsock import ask
from tests.conftest import daemon_config
from tests.helpers import Daemon, cli, wait_for
from tests.scans import make_scan

KNOWN_FILES = 240
BEAT = 0.25  # heartbeat_interval: the monitor runs four times a second
BEATS = 12  # the window: this many heartbeat intervals


def io_counters(pid: int) -> dict[str, int]:
    """``/proc/PID/io``: what the process read and wrote (write_bytes: to storage)."""
    lines = Path(f"/proc/{pid}/io").read_text(encoding="ascii").splitlines()
    return {name: int(value) for name, value in (line.split(": ") for line in lines)}


def files_under(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder below ``folders``: (size, mtime in ns)."""
    found = {}
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            st = path.lstat()
            found[str(path)] = (st.st_size, st.st_mtime_ns)
    return found


def test_an_idle_daemon_writes_nothing(tmp_path: Path, folders: dict[str, Path]) -> None:
    """With a few hundred known files and nothing to do, the daemon writes 0 bytes over
    many heartbeat intervals, while health still answers with fresh beats."""
    for number in range(KNOWN_FILES):
        (folders["inbox"] / f"scan-{number:03d}.pdf").write_bytes(make_scan("pdf", seed=number))
    with EmulatorServer(EmulatorSettings(processing_time=0.02, seed=5)) as hub:
        config = daemon_config(
            tmp_path, folders, hub.url, max_in_flight=64, heartbeat_interval=BEAT
        )
        converted = cli(config, "once", timeout=300)
        assert converted.returncode == 0, converted.stderr[-2000:]
        assert f"{KNOWN_FILES} completed" in converted.stdout
        socket_path = load_settings(config).health_socket_path
        daemon = Daemon(config, tmp_path / "daemon.log").start()
        try:
            first = wait_for(lambda: ask(socket_path), 60, "the daemon to answer health")
            assert daemon.proc is not None
            pid = daemon.proc.pid
            before = io_counters(pid), files_under(*folders.values())
            last = wait_for(
                lambda: (
                    (beat := ask(socket_path)) and beat.time >= first.time + BEATS * BEAT and beat
                ),
                30,
                f"{BEATS} more heartbeats",
            )
            after = io_counters(pid), files_under(*folders.values())
            assert daemon.proc.poll() is None
        finally:
            assert daemon.stop() == 0
    assert last.healthy
    assert last.counts["completed"] == KNOWN_FILES
    assert before[0]["wchar"] > 0  # the counters count: the start was logged
    assert after[0]["write_bytes"] - before[0]["write_bytes"] == 0
    assert after[1] == before[1]  # no file in the inbox, outbox or state folder changed
    assert "job completed" not in daemon.log()  # nothing was converted again
