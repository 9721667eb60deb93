"""Shared fixtures: folders, configuration files and a clean environment."""

from __future__ import annotations

import json
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from daemon.emulator.hub import DEFAULT_API_KEY
from daemon.emulator.hub import HubSettings as EmulatorSettings
from daemon.emulator.server import EmulatorServer
from tests import postgres

IN_CI = os.environ.get("CI", "").lower() == "true"

_SYSTEMD_VARS = (
    "CREDENTIALS_DIRECTORY",
    "STATE_DIRECTORY",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)


# What the fault-injection tests measured (faults injected, kills, crashes recovered): a
# passing test's output is hidden, so these lines end every run's summary instead. They
# travel in the test report's user_properties, which pytest-xdist sends from its workers.
_COUNTS_PROPERTY = "fault counts"
_FAULT_COUNTS: dict[str, list[str]] = {}


@pytest.fixture
def fault_counts(request: pytest.FixtureRequest) -> Callable[[str, str], None]:
    """Note one line of counts under a heading, for the summary at the end of the run."""

    def note(heading: str, line: str) -> None:
        request.node.user_properties.append((_COUNTS_PROPERTY, (heading, line)))

    return note


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Collect the counts a test noted, in the process that prints the summary."""
    if report.when != "call":
        return
    for name, value in report.user_properties:
        if name == _COUNTS_PROPERTY:
            heading, line = value
            _FAULT_COUNTS.setdefault(heading, []).append(line)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the fault-injection suite's counts after the test results."""
    if not _FAULT_COUNTS:
        return
    terminalreporter.section("fault-injection counts")
    for heading, lines in _FAULT_COUNTS.items():
        if len(lines) == 1:
            terminalreporter.write_line(f"{heading}: {lines[0]}")
            continue
        terminalreporter.write_line(f"{heading} ({len(lines)} cases):")
        for line in sorted(lines):  # workers finish in any order
            terminalreporter.write_line(f"  {line}")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's LDX_HOTFOLDER_* or systemd variables."""
    for name in list(os.environ):
        if name.startswith("LDX_HOTFOLDER_") or name in _SYSTEMD_VARS:
            monkeypatch.delenv(name)


def toml_value(value: Any) -> str:
    """Render a Python value as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, top: dict[str, Any], hub: dict[str, Any] | None = None) -> Path:
    """Write a config.toml with the given top-level keys and [hub] table."""
    lines = [f"{key} = {toml_value(value)}" for key, value in top.items()]
    if hub:
        lines.append("\n[hub]")
        lines += [f"{key} = {toml_value(value)}" for key, value in hub.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    """An inbox, an outbox and a state folder under tmp_path."""
    made = {name: tmp_path / name for name in ("inbox", "outbox", "state")}
    for folder in made.values():
        folder.mkdir()
    return made


@pytest.fixture
def emulator() -> Iterator[EmulatorServer]:
    """A real emulator on a free loopback port, processing each job in 0.2 s."""
    with EmulatorServer(EmulatorSettings(processing_time=0.2, seed=11)) as server:
        yield server


def daemon_config(
    tmp_path: Path,
    folders: dict[str, Path],
    base_url: str,
    *,
    key: str = DEFAULT_API_KEY,
    hub: dict[str, Any] | None = None,
    **top: Any,
) -> Path:
    """A config.toml for the daemon against ``base_url``, with a key file."""
    key_file = tmp_path / "api-key"
    key_file.write_text(key + "\n", encoding="utf-8")
    settings: dict[str, Any] = {
        "inbox": str(folders["inbox"]),
        "outbox": str(folders["outbox"]),
        "state_db": str(folders["state"] / "state.db"),
        "quiet_period": 0.3,
        "log_format": "json",
        # A held hub is probed at most this far apart, so tests see it come back soon.
        "auth_recheck_interval": 2.0,
        **top,
    }
    hub_settings = {
        "base_url": base_url,
        "api_key_file": str(key_file),
        "poll_interval": 1.0,
        # The hub emulated here has no rate limit: tests that need one set both sides.
        "max_requests_per_minute": 0,
    }
    return write_config(tmp_path / "config.toml", settings, {**hub_settings, **(hub or {})})


class WebhookReceiver(BaseHTTPRequestHandler):
    """Records webhook bodies; answers with the statuses in ``answers``, then 200."""

    answers: ClassVar[list[int]]
    bodies: ClassVar[list[dict[str, Any]]]

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        type(self).bodies.append(json.loads(self.rfile.read(length)))
        status = type(self).answers.pop(0) if type(self).answers else 200
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def receiver() -> Iterator[tuple[str, type[WebhookReceiver]]]:
    """A real HTTP server on loopback that records webhook bodies: its URL and handler."""
    handler = type("Receiver", (WebhookReceiver,), {"answers": [], "bodies": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[postgres.PostgresServer]:
    """A real PostgreSQL 15 server for the session (initdb + pg_ctl, loopback port)."""
    try:
        server = postgres.start()
    except postgres.PostgresUnavailable as exc:
        if IN_CI:
            pytest.fail(f"CI must run the PostgreSQL tests, but: {exc}")
        pytest.skip(f"PostgreSQL cannot be started here (install postgresql-15): {exc}")
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres_server: postgres.PostgresServer, request: pytest.FixtureRequest) -> str:
    """The URL of a new, empty database of its own on the session's PostgreSQL server."""
    name = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40]
    return postgres_server.new_database(f"{name}_{uuid.uuid4().hex[:8]}")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty state database: an SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url
