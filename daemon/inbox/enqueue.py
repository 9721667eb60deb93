"""Enqueueing: inspected inputs become job rows, in one call of the single writer a batch.

Each input gets its route (rules, folder files, defaults) and an output name that no
other input's job claims and nothing foreign holds in the outbox (``outbox.layout``:
``scan.docx``, then ``scan.pdf.docx``, then ``scan.pdf (2).docx``...). A path keeps one
job at a time: a new version replaces an earlier one's job that nothing was paid for,
and otherwise waits until it ends. On an empty table (a new or lost database) an input
whose output is already in the outbox, newer than it, is adopted as converted rather
than paid for again. A refused input gets a failed row and an error file at once.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from itertools import islice
from pathlib import Path, PurePosixPath

from daemon import fs
from daemon.advice import os_error_text
from daemon.errors import OoxmlProblem, OutputRefused, UnsafeOutputPath
from daemon.inbox.inputs import Inspection
from daemon.inbox.routing import Router
from daemon.jobs.model import Entry, Job, NameClaims, NewJob, Stage
from daemon.jobs.store import Store
from daemon.jobs.writer import Writer
from daemon.logs import get_logger
from daemon.outbox import publish as outbox
from daemon.outbox.layout import error_file_for, output_candidates
from daemon.outbox.permissions import OutputPermissions, unsafe_component, unsafe_folder_message
from daemon.outbox.verify import verify_package

log = get_logger(component="intake")
Refusal = tuple[str, str] | None  # (code, message) of an input failed before it is sent
Record = tuple[str, Inspection, Refusal]  # (path, inspection, refusal)
CLAIM_CANDIDATES = 50
FIRST_CANDIDATES = 2

ADOPTED_NOTE = (
    "its output was already in the outbox when the state database had no record of it "
    "(a new or lost database); recorded as converted, not paid for again"
)


@dataclass(frozen=True)
class Stored:
    """What intake's writer call did with one new version of an input."""

    job: Job | None = None  # its new row (None: this version is in the table already)
    behind: int | None = None  # it waits until this unfinished job of its path ends
    superseded: int | None = None  # the unpaid job of an earlier version it replaced
    refused: Refusal = None  # why it failed before anything was sent


def _stored(job: Job | None, held: Stored | None, refused: Refusal) -> Stored:
    if held is None:
        return Stored(job, refused=refused)
    return Stored(job, held.behind, held.superseded, refused)


def _supersede(store: Store, earlier: Job | None, now: float) -> Stored | None:
    """One job per path (in the single writer): the job of an earlier version that
    nothing was paid for, and nobody holds, is withdrawn; any other makes the new
    version wait until it ends. None when the path has no unfinished job."""
    if earlier is None:
        return None
    if store.withdraw_unpaid(earlier.id, now):
        return Stored(superseded=earlier.id)
    return Stored(behind=earlier.id)


def _mark_adopted(store: Store, added: dict[str, Job], adopt: dict[str, str], now: float) -> None:
    """Record as converted the new jobs whose output was already in the outbox."""
    for path, output in adopt.items():
        job = added.get(path)
        if job is not None and job.output == output:
            added[path] = store.advance(
                job.id, Stage.DONE, now, error_code="adopted", error_message=ADOPTED_NOTE
            )


def output_folder(rel: str) -> PurePosixPath:
    """The folder below the outbox that gets the output (and error file) of ``rel``."""
    return PurePosixPath(rel).parent


def folder_problem(root: Path, folder: PurePosixPath) -> str | None:
    """Why nothing may be written into ``root/folder`` (a link or a file on the way, or
    a folder the daemon cannot look into), or None."""
    try:
        culprit = unsafe_component(root, root / folder)
    except OSError as exc:
        return f"its output folder {root / folder} cannot be looked at: {exc.strerror}"
    return None if culprit is None else unsafe_folder_message(culprit, root)


def path_too_long(root: Path, rel: str, output_format: str) -> str | None:
    """Why the output (or error file) of ``rel`` below ``root`` could not be created (a
    path or name over the system's limits), or None (pure)."""
    names = [*islice(output_candidates(rel, output_format), FIRST_CANDIDATES), error_file_for(rel)]
    for name in names:
        why = fs.too_long(root / name)
        if why is not None:
            return (
                f"the path it would get below {root} is too long for the system: {why}; "
                "move it to a folder nearer the top of the inbox or give it a shorter name"
            )
    return None


class Enqueuer:
    """Turns a batch of inspected inputs into job rows (see the module docstring)."""

    def __init__(
        self,
        db: Writer,
        outbox_root: Path,
        router: Router,
        perms: OutputPermissions,
        *,
        archive_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.archive_dir = archive_dir
        self.outbox = outbox_root
        self.router = router
        self.perms = perms
        self.clock = clock
        self.adoptable: set[str] = set()  # start-up files when the table was empty

    async def enqueue(self, records: list[Record]) -> list[Stored]:
        """Route each input and insert its row (queued, or failed when refused)."""
        records = await self._refuse_unsafe(records)
        news: list[tuple[NewJob, Refusal]] = []
        for rel, found, refused in records:
            new, route_problem = self.new_job(rel, found)
            if refused is None and route_problem is not None:
                news.append((new, ("bad_folder_settings", route_problem)))
            else:
                news.append((new, refused))
        adopt = await asyncio.to_thread(self._outputs_to_adopt, news) if self.adoptable else {}
        return await self.db.call(self.store_jobs, news, self.clock(), adopt)

    def _outputs_to_adopt(self, news: list[tuple[NewJob, Refusal]]) -> dict[str, str]:
        """The start-up inputs of an empty table whose first output name holds, in the
        outbox, a valid output newer than the input: path -> that output name."""
        found = {}
        for new, refused in news:
            if new.path not in self.adoptable:
                continue
            self.adoptable.discard(new.path)
            name = next(output_candidates(new.path, new.output_format))
            if refused is None and self._holds_output(new, name):
                found[new.path] = name
        return found

    def _holds_output(self, new: NewJob, name: str) -> bool:
        """Whether the outbox has at ``name`` a valid output written after ``new``'s version."""
        try:
            if folder_problem(self.outbox, output_folder(name)) is not None:
                return False
            st = fs.lstat_below(self.outbox, name)
            if not stat.S_ISREG(st.st_mode) or st.st_mtime_ns < new.mtime_ns:
                return False
            verify_package(self.outbox / name, new.output_format)
        except (OSError, OoxmlProblem, OutputRefused):
            return False
        return True

    def new_job(self, rel: str, found: Inspection) -> tuple[NewJob, str | None]:
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

    def store_jobs(
        self,
        news: list[tuple[NewJob, tuple[str, str] | None]],
        now: float,
        adopt: dict[str, str],
    ) -> list[Stored]:
        """Claim output names and insert rows (runs in the single writer).

        Intake's lock row is held until the batch commits, so several instances seeing
        the same files claim output names one after the other; the unique version key
        inserts each version once whatever happens. A batch costs three statements (the
        claims, the unfinished jobs of its paths, the inserts) and a rare fourth for an
        input whose first names are taken. A path keeps one job at a time: a new version
        replaces an earlier one's job nothing was paid for, else waits until it ends.
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
        running = store.unfinished_of([new.path for new, _ in news])
        entries: list[Entry] = []
        given: set[str] = set()  # names this batch's earlier inputs took
        held: dict[str, Stored] = {}
        for (new, refused), first, claim in zip(news, firsts, claims, strict=True):
            if claim.latest == (new.size, new.mtime_ns, new.inode):
                continue  # never queue a known version twice
            replaced = _supersede(store, running.get(new.path), now)
            if replaced is not None:
                held[new.path] = replaced
                if replaced.behind is not None:
                    continue
            output = adopt.get(new.path)
            if output is None or output in claim.taken | given:
                output = self._output_for(new, first, claim, given)
            given.add(output)
            entries.append((new, output, refused))
        added = store.add_jobs(entries, now)
        _mark_adopted(store, added, adopt, now)
        return [_stored(added.get(new.path), held.get(new.path), refused) for new, refused in news]

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
            if candidate in mine or not self._in_outbox(candidate):
                return candidate
        return None

    def _in_outbox(self, name: str) -> bool:
        """Whether the outbox has anything at ``name`` (a name it cannot even look up,
        too long for the system, counts as free: intake refuses those inputs anyway)."""
        try:
            return os.path.lexists(self.outbox / name)
        except (OSError, ValueError):
            return False

    async def write_error_file(self, job: Job, code: str, message: str) -> None:
        """The error file of a refused input, beside where its output would be."""
        text = outbox.error_text(job.path, code, message, self.clock(), job.id)
        try:
            await asyncio.to_thread(
                outbox.write_error_file, self.outbox, job.path, text, self.perms
            )
        except OSError as exc:
            log.error("cannot write the error file", job_id=job.id, error=os_error_text(exc))

    async def _refuse_unsafe(self, records: list[Record]) -> list[Record]:
        """Refuse the inputs whose output folder below the outbox (or, for inputs to be
        archived, whose archive folder) is a link or not a folder, now: the worker would
        find out only after the hub was paid."""
        wanted = [rel for rel, _, refused in records if refused is None]
        unsafe = await asyncio.to_thread(self._unsafe_folders, wanted)
        checked: list[Record] = []
        for rel, found, refused in records:
            why = unsafe.get(rel) if refused is None else None
            checked.append((rel, found, refused if why is None else why))
        return checked

    def _unsafe_folders(self, rels: list[str]) -> dict[str, tuple[str, str]]:
        """The inputs whose output or archive path cannot be made (too long for the
        system), or whose folder cannot be written into safely, each with (code,
        reason); each folder is looked at once."""
        archive = self.archive_dir
        seen: dict[tuple[Path, PurePosixPath], str | None] = {}
        unsafe = {}
        for rel in rels:
            folder, roots = output_folder(rel), [self.outbox]
            if archive is not None and self.router.route(rel)[0].on_success == "archive":
                roots.append(archive.absolute())  # the archive mirrors the inbox too
            for root in roots:
                too_long = path_too_long(root, rel, self.router.defaults["output_format"])
                if too_long is not None:
                    unsafe[rel] = ("path_too_long", too_long)
                    break
                if (root, folder) not in seen:
                    seen[root, folder] = folder_problem(root, folder)
                if why := seen[root, folder]:
                    unsafe[rel] = (UnsafeOutputPath.code, why)
                    break
        return unsafe
