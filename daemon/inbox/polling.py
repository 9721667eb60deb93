"""Polling: a lean watchdog emitter for the folders inotify cannot watch.

Every ``polling_interval`` the emitter lists the polled folders (``scandir`` and one
``lstat`` per entry; links are recorded, never followed) into a plain dict of path ->
(inode, size, mtime, is folder), and compares it with the previous one. An unchanged
tree costs one dict comparison; otherwise every new or changed file becomes a created
or modified event and every new folder a folder-created event, which is all the watcher
forwards (events are only hints: intake looks at each path itself, and a deletion needs
no hint). Watchdog's own polling snapshot also reads each file's birth time and builds
inode maps to report moves, about five times the CPU for the same tree; a moved file
shows here as created at its new path.

The emitter and observer follow watchdog's split: the emitter thread only produces
events, the observer's dispatcher thread hands them to the handler, so the watcher's
health checks and restarts work the same for both kinds of observer.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileSystemEvent,
)
from watchdog.observers.api import BaseObserver, EventEmitter

from daemon.logs import get_logger

Entry = tuple[int, int, int, bool]  # inode, size, mtime in ns, is a folder
Snapshot = dict[str, Entry]
Change = tuple[str, bool, bool]  # path, is a folder, is new

log = get_logger(component="watcher")
# A folder that vanished or stopped being one between its listing and its own scan holds
# nothing; one the daemon may not read is skipped as watchdog's poller skips it.
_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EINVAL, errno.EACCES, errno.EPERM})


def snapshot(root: str) -> Snapshot:
    """Every entry below ``root`` (not ``root`` itself), walking real folders only.

    An unreadable or vanished subfolder counts as empty; any error on ``root`` itself,
    and other errors below it (EIO, ESTALE on a share), are raised.
    """
    entries: Snapshot = {}
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            listing = os.scandir(folder)
        except OSError as exc:
            if folder != root and exc.errno in _GONE:
                continue
            raise
        with listing:
            for item in listing:
                try:
                    info = item.stat(follow_symlinks=False)
                except FileNotFoundError:  # removed since the listing
                    continue
                is_dir = stat.S_ISDIR(info.st_mode)
                entries[item.path] = (info.st_ino, info.st_size, info.st_mtime_ns, is_dir)
                if is_dir:
                    folders.append(item.path)
    return entries


def changes(before: Snapshot, after: Snapshot) -> list[Change]:
    """What deserves a hint: new or changed files, and new (or replaced) folders."""
    if before == after:
        return []
    found: list[Change] = []
    for path, entry in after.items():
        old = before.get(path)
        if old == entry:
            continue
        if not entry[3]:
            found.append((path, False, old is None))
        elif old is None or not old[3] or old[0] != entry[0]:
            found.append((path, True, True))  # a folder's own mtime change is no news
    return found


def _event(change: Change) -> FileSystemEvent:
    path, is_dir, new = change
    if is_dir:
        return DirCreatedEvent(path)
    return FileCreatedEvent(path) if new else FileModifiedEvent(path)


class LeanPollingEmitter(EventEmitter):
    """Polls one watched folder tree; ``timeout`` is the polling interval."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last: Snapshot = {}
        self._failing = False

    def on_thread_start(self) -> None:
        """The first listing: what is there already is the start-up scan's, not news."""
        try:
            self._last = snapshot(self.watch.path)
        except OSError:
            self._last = {}  # queue_events reports it on the first poll

    def queue_events(self, timeout: float) -> None:
        """Wait one interval, list the tree again and queue an event per change."""
        if self.stopped_event.wait(timeout):
            return
        try:
            current = snapshot(self.watch.path)
        except (FileNotFoundError, NotADirectoryError):
            self.queue_event(DirDeletedEvent(self.watch.path))
            self.stop()  # as watchdog's poller does: the watcher sees it and restarts
            return
        except OSError as exc:
            # Often brief on a share (EIO, ESTALE, EHOSTDOWN): keep the last listing, so
            # what changes meanwhile is still reported once the share answers again.
            if not self._failing:
                log.warning(
                    "cannot list a polled folder, will retry", path=self.watch.path, error=str(exc)
                )
            self._failing = True
            return
        if self._failing:
            log.info("listing a polled folder works again", path=self.watch.path)
            self._failing = False
        found = changes(self._last, current)
        self._last = current
        for change in found:
            self.queue_event(_event(change))


class LeanPollingObserver(BaseObserver):
    """A watchdog observer whose emitters are ``LeanPollingEmitter``."""

    def __init__(self, polling_interval: float) -> None:
        super().__init__(LeanPollingEmitter, timeout=polling_interval)
