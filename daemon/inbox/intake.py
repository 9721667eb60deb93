"""Intake: find files in the inbox, wait until they are stable, and queue them.

Sources of candidates are the start-up scan, periodic rescans, watcher hints and the
worker (an input that changed while it was sent); the scan is the truth and events
only make things faster. A candidate is re-examined on every tick (one ``lstat``) until
its signature has been unchanged for the quiet period (``daemon.inbox.stability``). Then it
is opened safely, its type read from its content and its completeness checked
(``daemon.inbox.inputs``): an incomplete file, or one the daemon may not read, keeps waiting;
a refused one (unsupported type, several hard links, larger than the hub takes, an
output folder that is a link, empty, incomplete or unreadable for too long) gets a
failed row and an error file at once, before anything is sent; anything else a queued
row.

The table remembers which version (size, mtime, inode) of each path was taken, so a
known file is never queued twice and a rescan costs stat calls, not reads. The daemon
watches for its own health too: a dead observer thread is restarted and followed by a
rescan, and an inotify overflow triggers a rescan at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from daemon import fs
from daemon.errors import (
    InputGone,
    InputUnreadable,
    StateUnavailable,
)
from daemon.fs import fs_path, stored_path
from daemon.inbox.enqueue import (
    Enqueuer,
    Record,
)
from daemon.inbox.filters import NameFilter
from daemon.inbox.inputs import (
    Inspection,
    hard_link_message,
    inspect_input,
    open_folder,
    signature_of,
    unreadable_message,
)
from daemon.inbox.parking import Parking
from daemon.inbox.routing import Router
from daemon.inbox.stability import (
    Patience,
    Sighting,
    Signature,
    Verdict,
    is_parkable,
    next_look,
    observe,
    stall,
    verdict,
    with_problem,
)
from daemon.inbox.stalls import Stalls
from daemon.jobs.model import Stage
from daemon.jobs.views import Views
from daemon.jobs.writer import Writer
from daemon.logs import get_logger
from daemon.outbox.permissions import OutputPermissions

log = get_logger(component="intake")
Ready = tuple[str, Sighting, bool]  # (path, sighting, giving up)
ADOPTED = (
    "output already in the outbox adopted: the state database had no record of this input "
    "(a new or lost database) and its output is newer than it; not converted again"
)
SUPERSEDED = "a newer version replaced the earlier version's job, for which nothing was paid"
TICK_SECONDS = 0.25
QUIET_MARGIN = 0.002  # look just after a quiet period ends, never just before
TAKE_BATCH = 200  # candidates inspected and inserted per call of the single writer
ACCEPTED = "accepted: PDF, TIFF, JPEG, PNG, BMP"
# The hub takes at most "200 MB" in one POST /files (its API reference): a larger file is
# refused before it is uploaded in full for nothing. A hub with a lower limit says so
# with a 413, which fails the job with the hub's own reason.
MAX_UPLOAD_BYTES = 200 * 10**6
STATE_RETRY_SECONDS = 5.0  # intake waits this long when the state database fails
BEHIND_CHECK_SECONDS = 1.0  # how often a version held behind an earlier job looks again


def walk_inbox(
    inbox: Path, name_filter: NameFilter, folder: str = ""
) -> Iterator[tuple[str, os.stat_result]]:
    """Every regular, not ignored file under ``inbox/folder`` as (relative path, lstat).

    Folders are entered by descriptor with ``O_NOFOLLOW``, so a symlinked folder is never
    walked, even one swapped in during the walk; only the folders on the current branch
    are open at once. Paths are as the filesystem gives them (``surrogateescape``).
    """
    parts = [p for p in folder.split("/") if p]
    try:
        root = open_folder(inbox, parts)
    except InputGone:
        return
    prefix = "".join(f"{p}/" for p in parts)
    frames = [(root, prefix, _entries(root, prefix, name_filter))]
    try:
        while frames:
            fd, prefix, entries = frames[-1]
            entry = next(entries, None)
            if entry is None:
                os.close(fd)
                frames.pop()
                continue
            name, st = entry
            if stat.S_ISREG(st.st_mode):
                yield f"{prefix}{name}", st
            elif stat.S_ISDIR(st.st_mode):
                with contextlib.suppress(OSError):
                    sub, sub_prefix = fs.open_at(fd, name, fs.DIR_FLAGS), f"{prefix}{name}/"
                    frames.append((sub, sub_prefix, _entries(sub, sub_prefix, name_filter)))
    finally:
        for fd, _, _ in frames:
            os.close(fd)


def _entries(fd: int, prefix: str, name_filter: NameFilter) -> Iterator[tuple[str, os.stat_result]]:
    """(name, lstat) of the not ignored entries of an open folder."""
    try:
        with os.scandir(fd) as listing:
            found = list(listing)
    except OSError as exc:
        log.warning("cannot list folder", folder=stored_path(prefix) or ".", error=exc.strerror)
        return
    for entry in found:
        if name_filter.match(entry.name) is not None:
            continue
        with contextlib.suppress(OSError):
            yield entry.name, entry.stat(follow_symlinks=False)


def _regular(st: os.stat_result) -> Signature | None:
    """The signature of a regular file; None for anything else."""
    return signature_of(st) if stat.S_ISREG(st.st_mode) else None


def _failed_read_record(rel: str, sighting: Sighting, found: OSError) -> Record:
    """The failed record of a file whose reading failed in the system (an I/O error...)."""
    seen = Inspection(sighting.signature, 1, described="a file that could not be read")
    why = found.strerror or str(found)
    return rel, seen, ("read_error", f"reading it failed: {why}")


def _unreadable_record(rel: str, sighting: Sighting, found: InputUnreadable) -> Record:
    """The failed record of a file the daemon never could read, from what ``lstat`` saw
    (its link count is unknown and no longer matters: the refusal is decided)."""
    seen = Inspection(sighting.signature, 1, described="a file the daemon cannot read")
    return rel, seen, (InputUnreadable.code, unreadable_message(found.message))


def refusal(found: Inspection, rel: str, allow_hardlinks: bool) -> tuple[str, str] | None:
    """(code, message) when a quiet input must fail rather than be queued, else None.

    Called once the file may be taken: an incomplete or empty file only gets here when
    intake gave up waiting for it.
    """
    if found.links > 1 and not allow_hardlinks:
        return "hard_link", hard_link_message(rel, found.links)
    if found.signature.size == 0:
        return "empty_file", "the file is empty (0 bytes)"
    if found.input_format is not None and found.signature.size > MAX_UPLOAD_BYTES:
        return "too_large", too_large_message(found.signature.size)  # complete or not
    if found.problem is not None:
        return "incomplete", f"{found.problem}; it stopped changing and never became complete"
    if found.input_format is None:
        return "unsupported_type", f"unsupported type: looks like {found.described} ({ACCEPTED})"
    return None


def too_large_message(size: int) -> str:
    """Why a file over the hub's upload limit is refused, and what a person can do."""
    return (
        f"the file is {size / 1e6:.1f} MB, more than the hub takes in one upload "
        f"({MAX_UPLOAD_BYTES / 1e6:g} MB); split it into "
        "smaller files or scan it at a lower resolution, then drop those in the inbox"
    )


def waiting_unreadable(rel: str, sighting: Sighting, found: InputUnreadable) -> Sighting:
    """A file the daemon may not read waits as an incomplete one does: it shows as
    stalled and fails only after ``incomplete_timeout``, time for a person to fix it."""
    message = unreadable_message(found.message)
    if sighting.problem is None or sighting.problem_code != InputUnreadable.code:
        log.warning("an input cannot be read by the daemon", path=rel, reason=message)
    return with_problem(sighting, message, InputUnreadable.code)


def unreadable_among(sightings: list[tuple[str, Sighting]]) -> list[str]:
    """The candidates that wait because the daemon could not read them."""
    return [
        rel
        for rel, sighting in sightings
        if sighting.problem is not None and sighting.problem_code == InputUnreadable.code
    ]


@dataclass(frozen=True)
class IntakeSettings:
    """The values intake needs (from the configuration, read once)."""

    inbox: Path
    outbox: Path
    router: Router
    perms: OutputPermissions
    name_filter: NameFilter
    patience: Patience
    allow_hardlinks: bool = False
    archive_dir: Path | None = None
    rescan_interval: float = 300.0


class Intake:
    """Tracks candidates until they are stable, then queues them."""

    def __init__(
        self,
        settings: IntakeSettings,
        db: Writer,
        enqueuer: Enqueuer,
        on_enqueued: Callable[[], None],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``enqueuer`` turns what intake takes into job rows (output names, refusals)."""
        self.settings = settings
        self.inbox = settings.inbox
        self.router = settings.router
        self.filter = settings.name_filter
        self.patience = settings.patience
        self.db = db
        self.clock = clock
        self.sightings: dict[str, Sighting] = {}  # stored path -> what we saw
        self.known: dict[str, Signature] = {}  # stored path -> version already taken
        self.present: set[str] = set()
        self.enqueuer = enqueuer
        self.stalls = Stalls(db)  # the inputs noted in the table's ``waiting`` list
        self.parked = Parking()  # quiet candidates that wait: nothing per tick
        self.behind: dict[str, tuple[int, Sighting]] = {}  # path -> (earlier job, sighting)
        self._empty_table = False
        self._next_behind_check = 0.0
        self.waited_since: dict[str, float] = {}  # waited on by the last run, since when
        self.paused = False  # disk nearly full: keep watching, take nothing
        self.holding: str | None = None  # why intake cannot record what it takes, if so
        self._on_enqueued = on_enqueued
        self._rescan_soon = False
        self._quiet_end = math.inf  # when the next candidate turns quiet
        self._next_look = 0.0  # when the sleeping loop will look again
        self._look_soon = asyncio.Event()
        self._folder_scans: dict[str, asyncio.Task[int]] = {}
        self.after_rescan: list[Callable[[], Awaitable[None]]] = []  # e.g. watch coverage

    # -- sources -------------------------------------------------------------------------

    async def load_known(self) -> None:
        """Read what the table already holds. The last run's waiting list is cleared, but
        each input on it keeps its waiting-since: a restart does not restart its clock."""
        versions = await self.db.call(self.db.store.versions)
        self.known = {path: Signature(*version) for path, version in versions.items()}
        waited = await self.db.call(Views(self.db.store).waiting)
        self.waited_since = {item.path: item.since for item in waited}
        await self.db.call(self.db.store.clear_waiting)
        # An empty table (a new or lost database): the start-up scan's files whose
        # output is already in the outbox are adopted rather than paid for again.
        self._empty_table = not versions

    async def scan(self, folder: Path | None = None) -> int:
        """Walk the inbox (or a folder in it); return how many new candidates it found."""
        sub = "" if folder is None else folder.relative_to(self.inbox).as_posix()
        sub = "" if sub == "." else sub
        entries = await asyncio.to_thread(self._walk, sub)
        now = self.clock()
        before = len(self.sightings)
        for fs_rel, signature in entries:
            self._consider(fs_rel, signature, now)
        if not sub:
            seen = {stored_path(fs_rel) for fs_rel, _ in entries}
            if self._empty_table:  # the start-up scan of an empty table
                self.enqueuer.adoptable, self._empty_table = set(seen), False
            del entries  # a large inbox: free the stat results before pruning
            await self._prune(seen)
            await self._recheck_unreadable()
        return len(self.sightings) - before

    def _walk(self, sub: str) -> list[tuple[str, Signature]]:
        """(path, signature) of every file below ``sub``: small from the start, since a
        scanner's inbox may hold 100,000 files."""
        return [(rel, signature_of(st)) for rel, st in walk_inbox(self.inbox, self.filter, sub)]

    async def _prune(self, seen: set[str]) -> None:
        # Versions of files no longer in the inbox need no memory; the table still has
        # them, and is asked again before anything is queued.
        self.known = {path: sig for path, sig in self.known.items() if path in seen}
        for rel in self.parked.keep_only(seen):  # removed while parked
            self.present.discard(rel)
            self.stalls.forget(rel)
        self.present &= seen | set(self.sightings)
        await self.stalls.flush(self.clock())

    def hint(self, path: str, is_dir: bool) -> None:
        """A watcher event: look at ``path`` soon (a folder is scanned)."""
        try:
            fs_rel = Path(path).relative_to(self.inbox).as_posix()
        except ValueError:
            return
        if fs_rel == "." or self.filter.ignored_part(fs_rel) is not None:
            return
        if is_dir:
            self._scan_folder_soon(fs_rel)
            return
        try:
            st = fs.lstat_below(self.inbox, fs_rel)
        except (OSError, ValueError):
            self._wake_parked(stored_path(fs_rel))  # removed: the next tick drops it
            return
        if stat.S_ISREG(st.st_mode):
            self._consider(fs_rel, signature_of(st), self.clock())
        else:
            self._wake_parked(stored_path(fs_rel))

    def _scan_folder_soon(self, fs_rel: str) -> None:
        # A folder created or moved in: its files may have no events of their own.
        if fs_rel in self._folder_scans:
            return
        task = asyncio.get_running_loop().create_task(self.scan(self.inbox / fs_rel))
        self._folder_scans[fs_rel] = task
        task.add_done_callback(lambda _: self._folder_scans.pop(fs_rel, None))

    def forget(self, path: str) -> None:
        """The worker withdrew a job of ``path`` (it changed or vanished): look again."""
        self.known.pop(path, None)
        held = self.behind.pop(path, None)
        if held is not None:  # the job it waited for ended: take it up again
            self.sightings.setdefault(path, held[1])
        try:
            st = fs.lstat_below(self.inbox, fs_path(path))
        except (OSError, ValueError):
            self.present.discard(path)
            return
        if stat.S_ISREG(st.st_mode):
            self._consider(fs_path(path), signature_of(st), self.clock())

    def pending(self) -> bool:
        """Whether a candidate is still to be taken (``once`` runs until none is)."""
        return bool(self.sightings or self.behind)

    def request_rescan(self) -> None:
        """Rescan the whole inbox at once (events were lost)."""
        self._rescan_soon = True
        self._look_soon.set()  # an idle intake sleeps until the rescan timer

    def _consider(self, fs_rel: str, signature: Signature, now: float) -> None:
        rel = stored_path(fs_rel)
        self.present.add(rel)
        if self.known.get(rel) == signature or rel in self.behind:
            return  # taken already, or waiting for its earlier version's job to end
        parked = self.parked.get(rel)
        if parked is not None:
            if parked.signature == signature:
                return  # a parked file that did not change costs nothing
            self.parked.unpark(rel)
        previous = parked or self.sightings.get(rel)
        sighting = observe(previous, signature, now)
        if previous is None and rel in self.waited_since:  # waited on before a restart
            sighting = dataclasses.replace(sighting, first_seen=self.waited_since.pop(rel))
        self.sightings[rel] = sighting
        self._expect(sighting.since + self.patience.quiet_period)

    def _wake_parked(self, rel: str) -> None:
        """An event names a parked file that may be gone: look at it on the next tick."""
        parked = self.parked.unpark(rel)
        if parked is not None:
            self.sightings[rel] = parked
            self._expect(0.0)

    def _expect(self, quiet_end: float) -> None:
        """A candidate turns quiet at ``quiet_end``: look then if that is before the next tick."""
        self._quiet_end = min(self._quiet_end, quiet_end)
        if quiet_end < self._next_look:
            self._look_soon.set()

    def _earliest_quiet_end(self, now: float) -> float:
        """When the next still-changing candidate turns quiet, or a parked one is due
        (inf when none)."""
        quiet = self.patience.quiet_period
        ends = (s.since + quiet for s in self.sightings.values() if s.since + quiet > now)
        return min(min(ends, default=math.inf), self.parked.next_due())

    # -- the tick --------------------------------------------------------------------------

    async def tick(self) -> None:
        """Re-examine every active candidate; queue those that became stable, park those
        that must wait."""
        if self.paused:
            return
        now = self.clock()
        for rel, sighting in self.parked.due(now):
            self.sightings[rel] = sighting  # due: to show as stalled, or to give up
        await self._release_behind(now)
        if not self.sightings:
            self._quiet_end = self.parked.next_due()
            return
        rels = list(self.sightings)
        looks = await asyncio.to_thread(fs.lstat_many, self.inbox, map(fs_path, rels), _regular)
        now = self.clock()
        ready: list[Ready] = []
        for rel, signature in zip(rels, looks, strict=True):
            if rel not in self.sightings:
                continue  # taken or dropped while we looked
            if signature is None:
                await self._drop(rel)  # gone (or replaced) before it was taken
                continue
            sighting = observe(self.sightings[rel], signature, now)
            self.sightings[rel] = sighting
            decision = verdict(sighting, now, self.patience)
            if decision is Verdict.WAIT:
                self._wait(rel, sighting, now)
            else:
                ready.append((rel, sighting, decision is Verdict.GIVE_UP))
        await self.stalls.flush(now)
        for start in range(0, len(ready), TAKE_BATCH):
            await self._take(ready[start : start + TAKE_BATCH])
        await self.stalls.flush(now)
        self._quiet_end = self._earliest_quiet_end(now)

    def _wait(self, rel: str, sighting: Sighting, now: float) -> None:
        """A candidate that must wait: note it when stalled, and park it once quiet."""
        stalled = self.stalls.judge(
            rel, stall(sighting, now, self.patience), sighting.waiting_since
        )
        if is_parkable(sighting, now, self.patience):
            del self.sightings[rel]
            due = next_look(sighting, self.patience, stalled=stalled)
            self.parked.park(rel, sighting, due)

    async def _release_behind(self, now: float) -> None:
        """Take up again the versions whose earlier job ended (looked at every second)."""
        if not self.behind or now < self._next_behind_check:
            return
        self._next_behind_check = now + BEHIND_CHECK_SECONDS
        waiting_on = [job_id for job_id, _ in self.behind.values()]
        running = await self.db.call(self.db.store.unfinished_ids, waiting_on)
        for rel, (job_id, sighting) in list(self.behind.items()):
            if job_id not in running:
                del self.behind[rel]
                self.sightings.setdefault(rel, sighting)

    async def _take(self, batch: list[Ready]) -> None:
        """Inspect quiet candidates; queue or refuse them, or keep waiting for the rest."""
        looks = await asyncio.to_thread(self._inspect_all, [rel for rel, _, _ in batch])
        records: list[Record] = []
        for (rel, sighting, final), found in zip(batch, looks, strict=True):
            if isinstance(found, OSError):  # this file alone fails; the rest go on
                records.append(_failed_read_record(rel, sighting, found))
                continue
            if isinstance(found, InputUnreadable):
                if final:
                    records.append(_unreadable_record(rel, sighting, found))
                else:
                    self.sightings[rel] = waiting_unreadable(rel, sighting, found)
                continue
            if isinstance(found, InputGone):
                log.info("candidate vanished", path=rel, reason=found.message)
                await self._drop(rel)
                continue
            if found.signature != sighting.signature:
                self.sightings[rel] = observe(sighting, found.signature, self.clock())
                continue
            refused = refusal(found, rel, self.settings.allow_hardlinks)
            if refused is None or refused[0] != "incomplete" or final:
                records.append((rel, found, refused))
                continue
            if sighting.problem is None:
                log.info("waiting for the rest of the file", path=rel, reason=found.problem)
            self.sightings[rel] = with_problem(sighting, found.problem)
        if records:
            await self._record(records)

    async def _recheck_unreadable(self) -> None:
        """At a full rescan, open again the candidates the daemon could not read (fixing
        a permission changes no signature, so nothing else would look at them); one
        that opens now loses its problem and the next tick takes it like any other."""
        rels = unreadable_among([*self.sightings.items(), *self.parked.items()])
        looks = await asyncio.to_thread(self._inspect_all, rels) if rels else []
        for rel, found in zip(rels, looks, strict=True):
            sighting = self.sightings.get(rel) or self.parked.get(rel)
            if sighting is None or isinstance(found, InputUnreadable):
                continue
            log.info("an input the daemon could not read can be read now", path=rel)
            self.parked.unpark(rel)
            self.sightings[rel] = with_problem(sighting, None)
            self.stalls.forget(rel)

    def _inspect_all(self, rels: list[str]) -> list[Inspection | InputGone | OSError]:
        looks: list[Inspection | InputGone | OSError] = []
        for rel in rels:
            try:
                allow = self.settings.allow_hardlinks  # a refused hard link is not read
                looks.append(inspect_input(self.inbox, rel, allow_hardlinks=allow))
            except (InputGone, OSError) as exc:
                looks.append(exc)
        return looks

    async def _record(self, records: list[Record]) -> None:
        """Queue (or refuse) a batch: rows inserted in one call of the single writer."""
        stored = await self.enqueuer.enqueue(records)
        queued = False
        for (rel, found, _), outcome in zip(records, stored, strict=True):
            self.sightings.pop(rel, None)
            self.stalls.forget(rel)
            if outcome.behind is not None:
                self._hold_behind(rel, found, outcome.behind)
                continue
            self.known[rel] = found.signature
            job = outcome.job
            if job is None or job.stage is Stage.DONE:
                queued = queued or job is None  # another instance queued it: ours to claim too
                if job is not None:
                    log.info(ADOPTED, path=rel, job_id=job.id, output=job.output)
                continue
            if outcome.superseded is not None:
                log.info(SUPERSEDED, path=rel, job_id=job.id, earlier_job_id=outcome.superseded)
            if outcome.refused is None:
                log.info("queued", path=rel, job_id=job.id)
                queued = True
                continue
            code, reason = outcome.refused
            log.warning("refused", path=rel, job_id=job.id, code=code, reason=reason)
            await self.enqueuer.write_error_file(job, code, reason)
        if queued:
            self._on_enqueued()

    def _hold_behind(self, rel: str, found: Inspection, job_id: int) -> None:
        """A new version waits until the job of its earlier version ends (that job is
        paid for, or being worked on): one job per path at a time."""
        sighting = Sighting(found.signature, self.clock())
        self.behind[rel] = (job_id, sighting)
        log.info(
            "a newer version waits until the job of the earlier one ends",
            path=rel,
            earlier_job_id=job_id,
        )

    async def _drop(self, rel: str) -> None:
        self.sightings.pop(rel, None)
        self.parked.unpark(rel)
        self.present.discard(rel)
        self.stalls.forget(rel)

    # -- running -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop``; rescan the whole inbox every ``rescan_interval``."""
        next_rescan = self.clock() + self.settings.rescan_interval
        stopping = asyncio.ensure_future(stop.wait())
        stopping.add_done_callback(lambda _: self._look_soon.set())  # a stop ends a doze
        try:
            while not stop.is_set():
                try:
                    next_rescan = await self._step(next_rescan)
                except StateUnavailable as exc:
                    # A full disk under the database: hold what was seen, try again soon.
                    if self.holding is None:
                        log.error("the state database failed; intake holds", error=exc.message)
                    self.holding = f"the state database failed: {exc.message}"
                    await _wait(stop, STATE_RETRY_SECONDS)
                    continue
                if self.holding is not None:
                    log.info("the state database works again; intake resumes")
                    self.holding = None
                await self._doze(stop, next_rescan)
        finally:
            stopping.cancel()

    async def _step(self, next_rescan: float) -> float:
        """One tick, and a rescan when it is due; return when the next rescan is."""
        await self.tick()
        if not self._rescan_soon and self.clock() < next_rescan:
            return next_rescan
        self._rescan_soon = False
        found = await self.scan()
        if found:
            log.info("rescan found files the watcher missed", count=found)
        for listener in self.after_rescan:
            await listener()
        return self.clock() + self.settings.rescan_interval

    async def _doze(self, stop: asyncio.Event, next_rescan: float) -> None:
        """Sleep until the next tick, or until the first candidate's quiet period ends, so a
        stable file is taken at once rather than up to a tick later. With no candidate
        there is nothing to tick for: sleep until the rescan, or until a file turns up."""
        while not stop.is_set() and not self._rescan_soon:
            self._look_soon.clear()
            now = self.clock()
            if self._quiet_end <= now:
                # Due: look now, but only once, since a paused tick does not recompute it
                # and returning at once again would spin the loop.
                self._quiet_end = math.inf
                return
            tick = TICK_SECONDS if self.pending() else max(0.0, next_rescan - now)
            self._next_look = min(now + tick, self._quiet_end + QUIET_MARGIN)
            try:
                async with asyncio.timeout(self._next_look - now):
                    await self._look_soon.wait()  # a new candidate may turn quiet sooner
            except TimeoutError:
                return


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
