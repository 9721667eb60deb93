"""Logs: JSON lines off a terminal, console on one, quiet libraries, secrets never shown."""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from daemon import logs
from daemon.emulator.server import EmulatorServer

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Each test configures logging for itself; the default comes back afterwards."""
    yield
    logs.configure("info", "auto")


class Writes(io.StringIO):
    """A text stream that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_each_line_is_one_write() -> None:
    """A log line and its newline leave in one write, so lines of threads never mix."""
    stream = Writes()
    logs.configure("info", "json", stream)
    logs.get_logger().info("converted", job_id=1)
    logs.get_logger().info("converted", job_id=2)
    assert len(stream.writes) == 2
    assert all(w.endswith("}\n") and w.count("\n") == 1 for w in stream.writes)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_off_a_terminal() -> None:
    """Not on a terminal: one JSON object per line with timestamp, level, event and context."""
    out = io.StringIO()
    logs.configure("info", "auto", out)
    logs.get_logger(component="test").bind(job_id=7, path="a/b.pdf").info("job completed")
    (entry,) = lines(out)
    assert entry["event"] == "job completed"
    assert entry["level"] == "info"
    assert entry["job_id"] == 7
    assert entry["path"] == "a/b.pdf"
    assert ISO_UTC.match(entry["timestamp"]), entry["timestamp"]


def test_console_on_a_terminal() -> None:
    """On a terminal: readable text, not JSON."""
    out = Terminal()
    logs.configure("info", "auto", out)
    logs.get_logger().info("starting", inbox="/srv/inbox")
    text = out.getvalue()
    assert "starting" in text
    assert "inbox" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_a_newline_in_a_name_cannot_forge_a_line() -> None:
    """A hostile file name stays inside its own JSON line."""
    out = io.StringIO()
    logs.configure("info", "json", out)
    logs.get_logger().info("queued", path='x.pdf\n{"event": "forged"}')
    assert len(out.getvalue().splitlines()) == 1


def test_level_filters() -> None:
    """Below the configured level nothing is written."""
    out = io.StringIO()
    logs.configure("warning", "json", out)
    logs.get_logger().info("chatty")
    logs.get_logger().warning("important")
    assert [e["event"] for e in lines(out)] == ["important"]


def test_httpx_request_lines_are_quiet(emulator: EmulatorServer) -> None:
    """httpx's per-request INFO lines (full URLs) never appear, even at debug level."""
    out = io.StringIO()
    logs.configure("debug", "json", out)
    with httpx.Client() as client:
        assert client.get(f"{emulator.url}/renderocr/engines").status_code == 200
    assert "HTTP Request" not in out.getvalue()
    logging.getLogger("daemon.test").warning("stdlib %s", "routed")
    (entry,) = lines(out)
    assert entry["event"] == "stdlib routed"
    assert entry["logger"] == "daemon.test"


def _fail_with(secret: str) -> None:
    mirrored = secret[::-1]  # only a rendering of local variables would show this
    raise RuntimeError(f"request failed with Authorization: Bearer {secret} ({len(mirrored)})")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_registered_secret_never_appears(fmt: str) -> None:
    """The key is masked in messages, fields, stdlib records and tracebacks (no locals)."""
    secret = f"CANARY-{uuid.uuid4().hex}"
    logs.register_secret(secret)
    out = Terminal() if fmt == "console" else io.StringIO()
    logs.configure("info", fmt, out)
    log = logs.get_logger()
    log.info(f"key is {secret}", note=[f"x{secret}y"], nested={"deep": secret})
    try:
        _fail_with(secret)
    except RuntimeError:
        log.exception("request code failed")
        logging.getLogger("httpx").exception("library failed")
    logging.getLogger("sqlalchemy.engine").error("param %s", secret)
    text = out.getvalue()
    assert secret not in text
    assert "request code failed" in text
    assert "RuntimeError" in text
    assert logs.REDACTED in text
    assert secret[::-1] not in text  # no local variables are rendered


def test_fields_named_like_secrets_are_masked() -> None:
    """authorization, api_key, token... are masked by name whatever their value."""
    out = io.StringIO()
    logs.configure("info", "json", out)
    logs.get_logger().info("x", authorization="Bearer abc", api_key="k", access_token="t", path="p")
    (entry,) = lines(out)
    assert entry["authorization"] == entry["api_key"] == entry["access_token"] == "***"
    assert entry["path"] == "p"


def test_short_values_are_not_treated_as_secrets() -> None:
    """A one-letter test key would mask ordinary words; it is not registered."""
    logs.register_secret("k")
    assert logs.scrub("key ok") == "key ok"


def test_plain_removes_secrets_credentials_and_controls() -> None:
    """A text from outside: registered key, Bearer/Basic values, escapes and controls go;
    one line, bounded; ordinary words (a "basic plan") stay."""
    secret = f"CANARY-{uuid.uuid4().hex}"
    logs.register_secret(secret)
    raw = (
        f"denied for {secret}\r\nAuthorization: Bearer other.token-123;"
        " basic plan, Basic dXNlcjpwYXNzd29yZA==\x1b[31m red\x1b[0m\x1b]0;title\x07"
        "\x00\u202eevil\t end"
    )
    text = logs.plain(raw)
    assert secret not in text
    assert "other.token-123" not in text
    assert "dXNlcjpwYXNzd29yZA" not in text
    assert text == ("denied for *** Authorization: Bearer ***; basic plan, Basic *** red evil end")
    assert logs.plain("x" * 50, 10) == "x" * 9 + "…"
    assert logs.printable("#1    queued  a\x1b[2Jb") == "#1    queued  ab"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "https://user:pw@hooks.example/x?token=abc&id=7",
            "https://***@hooks.example/x?token=***&id=***",
        ),
        ("https://gw.ldxhub.io", "https://gw.ldxhub.io"),
        ("http://[::1]:8080/a#secret", "http://[::1]:8080/a#***"),
        ("http://h:99999999/", "***"),
    ],
)
def test_urls_are_shown_without_credentials(url: str, shown: str) -> None:
    """User, password, query values and fragment of a URL are masked wherever it is shown."""
    assert logs.redact_url(url) == shown
