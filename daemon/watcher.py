"""Watcher: turns filesystem events into hints for intake.

Events are only hints (the directory scan is the truth), so the watcher does no work of
its own: watchdog's observer thread emits events, and the handler hands each path to the
event loop with ``call_soon_threadsafe``. When the kernel's inotify watches run out the
watcher says which setting to raise and falls back to polling.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from daemon.logs import get_logger

Hint = Callable[[str, bool], None]
log = get_logger(component="watcher")


class _Forwarder(FileSystemEventHandler):
    def __init__(self, loop: asyncio.AbstractEventLoop, hint: Hint) -> None:
        self._loop = loop
        self._hint = hint

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write", "deleted"):
            return
        path = event.dest_path if event.event_type == "moved" else event.src_path
        self._loop.call_soon_threadsafe(self._hint, _as_str(path), event.is_directory)


def _as_str(path: str | bytes) -> str:
    return path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path


class Watcher:
    """A recursive observer on the inbox that forwards paths to ``hint``."""

    def __init__(self, inbox: Path, hint: Hint, *, polling: bool = False) -> None:
        self._inbox = inbox
        self._hint = hint
        self._polling = polling
        self._observer: BaseObserver | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start watching; fall back to polling when inotify cannot watch the tree."""
        try:
            self._observer = self._start(loop, polling=self._polling)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EMFILE):
                raise
            log.error(
                "inotify limit reached; watching by polling instead",
                hint="raise fs.inotify.max_user_watches (sysctl) to use inotify",
                error=str(exc),
            )
            self._observer = self._start(loop, polling=True)

    def _start(self, loop: asyncio.AbstractEventLoop, *, polling: bool) -> BaseObserver:
        observer: BaseObserver = PollingObserver(timeout=2.0) if polling else Observer()
        observer.schedule(_Forwarder(loop, self._hint), str(self._inbox), recursive=True)
        observer.daemon = True
        observer.start()
        return observer

    def alive(self) -> bool:
        """Whether the observer thread is still running."""
        return self._observer is not None and self._observer.is_alive()

    def stop(self) -> None:
        """Stop the observer thread."""
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
