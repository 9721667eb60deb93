"""Logging: structlog configured in one place.

JSON lines (ISO UTC timestamp, level, event and bound context such as job id and path)
when stderr is not a terminal, readable console output when it is. Tracebacks are
rendered without local variables, so a secret held in a local never reaches a log, and
httpx's per-request INFO lines are silenced because they carry full URLs.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR


def drop_color_message(_logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
    """Remove uvicorn's duplicate ``color_message`` key."""
    event.pop("color_message", None)
    return event


def shared_processors() -> list[Processor]:
    """Processors every log line goes through, whatever the output format."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        drop_color_message,
    ]


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the moment (test runners swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog and the standard library's loggers."""
    out: Any = stream or _CurrentStderr()
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderers: list[Processor]
    if use_json:
        tracebacks = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        renderers = [tracebacks, structlog.processors.JSONRenderer(ensure_ascii=False)]
    else:
        renderers = [structlog.dev.ConsoleRenderer(colors=out.isatty())]
    numeric = _LEVELS.get(level, logging.INFO)
    structlog.configure(
        processors=[*shared_processors(), *renderers],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    _quiet_libraries(numeric, out)


def _quiet_libraries(level: int, out: Any) -> None:
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "watchdog", "uvicorn.access", "uvicorn.error"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(**context: Any) -> Any:
    """A logger with ``context`` bound, following the configuration made later at start-up."""
    return structlog.get_logger(**context)
