"""Logging: structlog configured in one place, with secrets kept out of every line.

JSON lines (ISO UTC ``timestamp``, ``level``, ``event`` and bound context such as
``job_id`` and ``path``) when the stream is not a terminal, readable console output when
it is. The standard library's loggers (httpx, uvicorn, SQLAlchemy) go through the same
processors and format; httpx's per-request INFO lines, which carry full URLs, are off.

Secrets are kept out in layers: tracebacks never show local variables; values of keys
that name a secret (``authorization``, ``api_key``, ``token``...) are masked; and every
secret the process has read (``register_secret``) is replaced wherever it appears, in
the event dict before rendering and in the rendered line itself.

Texts from outside (the hub's messages, exception texts) are made safe once more before
they are stored or shown anywhere (``plain``): secrets and any ``Bearer``/``Basic``
credential masked, terminal escapes and control characters removed, one bounded line.
URLs are shown without their credentials or query values (``redact_url``).
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import threading
from collections.abc import Iterable
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "***"
MIN_SECRET_LENGTH = 6  # shorter values would mask ordinary words; real keys are longer
SENSITIVE_KEY_PARTS = (
    "authorization",
    "api_key",
    "api-key",
    "apikey",
    "token",
    "password",
    "passwd",
    "secret",
    "cookie",
    "credential",
)
NOISY_LOGGERS = ("httpx", "httpcore", "watchdog", "uvicorn.access", "uvicorn.error", "sqlalchemy")

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_secrets: tuple[str, ...] = ()
_secrets_lock = threading.Lock()


# -- secrets -------------------------------------------------------------------------


def register_secret(value: str) -> None:
    """Remember ``value`` so that no log line ever shows it (idempotent)."""
    global _secrets  # noqa: PLW0603 - one process-wide list, swapped whole under a lock
    if len(value) < MIN_SECRET_LENGTH:
        return
    with _secrets_lock:
        if value not in _secrets:
            _secrets = tuple(sorted({*_secrets, value}, key=len, reverse=True))


def scrub(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with every registered secret (or every one of ``secrets``) masked."""
    for secret in _secrets if secrets is None else secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


# A Bearer value of any shape; a Basic one only when it looks like base64 ("basic plan").
_CREDENTIAL = re.compile(r"(?i)\b(bearer)\s+[^\s\"',;}]+|\b(basic)\s+[A-Za-z0-9+/=]{8,}")
_ESCAPE_SEQUENCE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?")
# C0 and C1 controls, DEL, and the bidirectional overrides that reorder what a terminal shows.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def plain(text: str, limit: int | None = None) -> str:
    """``text`` safe to store and show: no registered secret, no ``Bearer``/``Basic``
    credential, no terminal escape or control character, one line, at most ``limit``
    characters (None: any length)."""
    text = " ".join(printable(text).split())
    if limit is not None and len(text) > limit:
        return text[: limit - 1] + "…"
    return text


def printable(text: str) -> str:
    """``text`` as ``plain`` makes it, but keeping its spacing (one line of a table)."""
    text = _CREDENTIAL.sub(lambda m: f"{m.group(1) or m.group(2)} {REDACTED}", scrub(text))
    return _CONTROL.sub(" ", _ESCAPE_SEQUENCE.sub("", text))


def redact_url(url: str) -> str:
    """``url`` as it may be shown: user and password, query values and fragment masked."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return REDACTED  # not even a URL: show nothing of it
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{REDACTED}@{host}{port}" if "@" in parts.netloc else parts.netloc
    query = "&".join(
        f"{item.split('=', 1)[0]}={REDACTED}" if "=" in item else REDACTED
        for item in parts.query.split("&")
        if item
    )
    fragment = REDACTED if parts.fragment else ""
    return plain(urlunsplit((parts.scheme, netloc, parts.path, query, fragment)))


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _scrub_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_value(v) for v in value]
    return value


@functools.lru_cache(maxsize=4096)  # a few dozen field names, asked on every log line
def is_sensitive_key(key: str) -> bool:
    """Whether a field named ``key`` holds a secret by its name."""
    lowered = key.lower()
    return any(part in lowered for part in SENSITIVE_KEY_PARTS)


# -- processors (small pure functions) ---------------------------------------------------


def drop_color_message(_logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
    """Remove uvicorn's duplicate ``color_message`` key."""
    event.pop("color_message", None)
    return event


def redact_sensitive_keys(_logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
    """Mask the values of fields whose name says they are secret."""
    for key in event:
        if is_sensitive_key(key) and event[key] is not None:
            event[key] = REDACTED
    return event


def scrub_secrets(_logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
    """Mask registered secrets in every string of the event (tracebacks included)."""
    if not _secrets:
        return event
    return {key: _scrub_value(value) for key, value in event.items()}


def scrub_rendered(_logger: WrappedLogger, _name: str, line: Any) -> Any:
    """Last step: mask registered secrets in the rendered line itself."""
    return scrub(line) if isinstance(line, str) else line


def shared_processors() -> list[Processor]:
    """Processors every log line goes through, whatever the output format."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        drop_color_message,
        redact_sensitive_keys,
    ]


def renderers(use_json: bool, colors: bool) -> list[Processor]:
    """The format-specific end of the chain, secrets scrubbed before and after rendering."""
    if use_json:
        # Local variables are off: a key held in a local would otherwise be printed.
        tracebacks = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        return [
            structlog.processors.ExceptionRenderer(tracebacks),
            scrub_secrets,
            structlog.processors.JSONRenderer(ensure_ascii=False),
            scrub_rendered,
        ]
    # Tracebacks are rendered to plain text first (no locals), so they are scrubbed too:
    # a highlighter would split a secret with colour codes.
    console = structlog.dev.ConsoleRenderer(
        colors=colors, exception_formatter=structlog.dev.plain_traceback
    )
    return [structlog.processors.ExceptionRenderer(), scrub_secrets, console, scrub_rendered]


# -- configuration -------------------------------------------------------------------


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the moment (test runners swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def wants_json(fmt: str, stream: Any) -> bool:
    """JSON for ``json``, console for ``console``, and by terminal-ness for ``auto``."""
    if fmt == "auto":
        return not stream.isatty()
    return fmt == "json"


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog and the standard library's loggers (may be called again)."""
    out: Any = stream or _CurrentStderr()
    use_json = wants_json(fmt, out)
    numeric = _LEVELS.get(level, logging.INFO)
    tail = renderers(use_json, colors=out.isatty())
    structlog.configure(
        processors=[*shared_processors(), *tail],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line (print() makes two): fewer system calls, and lines from
        # several threads never interleave.
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    _route_stdlib(numeric, out, tail)


def _route_stdlib(level: int, out: Any, tail: list[Processor]) -> None:
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared_processors(), structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def get_logger(**context: Any) -> Any:
    """A logger with ``context`` bound, following the configuration made later at start-up."""
    return structlog.get_logger(**context)
