"""systemd notifications over real datagram sockets: readiness, status, watchdog, reload."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.config import load_settings
from daemon.emulator.server import EmulatorServer
from daemon.ops.notify import Notifier, message, socket_address, watchdog_interval
from daemon.service import Service, prepare
from tests.conftest import daemon_config
from tests.helpers import Daemon, wait_for
from tests.scans import make_scan


@pytest.fixture
def listener() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket on an abstract address, as systemd's, and its ``@name``."""
    name = f"@ldx-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(socket_address(name))
    sock.setblocking(False)
    yield name, sock
    sock.close()


def drain(sock: socket.socket, into: list[str]) -> list[str]:
    """Append every datagram waiting on ``sock`` to ``into``; return ``into``."""
    while True:
        try:
            into.append(sock.recv(65536).decode("utf-8"))
        except BlockingIOError:
            return into


def test_message_format() -> None:
    """A notification is KEY=value lines; a newline in a value cannot add a line."""
    assert message(READY=1, STATUS="a\nb") == b"READY=1\nSTATUS=a b"


def test_notifier_sends_to_a_socket_path(tmp_path: Path) -> None:
    """READY=1 and STATUS= arrive as one datagram on a socket given by path."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        assert Notifier(str(path)).ready("3 queued")
        assert sock.recv(4096) == b"READY=1\nSTATUS=3 queued"


def test_notifier_sends_to_an_abstract_socket(listener: tuple[str, socket.socket]) -> None:
    """An ``@name`` address reaches the abstract socket ``\\0name``."""
    name, sock = listener
    assert Notifier(name).watchdog()
    assert wait_for(lambda: drain(sock, []), 5, "the datagram") == ["WATCHDOG=1"]


def test_notifier_without_socket_does_nothing(tmp_path: Path) -> None:
    """Outside systemd (no socket) nothing is sent; a vanished socket is not an error."""
    assert not Notifier(None).ready("x")
    assert not Notifier(str(tmp_path / "gone.sock")).status("x")


def test_watchdog_interval_is_half_the_timeout() -> None:
    """Pings go out at half WATCHDOG_USEC, only for the process WATCHDOG_PID names."""
    assert watchdog_interval(60_000_000, None, 42) == 30.0
    assert watchdog_interval(60_000_000, 42, 42) == 30.0
    assert watchdog_interval(60_000_000, 7, 42) is None
    assert watchdog_interval(None, None, 42) is None
    assert watchdog_interval(0, None, 42) is None


def test_daemon_talks_to_systemd(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    listener: tuple[str, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """READY=1 after the scan, STATUS= with counts, WATCHDOG=1, RELOADING on SIGHUP, STOPPING."""
    name, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    (folders["inbox"] / "scan.pdf").write_bytes(make_scan("pdf", seed=1))
    config = daemon_config(tmp_path, folders, emulator.url, heartbeat_interval=5.0)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    got: list[str] = []
    try:
        wait_for(lambda: any("READY=1" in m for m in drain(sock, got)), 30, "READY=1")
        ready = next(m for m in got if "READY=1" in m)
        counts = re.findall(r"\d+ (queued|processing|completed|failed)", ready)
        assert counts == ["queued", "processing", "completed", "failed"], ready
        # READY goes out after the first scan (which found the file), then "ready" is logged.
        wait_for(lambda: '"event": "ready"' in daemon.log(), 10, "the ready log line")
        events = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
        order = [e["event"] for e in events if e["event"] in ("start-up scan done", "ready")]
        assert order == ["start-up scan done", "ready"]
        assert next(e for e in events if e["event"] == "start-up scan done")["new_files"] == 1
        wait_for(
            lambda: any("1 completed" in m for m in drain(sock, got)), 30, "STATUS with 1 completed"
        )
        # WATCHDOG_USEC=1 s makes the daemon beat every 0.5 s despite heartbeat_interval=5.
        wait_for(lambda: drain(sock, got).count("WATCHDOG=1") >= 3, 30, "watchdog pings")
        daemon_config(tmp_path, folders, emulator.url, max_in_flight=3, log_level="debug")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any("RELOADING=1" in m for m in drain(sock, got)), 30, "RELOADING=1")
        after = got[next(i for i, m in enumerate(got) if "RELOADING=1" in m) :]
        wait_for(lambda: any("READY=1" in m for m in after + drain(sock, [])), 30, "READY again")
        wait_for(lambda: "take effect only after a restart" in daemon.log(), 10, "reload log")
    finally:
        assert daemon.stop() == 0
    drain(sock, got)
    assert any("STOPPING=1" in m for m in got)
    log = daemon.log()
    assert "configuration reloaded" in log
    assert '"max_in_flight"' in log
    assert '"applied": ["log_level"]' in log


class Mailbox:
    """Collects the datagrams of a socket from the event loop, for in-process services."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.got: list[str] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start receiving in the background."""
        self._task = asyncio.create_task(self._receive())

    async def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.got.append((await loop.sock_recv(self.sock, 65536)).decode("utf-8"))
            self._changed.set()

    async def until(self, predicate: Callable[[list[str]], bool], timeout: float) -> None:
        """Wait until ``predicate(messages)`` holds; fail after ``timeout`` seconds."""

        async def watch() -> None:
            while not predicate(self.got):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(watch(), timeout)

    async def stop(self) -> list[str]:
        """Stop receiving; return every message, in order."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return drain(self.sock, self.got)


def has_ready(got: list[str]) -> bool:
    return any("READY=1" in m for m in got)


def _unhealthy_stretch(got: list[str]) -> list[str]:
    """The messages from the first UNHEALTHY status up to the next healthy status."""
    start = next(i for i, m in enumerate(got) if "UNHEALTHY" in m)
    rest = got[start:]
    healthy = (i for i, m in enumerate(rest) if m.startswith("STATUS=") and "UNHEALTHY" not in m)
    return rest[: next(healthy, len(rest))]


def test_dead_pipeline_stops_the_watchdog_and_exits(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    listener: tuple[str, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dead pipeline loop: no more WATCHDOG=1, STATUS says why, the daemon exits (70)."""
    name, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    config = daemon_config(
        tmp_path, folders, emulator.url, heartbeat_interval=0.1, stall_timeout=1.0
    )
    settings = load_settings(config)
    mailbox = Mailbox(sock)

    async def scenario() -> Service:
        mailbox.start()
        service = Service(settings, prepare(settings), once=False)
        runner = asyncio.create_task(service.run())
        await mailbox.until(has_ready, 30)
        service.tasks["pipeline"].cancel()
        await asyncio.wait_for(runner, 30)
        await mailbox.stop()
        return service

    service = asyncio.run(scenario())
    got = mailbox.got
    assert service.supervisor is not None
    assert service.supervisor.failure is not None
    assert "pipeline has stopped" in service.supervisor.failure
    stretch = _unhealthy_stretch(got)
    assert "WATCHDOG=1" not in stretch
    assert "pipeline has stopped" in stretch[0]
    assert any("STOPPING=1" in m for m in stretch)


def test_dead_watcher_holds_the_watchdog_until_restarted(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    listener: tuple[str, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dead watcher: STATUS says blind and WATCHDOG=1 pauses until intake restarts it."""
    name, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    config = daemon_config(
        tmp_path, folders, emulator.url, heartbeat_interval=0.1, stall_timeout=30.0
    )
    settings = load_settings(config)
    mailbox = Mailbox(sock)

    def recovered(got: list[str]) -> bool:
        sick = next((i for i, m in enumerate(got) if "UNHEALTHY" in m), None)
        return sick is not None and "WATCHDOG=1" in got[sick:]

    async def scenario() -> Service:
        mailbox.start()
        service = Service(settings, prepare(settings), once=False)
        runner = asyncio.create_task(service.run())
        await mailbox.until(has_ready, 30)
        assert service.watcher is not None
        service.watcher.stop()
        try:
            await mailbox.until(recovered, 30)
        finally:
            service.request_stop()
            await runner
            await mailbox.stop()
        return service

    service = asyncio.run(scenario())
    got = mailbox.got
    assert service.supervisor is not None
    assert service.supervisor.failure is None
    stretch = _unhealthy_stretch(got)
    assert "inbox watcher has stopped" in stretch[0]
    assert "WATCHDOG=1" not in stretch
