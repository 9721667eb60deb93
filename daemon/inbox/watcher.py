"""Watcher: turns filesystem events into hints for intake.

Events are only hints (the directory scan is the truth), so the watcher does no work of
its own: watchdog's observer threads emit events, and the handler hands each path to
the event loop with ``call_soon_threadsafe``.

How the inbox is watched follows ``use_polling`` and the mount table (``daemon.inbox.mounts``):
inotify where the kernel sees every change, polling where it cannot (network and FUSE
filesystems). Polling (``daemon.inbox.polling``) lists folders with ``lstat``, so it never
follows a symlink out of the inbox. When inotify runs out of watches the watcher names
the sysctl to raise and polls instead. A dead observer or emitter thread is noticed by
``healthy`` and the watcher is restarted by its owner; an inotify queue overflow asks
for a rescan at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from daemon.inbox.mounts import UsePolling, WatchPlan, plan_for
from daemon.inbox.polling import LeanPollingObserver
from daemon.logs import get_logger

Hint = Callable[[str, bool], None]
log = get_logger(component="watcher")
# The only events that can mean a new or changed input (a folder's own modification does
# not: its files have events of their own). Watchdog narrows the inotify mask to these, so
# the daemon's own reads of an inbox file (sniffing, hashing, uploading: an open and a
# close-without-write event each) never wake the emitter thread.
_WANTED_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileDeletedEvent,  # a parked placeholder removed leaves the stalled list at once
    FileModifiedEvent,
    FileMovedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirMovedEvent,
]
_INOTIFY_LOGGER = "watchdog.observers.inotify_c"
COVERAGE_RECHECK = 0.2  # seconds before counting watches again
HEALTH_CHECK_SECONDS = 2.0  # how often the observer threads are looked at
_LIMIT_SYSCTL = {
    errno.ENOSPC: "fs.inotify.max_user_watches",
    errno.EMFILE: "fs.inotify.max_user_instances",
}


class _Forwarder(FileSystemEventHandler):
    def __init__(self, loop: asyncio.AbstractEventLoop, hint: Hint) -> None:
        self._loop = loop
        self._hint = hint

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Only _WANTED_EVENTS arrive: the observers are scheduled with that filter.
        path = event.dest_path if event.event_type == "moved" else event.src_path
        try:
            self._loop.call_soon_threadsafe(self._hint, _as_str(path), event.is_directory)
        except RuntimeError:  # the loop closed while the observer was stopping
            return


class _OverflowAlarm(logging.Handler):
    """Watchdog only logs an inotify queue overflow; turn that line into a rescan."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_overflow: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self._loop = loop
        self._on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            try:
                self._loop.call_soon_threadsafe(self._on_overflow)
            except RuntimeError:
                return


def _as_str(path: str | bytes) -> str:
    return os.fsdecode(path) if isinstance(path, bytes) else path


class Watcher:
    """Observers on the inbox (inotify and/or polling) that forward paths to ``hint``."""

    def __init__(
        self,
        inbox: Path,
        hint: Hint,
        *,
        polling: UsePolling = "auto",
        polling_interval: float = 2.0,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self._inbox = inbox
        self._hint = hint
        self._mode = polling
        self._interval = polling_interval
        self._on_overflow = on_overflow
        self._observers: list[BaseObserver] = []
        self._alarm: _OverflowAlarm | None = None
        self.plan = WatchPlan((), ())

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start watching as the plan says; poll wherever inotify cannot watch."""
        plan = plan_for(self._inbox, self._mode)
        watched: list[Path] = []
        polled = list(plan.polled)
        for folder in plan.inotify:
            try:
                self._observers.append(self._start_inotify(loop, folder))
                watched.append(folder)
            except OSError as exc:
                if exc.errno not in _LIMIT_SYSCTL:
                    raise
                self._report_limit(exc)
                polled.insert(0, folder)
        if polled:
            self._observers.append(self._start_polling(loop, polled))
        self.plan = WatchPlan(tuple(watched), tuple(polled), plan.reasons)
        self._watch_overflow(loop)
        log.info(
            "watching the inbox",
            inotify=[str(p) for p in self.plan.inotify],
            polled=[str(p) for p in self.plan.polled],
            polling_interval=self._interval if polled else None,
            why=list(plan.reasons) or None,
        )

    def _start_inotify(self, loop: asyncio.AbstractEventLoop, folder: Path) -> BaseObserver:
        observer: BaseObserver = Observer()
        try:
            self._schedule(observer, loop, folder)
            observer.daemon = True
            observer.start()
            _check_coverage(folder)
        except OSError:
            _quietly_stop(observer)
            raise
        return observer

    def covered(self) -> bool:
        """Whether inotify still watches every folder (new folders can exhaust the limit)."""
        try:
            for folder in self.plan.inotify:
                _check_coverage(folder)
        except OSError:
            return False
        return True

    def _start_polling(self, loop: asyncio.AbstractEventLoop, folders: list[Path]) -> BaseObserver:
        observer = LeanPollingObserver(self._interval)
        for folder in folders:
            self._schedule(observer, loop, folder)
        observer.daemon = True
        observer.start()
        return observer

    def _schedule(
        self, observer: BaseObserver, loop: asyncio.AbstractEventLoop, folder: Path
    ) -> None:
        """Watch ``folder`` and below for the events intake wants, hinted on ``loop``."""
        observer.schedule(
            _Forwarder(loop, self._hint), str(folder), recursive=True, event_filter=_WANTED_EVENTS
        )

    def _report_limit(self, exc: OSError) -> None:
        sysctl = _LIMIT_SYSCTL[exc.errno or errno.ENOSPC]
        log.error(
            "inotify limit reached; watching by polling instead",
            error=str(exc),
            fix=f"raise {sysctl} (e.g. sysctl -w {sysctl}=524288, and in /etc/sysctl.d/) "
            "to watch with inotify again",
        )

    def _watch_overflow(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._on_overflow is None or self._alarm is not None:
            return
        self._alarm = _OverflowAlarm(loop, self._on_overflow)
        logging.getLogger(_INOTIFY_LOGGER).addHandler(self._alarm)

    @property
    def observers(self) -> tuple[BaseObserver, ...]:
        """The running observers (for diagnostics and tests)."""
        return tuple(self._observers)

    def healthy(self) -> bool:
        """Whether every observer thread and every emitter thread is still running."""
        if not self._observers:
            return False
        for observer in self._observers:
            if not observer.is_alive():
                return False
            if not all(emitter.is_alive() for emitter in observer.emitters):
                return False
        return True

    def alive(self) -> bool:
        """Same as ``healthy`` (kept for callers of the earlier name)."""
        return self.healthy()

    def restart(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop whatever is left of the observers and start afresh (re-reading the mounts)."""
        self._stop_observers()
        self.start(loop)

    async def keep_alive(self, stop: asyncio.Event, on_lost: Callable[[], None]) -> None:
        """Restart a dead observer (and call ``on_lost``: events were missed) until ``stop``."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEALTH_CHECK_SECONDS)
            if not stop.is_set() and not self.healthy():
                self._restart("the filesystem observer stopped; restarting it and rescanning")
                on_lost()

    async def check_coverage(self, on_lost: Callable[[], None]) -> None:
        """After a full rescan: does inotify still watch every folder? (New folders may
        have used up the watches; then the watcher restarts, polling where it must.)"""
        if await asyncio.to_thread(self.covered):
            return
        self._restart("inotify does not watch every folder any more; restarting")
        on_lost()

    def _restart(self, why: str) -> None:
        log.error(why)
        try:
            self.restart(asyncio.get_running_loop())
        except OSError as exc:
            log.error("cannot restart the filesystem observer", error=str(exc))

    def stop(self) -> None:
        """Stop the observer threads."""
        self._stop_observers()
        if self._alarm is not None:
            logging.getLogger(_INOTIFY_LOGGER).removeHandler(self._alarm)
            self._alarm = None

    def _stop_observers(self) -> None:
        observers, self._observers = self._observers, []
        for observer in observers:
            _quietly_stop(observer)


def inotify_watches() -> int | None:
    """How many inotify watches this process holds (None when /proc cannot tell)."""
    total = 0
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as info:
                total += sum(1 for line in info if line.startswith("inotify wd:"))
        except OSError:
            continue
    return total


def folders_under(root: Path) -> int:
    """``root`` and every real, readable folder below it (links are not followed): what
    inotify must watch."""
    count = 1
    for parent, dirs, _ in os.walk(root, onerror=lambda _: None):
        dirs[:] = [d for d in dirs if _watchable(os.path.join(parent, d))]
        count += len(dirs)
    return count


def _watchable(path: str) -> bool:
    # inotify cannot watch a folder it may not read; a link is never followed.
    return not os.path.islink(path) and os.access(path, os.R_OK)


def _check_coverage(folder: Path) -> None:
    # watchdog ignores a failure to watch a subfolder (only the root's failure is raised),
    # so a watch limit reached half-way would leave folders silently unwatched.
    held, needed = inotify_watches(), folders_under(folder)
    if held is not None and held < needed:
        time.sleep(COVERAGE_RECHECK)  # folders made meanwhile get their watches late
        held, needed = inotify_watches() or 0, folders_under(folder)
    if held is not None and held < needed:
        raise OSError(
            errno.ENOSPC, f"inotify watch limit reached: {held} of {needed} folders watched"
        )


def _quietly_stop(observer: BaseObserver) -> None:
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=5)
    except (OSError, RuntimeError) as exc:  # a dead emitter may not stop cleanly
        log.warning("observer did not stop cleanly", error=str(exc))
