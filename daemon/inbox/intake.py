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
import math
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from itertools import islice
from pathlib import Path, PurePosixPath

from daemon.errors import InputGone, InputUnreadable, UnsafeOutputPath
from daemon.fs import fs_path, stored_path
from daemon.inbox.filters import NameFilter
from daemon.inbox.inputs import (
    Inspection,
    hard_link_message,
    inspect_input,
    open_folder,
    signature_of,
    unreadable_message,
)
from daemon.inbox.routing import Router
from daemon.inbox.stability import (
    Patience,
    Sighting,
    Signature,
    Verdict,
    observe,
    stall,
    verdict,
    with_problem,
)
from daemon.jobs.model import Entry, Job, NameClaims, NewJob
from daemon.jobs.store import Store
from daemon.jobs.writer import Writer
from daemon.logs import get_logger
from daemon.outbox import publish as outbox
from daemon.outbox.layout import output_candidates
from daemon.outbox.permissions import OutputPermissions, unsafe_component, unsafe_folder_message

log = get_logger(component="intake")
Ready = tuple[str, Sighting, bool]  # (path, sighting, giving up)
Record = tuple[str, Inspection, tuple[str, str] | None]  # (path, inspection, refusal)
TICK_SECONDS = 0.25
QUIET_MARGIN = 0.002  # look just after a quiet period ends, never just before
CLAIM_CANDIDATES = 50
FIRST_CANDIDATES = 2
TAKE_BATCH = 200  # candidates inspected and inserted per call of the single writer
ACCEPTED = "accepted: PDF, TIFF, JPEG, PNG, BMP"
# The hub takes at most "200 MB" in one POST /files (ldxhub-api.md), read here as MiB, the
# lenient reading the emulator uses too: a larger file is refused before it is uploaded
# in full for nothing. One between 200e6 bytes and 200 MiB is still sent, and the hub's
# own 413 fails it if the hub means decimal megabytes.
MAX_UPLOAD_BYTES = 200 * 1024 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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
                    sub, sub_prefix = os.open(name, _DIR_FLAGS, dir_fd=fd), f"{prefix}{name}/"
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
        f"({MAX_UPLOAD_BYTES // 2**20} MiB, {MAX_UPLOAD_BYTES / 1e6:.1f} MB); split it into "
        "smaller files or scan it at a lower resolution, then drop those in the inbox"
    )


def output_folder(rel: str) -> PurePosixPath:
    """The folder below the outbox that gets the output (and error file) of ``rel``."""
    return PurePosixPath(rel).parent


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
        on_enqueued: Callable[[], None],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.inbox = settings.inbox
        self.outbox = settings.outbox
        self.router = settings.router
        self.perms = settings.perms
        self.filter = settings.name_filter
        self.patience = settings.patience
        self.db = db
        self.clock = clock
        self.sightings: dict[str, Sighting] = {}  # stored path -> what we saw
        self.known: dict[str, Signature] = {}  # stored path -> version already taken
        self.present: set[str] = set()
        self.stalled: set[str] = set()  # paths noted in the table's ``waiting``
        self.paused = False  # disk nearly full: keep watching, take nothing
        self._on_enqueued = on_enqueued
        self._rescan_soon = False
        self._quiet_end = math.inf  # when the next candidate turns quiet
        self._next_look = 0.0  # when the sleeping loop will look again
        self._look_soon = asyncio.Event()
        self._folder_scans: dict[str, asyncio.Task[int]] = {}
        self.after_rescan: list[Callable[[], Awaitable[None]]] = []  # e.g. watch coverage

    # -- sources -------------------------------------------------------------------------

    async def load_known(self) -> None:
        """Read what the table already holds; forget the last run's waiting list."""
        versions = await self.db.call(self.db.store.versions)
        self.known = {path: Signature(*version) for path, version in versions.items()}
        await self.db.call(self.db.store.clear_waiting)

    async def scan(self, folder: Path | None = None) -> int:
        """Walk the inbox (or a folder in it); return how many new candidates it found."""
        sub = "" if folder is None else folder.relative_to(self.inbox).as_posix()
        sub = "" if sub == "." else sub
        entries = await asyncio.to_thread(lambda: list(walk_inbox(self.inbox, self.filter, sub)))
        now = self.clock()
        before = len(self.sightings)
        for fs_rel, st in entries:
            self._consider(fs_rel, st, now)
        if not sub:
            self._prune({stored_path(fs_rel) for fs_rel, _ in entries})
            await self._recheck_unreadable()
        return len(self.sightings) - before

    def _prune(self, seen: set[str]) -> None:
        # Versions of files no longer in the inbox need no memory; the table still has
        # them, and is asked again before anything is queued.
        self.known = {path: sig for path, sig in self.known.items() if path in seen}
        self.present &= seen | set(self.sightings)

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
            st = (self.inbox / fs_rel).lstat()
        except OSError:
            return
        if stat.S_ISREG(st.st_mode):
            self._consider(fs_rel, st, self.clock())

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
        try:
            st = (self.inbox / fs_path(path)).lstat()
        except OSError:
            self.present.discard(path)
            return
        if stat.S_ISREG(st.st_mode):
            self._consider(fs_path(path), st, self.clock())

    def request_rescan(self) -> None:
        """Rescan the whole inbox at the next tick (events were lost)."""
        self._rescan_soon = True

    def _consider(self, fs_rel: str, st: os.stat_result, now: float) -> None:
        rel = stored_path(fs_rel)
        self.present.add(rel)
        signature = signature_of(st)
        if self.known.get(rel) == signature:
            return
        sighting = observe(self.sightings.get(rel), signature, now)
        self.sightings[rel] = sighting
        self._expect(sighting.since + self.patience.quiet_period)

    def _expect(self, quiet_end: float) -> None:
        """A candidate turns quiet at ``quiet_end``: look then if that is before the next tick."""
        self._quiet_end = min(self._quiet_end, quiet_end)
        if quiet_end < self._next_look:
            self._look_soon.set()

    def _earliest_quiet_end(self, now: float) -> float:
        """When the next still-changing candidate turns quiet (inf when none)."""
        quiet = self.patience.quiet_period
        ends = (s.since + quiet for s in self.sightings.values() if s.since + quiet > now)
        return min(ends, default=math.inf)

    # -- the tick --------------------------------------------------------------------------

    async def tick(self) -> None:
        """Re-examine every candidate; queue those that became stable."""
        if self.paused or not self.sightings:
            return
        rels = list(self.sightings)
        stats = await asyncio.to_thread(self._lstat_all, rels)
        now = self.clock()
        ready: list[Ready] = []
        for rel, st in zip(rels, stats, strict=True):
            if rel not in self.sightings:
                continue  # taken or dropped while we looked
            if st is None or not stat.S_ISREG(st.st_mode):
                await self._drop(rel)  # gone (or replaced) before it was taken
                continue
            sighting = observe(self.sightings[rel], signature_of(st), now)
            self.sightings[rel] = sighting
            decision = verdict(sighting, now, self.patience)
            if decision is Verdict.WAIT:
                await self._note_stall(rel, sighting, now)
            else:
                ready.append((rel, sighting, decision is Verdict.GIVE_UP))
        for start in range(0, len(ready), TAKE_BATCH):
            await self._take(ready[start : start + TAKE_BATCH])
        self._quiet_end = self._earliest_quiet_end(now)

    def _lstat_all(self, rels: list[str]) -> list[os.stat_result | None]:
        results: list[os.stat_result | None] = []
        for rel in rels:
            try:
                results.append((self.inbox / fs_path(rel)).lstat())
            except OSError:
                results.append(None)
        return results

    async def _take(self, batch: list[Ready]) -> None:
        """Inspect quiet candidates; queue or refuse them, or keep waiting for the rest."""
        looks = await asyncio.to_thread(self._inspect_all, [rel for rel, _, _ in batch])
        records: list[Record] = []
        for (rel, sighting, final), found in zip(batch, looks, strict=True):
            if isinstance(found, InputUnreadable):
                if final:
                    records.append(_unreadable_record(rel, sighting, found))
                else:
                    self._wait_unreadable(rel, sighting, found)
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
            await self._record(await self._check_output_folders(records))

    def _wait_unreadable(self, rel: str, sighting: Sighting, found: InputUnreadable) -> None:
        """Keep a file the daemon may not read as an incomplete one is kept: it shows as
        stalled and fails only after ``incomplete_timeout``, time for a person to fix it."""
        message = unreadable_message(found.message)
        if sighting.problem is None or sighting.problem_code != InputUnreadable.code:
            log.warning("an input cannot be read by the daemon", path=rel, reason=message)
        self.sightings[rel] = with_problem(sighting, message, InputUnreadable.code)

    async def _recheck_unreadable(self) -> None:
        """At a full rescan, open again the candidates the daemon could not read.

        Fixing a permission changes no signature (chmod touches the ctime only, and
        attribute events are not watched), so nothing else would look at such a file
        before ``incomplete_timeout``. Once per rescan costs one open per such file and is
        soon enough; a file that opens now loses its problem and the next tick takes it
        like any quiet file.
        """
        rels = [
            rel
            for rel, sighting in self.sightings.items()
            if sighting.problem is not None and sighting.problem_code == InputUnreadable.code
        ]
        if not rels:
            return
        looks = await asyncio.to_thread(self._inspect_all, rels)
        for rel, found in zip(rels, looks, strict=True):
            sighting = self.sightings.get(rel)
            if sighting is None or isinstance(found, InputUnreadable):
                continue
            log.info("an input the daemon could not read can be read now", path=rel)
            self.sightings[rel] = with_problem(sighting, None)
            await self._clear_stall(rel)

    async def _check_output_folders(self, records: list[Record]) -> list[Record]:
        """Refuse the inputs whose output folder below the outbox (or, for inputs to be
        archived, whose archive folder) is a link or not a folder, now: the worker would
        find out only after the hub was paid."""
        wanted = [rel for rel, _, refused in records if refused is None]
        unsafe = await asyncio.to_thread(self._unsafe_folders, wanted)
        checked: list[Record] = []
        for rel, found, refused in records:
            why = unsafe.get(rel) if refused is None else None
            checked.append((rel, found, refused if why is None else (UnsafeOutputPath.code, why)))
        return checked

    def _unsafe_folders(self, rels: list[str]) -> dict[str, str]:
        """The inputs whose output or archive folder cannot be written into safely, each
        with the reason; each folder is looked at once."""
        archive = self.settings.archive_dir
        seen: dict[tuple[Path, PurePosixPath], str | None] = {}
        unsafe = {}
        for rel in rels:
            folder, roots = output_folder(rel), [self.outbox]
            if archive is not None and self.router.route(rel)[0].on_success == "archive":
                roots.append(archive.absolute())  # the archive mirrors the inbox too
            for root in roots:
                if (root, folder) not in seen:
                    culprit = unsafe_component(root, root / folder)
                    why = None if culprit is None else unsafe_folder_message(culprit, root)
                    seen[root, folder] = why
                if why := seen[root, folder]:
                    unsafe[rel] = why
                    break
        return unsafe

    def _inspect_all(self, rels: list[str]) -> list[Inspection | InputGone]:
        looks: list[Inspection | InputGone] = []
        for rel in rels:
            try:
                allow = self.settings.allow_hardlinks  # a refused hard link is not read
                looks.append(inspect_input(self.inbox, rel, allow_hardlinks=allow))
            except InputGone as exc:
                looks.append(exc)
        return looks

    async def _record(self, records: list[Record]) -> None:
        """Insert the rows of a batch in one call of the single writer."""
        news = []
        for index, (rel, found, refused) in enumerate(records):
            new, route_problem = self._new_job(rel, found)
            if refused is None and route_problem is not None:
                records[index] = (rel, found, ("bad_folder_settings", route_problem))
            news.append((new, records[index][2]))
        jobs = await self.db.call(self._store_jobs, news, self.clock())
        queued = False
        for (rel, found, refused), job in zip(records, jobs, strict=True):
            self.sightings.pop(rel, None)
            self.known[rel] = found.signature
            await self._clear_stall(rel)
            if job is None:
                queued = True  # another instance queued this version: ours to claim too
                continue
            if refused is None:
                log.info("queued", path=rel, job_id=job.id)
                queued = True
                continue
            log.warning("refused", path=rel, job_id=job.id, code=refused[0], reason=refused[1])
            await self._write_error_file(job, *refused)
        if queued:
            self._on_enqueued()

    def _new_job(self, rel: str, found: Inspection) -> tuple[NewJob, str | None]:
        chosen, problem = self.router.route(rel)
        new = NewJob(
            path=rel,
            size=found.signature.size,
            mtime_ns=found.signature.mtime_ns,
            inode=found.signature.inode,
            input_format=found.input_format.value if found.input_format else None,
            engine=chosen.engine,
            language=chosen.language,
            output_format=chosen.output_format,
            on_success=chosen.on_success,
            rule=chosen.source,
            pages=found.pages,
        )
        return new, problem

    def _store_jobs(
        self, news: list[tuple[NewJob, tuple[str, str] | None]], now: float
    ) -> list[Job | None]:
        """Claim output names and insert rows (runs in the single writer).

        Intake's lock row is held until the batch commits, so several instances seeing
        the same files claim output names one after the other; the unique version key
        inserts each version once whatever happens. A batch costs two statements (the
        claims, the inserts) and a rare third for an input whose first names are taken.
        """
        store: Store = self.db.store
        store.lock_intake()
        # The first candidates nearly always do: make (and look up) the long list only
        # when they are taken, since every candidate costs a path join and a parameter.
        firsts = [
            list(islice(output_candidates(new.path, new.output_format), FIRST_CANDIDATES))
            for new, _ in news
        ]
        claims = store.name_claims(
            [(new.path, first) for (new, _), first in zip(news, firsts, strict=True)]
        )
        entries: list[Entry] = []
        given: set[str] = set()  # names this batch's earlier inputs took
        for (new, refused), first, claim in zip(news, firsts, claims, strict=True):
            if claim.latest == (new.size, new.mtime_ns, new.inode):
                continue  # never queue a known version twice
            output = self._output_for(new, first, claim, given)
            given.add(output)
            entries.append((new, output, refused))
        added = store.add_jobs(entries, now)
        return [added.get(new.path) for new, _ in news]

    def _output_for(self, new: NewJob, first: list[str], claim: NameClaims, given: set[str]) -> str:
        """The output name of a new input: the first free candidate."""
        output = self._free_output(first, claim.taken | given, claim.mine)
        if output is not None:
            return output
        more = list(islice(output_candidates(new.path, new.output_format), CLAIM_CANDIDATES))
        taken = self.db.store.outputs_taken(more, except_path=new.path) | given
        return self._free_output(more, taken, claim.mine) or more[-1]

    def _free_output(
        self, candidates: list[str], taken: AbstractSet[str], mine: AbstractSet[str]
    ) -> str | None:
        """The first candidate no other input's job claims, and that is this input's own
        or free in the outbox; None when there is none."""
        for candidate in candidates:
            if candidate in taken:
                continue
            if candidate in mine or not (self.outbox / candidate).exists():
                return candidate
        return None

    async def _write_error_file(self, job: Job, code: str, message: str) -> None:
        text = outbox.error_text(job.path, code, message, self.clock(), job.id)
        try:
            await asyncio.to_thread(
                outbox.write_error_file, self.outbox, job.path, text, self.perms
            )
        except OSError as exc:
            log.error("cannot write the error file", job_id=job.id, error=str(exc))

    async def _drop(self, rel: str) -> None:
        self.sightings.pop(rel, None)
        self.present.discard(rel)
        await self._clear_stall(rel)

    # -- stalled files -------------------------------------------------------------------

    async def _note_stall(self, rel: str, sighting: Sighting, now: float) -> None:
        stalled = stall(sighting, now, self.patience)
        if stalled is None:
            await self._clear_stall(rel)
            return
        if rel in self.stalled:
            return
        self.stalled.add(rel)
        code, reason = stalled
        waited = round(now - sighting.waiting_since)
        log.warning("an input is stalled", path=rel, code=code, reason=reason, waited=waited)
        await self.db.call(
            self.db.store.note_waiting, rel, code, reason, sighting.waiting_since, now
        )

    async def _clear_stall(self, rel: str) -> None:
        if rel in self.stalled:
            self.stalled.discard(rel)
            await self.db.call(self.db.store.clear_waiting, [rel])

    # -- running -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop``; rescan the whole inbox every ``rescan_interval``."""
        next_rescan = self.clock() + self.settings.rescan_interval
        stopping = asyncio.ensure_future(stop.wait())
        stopping.add_done_callback(lambda _: self._look_soon.set())  # a stop ends a doze
        try:
            while not stop.is_set():
                await self.tick()
                if self._rescan_soon or self.clock() >= next_rescan:
                    self._rescan_soon = False
                    found = await self.scan()
                    if found:
                        log.info("rescan found files the watcher missed", count=found)
                    for listener in self.after_rescan:
                        await listener()
                    next_rescan = self.clock() + self.settings.rescan_interval
                await self._doze(stop)
        finally:
            stopping.cancel()

    async def _doze(self, stop: asyncio.Event) -> None:
        """Sleep until the next tick, or until the first candidate's quiet period ends, so a
        stable file is taken at once rather than up to a tick later."""
        while not stop.is_set():
            self._look_soon.clear()
            now = self.clock()
            if self._quiet_end <= now:
                # Due: look now, but only once, since a paused tick does not recompute it
                # and returning at once again would spin the loop.
                self._quiet_end = math.inf
                return
            self._next_look = min(now + TICK_SECONDS, self._quiet_end + QUIET_MARGIN)
            try:
                async with asyncio.timeout(self._next_look - now):
                    await self._look_soon.wait()  # a new candidate may turn quiet sooner
            except TimeoutError:
                return
