"""Intake: find files in the inbox, wait until they are stable, and queue them.

Sources of candidates are the start-up scan, periodic rescans and watcher hints; the
scan is the truth and events only make things faster. A candidate is re-examined on
every tick until its signature has been unchanged for the quiet period; then it is
opened safely, its type read from its content, and a job row is written (queued, or
failed at once for an unsupported type). The table remembers what was queued, so a
known file is never queued twice and a rescan costs only stat calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

from daemon.config import Settings
from daemon.db import Db
from daemon.errors import JobFailed
from daemon.filters import NameFilter
from daemon.inputs import detect, open_input, signature_of
from daemon.layout import output_candidates
from daemon.logs import get_logger
from daemon.stability import Sighting, Signature, is_stable, observe
from daemon.store import Job, NewJob, Store

log = get_logger(component="intake")
TICK_SECONDS = 0.25
CLAIM_CANDIDATES = 50
ACCEPTED = "accepted: PDF, TIFF, JPEG, PNG, BMP"


def walk_inbox(inbox: Path, name_filter: NameFilter) -> Iterator[tuple[str, os.stat_result]]:
    """Every regular, not ignored file under ``inbox`` as (relative path, lstat)."""
    stack = [(inbox, "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            log.warning("cannot list folder", folder=str(folder), error=exc.strerror)
            continue
        for entry in entries:
            if name_filter.match(entry.name) is not None:
                continue
            rel = f"{prefix}{entry.name}"
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append((Path(entry.path), f"{rel}/"))
            elif stat.S_ISREG(st.st_mode):
                yield rel, st


class Intake:
    """Tracks candidates until they are stable, then queues them."""

    def __init__(
        self,
        settings: Settings,
        db: Db,
        on_enqueued: Callable[[], None],
        *,
        clock: Callable[[], float] = time.time,
        reject_empty: bool = False,
    ) -> None:
        self.inbox = settings.inbox.absolute()
        self.outbox = settings.outbox.absolute()
        self.settings = settings
        self.filter = NameFilter.with_extra(settings.ignore)
        self.db = db
        self.clock = clock
        self.reject_empty = reject_empty
        self.sightings: dict[str, Sighting] = {}
        self.known: dict[str, tuple[int, int]] = {}
        self.present: set[str] = set()
        self._on_enqueued = on_enqueued
        self.paused = False
        self._warned: set[str] = set()

    async def load_known(self) -> None:
        """Read what the table already holds."""
        self.known = await self.db.call(self.db.store.fingerprints)

    async def scan(self, folder: Path | None = None) -> int:
        """Walk the inbox (or a folder in it); return how many new candidates it found."""
        root = folder or self.inbox
        entries = await asyncio.to_thread(lambda: list(walk_inbox(root, self.filter)))
        prefix = "" if root == self.inbox else f"{root.relative_to(self.inbox).as_posix()}/"
        now = self.clock()
        before = len(self.sightings)
        for rel, st in entries:
            self._consider(prefix + rel, st, now)
        return len(self.sightings) - before

    def hint(self, path: str, is_dir: bool) -> None:
        """A watcher event: look at ``path`` soon (a folder is scanned)."""
        try:
            rel = Path(path).relative_to(self.inbox).as_posix()
        except ValueError:
            return
        if rel == "." or self.filter.ignored_part(rel) is not None:
            return
        if is_dir:
            asyncio.get_running_loop().create_task(self.scan(self.inbox / rel))
            return
        try:
            st = (self.inbox / rel).lstat()
        except OSError:
            return
        if stat.S_ISREG(st.st_mode):
            self._consider(rel, st, self.clock())

    def _consider(self, rel: str, st: os.stat_result, now: float) -> None:
        if not self._storable(rel):
            return
        self.present.add(rel)
        if self.known.get(rel) == (st.st_size, st.st_mtime_ns):
            return
        self.sightings[rel] = observe(self.sightings.get(rel), signature_of(st), now)

    def _storable(self, rel: str) -> bool:
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            if rel not in self._warned:
                self._warned.add(rel)
                log.warning("skipping a name that is not valid UTF-8", path=repr(rel))
            return False
        return True

    async def tick(self) -> None:
        """Re-examine every candidate; queue those that became stable."""
        if self.paused:  # disk nearly full: keep watching, take nothing
            return
        now = self.clock()
        for rel in list(self.sightings):
            try:
                st = (self.inbox / rel).lstat()
            except OSError:
                del self.sightings[rel]  # gone before it was stable: nothing to do
                self.present.discard(rel)
                continue
            if not stat.S_ISREG(st.st_mode):
                del self.sightings[rel]
                continue
            sighting = observe(self.sightings[rel], signature_of(st), now)
            self.sightings[rel] = sighting
            if self._ready(sighting, now):
                await self._take(rel, sighting.signature)

    def _ready(self, sighting: Sighting, now: float) -> bool:
        if is_stable(sighting, now, self.settings.quiet_period):
            return True
        # In ``once`` mode an empty file must end somewhere; the daemon keeps waiting.
        return (
            self.reject_empty
            and sighting.signature.size == 0
            and now - sighting.since >= self.settings.quiet_period
        )

    async def _take(self, rel: str, expected: Signature) -> None:
        try:
            fmt, described, actual = await asyncio.to_thread(self._inspect, rel)
        except JobFailed as exc:
            log.info("candidate vanished", path=rel, reason=exc.message)
            self.sightings.pop(rel, None)
            return
        if actual != expected:
            self.sightings[rel] = observe(self.sightings[rel], actual, self.clock())
            return
        new = NewJob(
            path=rel,
            size=actual.size,
            mtime_ns=actual.mtime_ns,
            inode=actual.inode,
            input_format=fmt,
            engine=self.settings.hub.engine,
            language=self.settings.hub.language,
            output_format=self.settings.hub.output_format,
        )
        job = await self.db.call(self._record, new, described, self.clock())
        del self.sightings[rel]
        self.known[rel] = (actual.size, actual.mtime_ns)
        log.info("queued" if job.error_code is None else "rejected", path=rel, job_id=job.id)
        self._on_enqueued()

    def _inspect(self, rel: str) -> tuple[str | None, str, Signature]:
        with open_input(self.inbox, rel) as fd:
            fmt, described = detect(fd)
            return (fmt.value if fmt else None), described, signature_of(os.fstat(fd))

    def _record(self, new: NewJob, described: str, now: float) -> Job:
        """Claim an output name and insert the row (runs on the writer thread)."""
        store: Store = self.db.store
        output = self._claim_output(store, new.path, new.output_format)
        if new.size == 0:
            return store.reject(new, output, "empty_file", "the file is empty (0 bytes)", now)
        if new.input_format is None:
            message = f"unsupported type: looks like {described} ({ACCEPTED})"
            return store.reject(new, output, "unsupported_type", message, now)
        return store.enqueue(new, output, now)

    def _claim_output(self, store: Store, rel: str, output_format: str) -> str:
        candidates = list(islice(output_candidates(rel, output_format), CLAIM_CANDIDATES))
        taken = store.outputs_taken(candidates, except_path=rel)
        mine = store.outputs_of_path(rel)
        for candidate in candidates:
            if candidate in taken:
                continue
            if candidate in mine or not (self.outbox / candidate).exists():
                return candidate
        return candidates[-1]

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop``; rescan the whole inbox every ``rescan_interval``."""
        next_rescan = self.clock() + self.settings.rescan_interval
        while not stop.is_set():
            await self.tick()
            if self.clock() >= next_rescan:
                found = await self.scan()
                if found:
                    log.info("rescan found files the watcher missed", count=found)
                next_rescan = self.clock() + self.settings.rescan_interval
            await _wait(stop, TICK_SECONDS)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
