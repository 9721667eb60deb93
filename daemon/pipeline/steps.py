"""The steps: one coroutine per stage, each doing one idempotent piece of work.

    pending/uploading -> submitting -> submitted -> downloading -> published -> done
                          (uploaded: convert again)     (downloaded: output kept)

Each step reads the job as last committed, does its work and commits the result through
the single writer before the next step, so a restart, a retry or another instance
resumes where the job stopped. Every id the hub gives is committed the moment it is
known (the upload's file id before the job is created, every remote job with its
outcome and expiry in ``remote_jobs``), so nothing paid for is paid for again:

- an upload interrupted by a crash is found again by its name (which carries the
  content hash) and size;
- a creation whose answer was lost is adopted from the hub's job list, but only a job
  made for this attempt: one on this upload that the job does not know yet, created
  no earlier than the ones it knows (the hub's timestamps compared with each other);
- an output that answers 404 before its expiry is "not yet" (storage lagging behind the
  job table) and is fetched again later, never converted again;
- at most ``max_conversions`` conversions are paid per input version without a person's
  ``retry``.

Outputs are downloaded to a temporary name in their folder, checked, and renamed into
place (``publish``). When the folder cannot be written (read-only, permissions), the
output is kept in the daemon's state folder and published once it can be, without a
new conversion.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from daemon import formats
from daemon.errors import (
    InputChanged,
    InputGone,
    JobFailed,
    NotYet,
    OoxmlProblem,
    RemoteNotFound,
    Requeue,
    RetryLater,
)
from daemon.hub.client import HubClient
from daemon.hub.models import JobState, RemoteJob, epoch
from daemon.hub.polls import Poller
from daemon.inbox.inputs import HashingReader, check_unchanged, open_input, sha256_of
from daemon.inbox.stability import Signature
from daemon.jobs.model import RUNNING_REMOTE, Job, RemoteRecord, Stage
from daemon.jobs.writer import Writer
from daemon.logs import get_logger
from daemon.ops import failpoints, metrics
from daemon.outbox import duplicates
from daemon.outbox import publish as outbox
from daemon.outbox.layout import upload_name
from daemon.outbox.permissions import OutputPermissions, make_dirs, open_output
from daemon.outbox.verify import verify_package
from daemon.pipeline.budget import PageBudget, PageLimits
from daemon.pipeline.faults import TRANSIENT_REMOTE_CODES

log = get_logger(component="steps")

MB = 1_000_000
LOST_OUTPUT_SECONDS = 600.0  # a 404 output with no expiry known is "not yet" this long
_PUBLISH_DENIED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


@dataclass(frozen=True)
class StepSettings:
    """The values the steps need (from the configuration, read once)."""

    inbox: Path
    outbox: Path
    held: Path  # where outputs that cannot be published yet are kept
    instance: str
    perms: OutputPermissions
    allow_hardlinks: bool = False
    on_duplicate: str = "reuse"
    on_success: str = "keep"
    archive_dir: Path | None = None
    max_conversions: int = 2
    resubmit_delay: float = 20.0
    job_deadline: float = 6 * 3600.0  # seconds the hub may keep one job running
    max_output_mb: float = 2000.0  # no output may be larger, whatever the input


def held_path(held: Path, job: Job) -> Path:
    """Where a job's output is kept while its folder refuses it (pure)."""
    return held / f"job-{job.id}.{job.output_format}"


def output_cap(size: int, ceiling_mb: float) -> int:
    """The most bytes an output of an input of ``size`` bytes may have (pure): ten times
    the input plus 50 MB, never more than the ceiling."""
    return int(min(ceiling_mb * MB, 10 * size + 50 * MB))


def signature(job: Job) -> Signature:
    """The input version a job describes."""
    return Signature(job.size, job.mtime_ns, job.inode)


def folder_of(path: str) -> str:
    """The first folder below the inbox of an input path ("" at the top)."""
    head, sep, _ = path.partition("/")
    return head if sep else ""


Advance = Callable[..., Awaitable[Job]]


class Steps:
    """The stage coroutines; ``advance(job, stage, **changes)`` commits each result."""

    def __init__(
        self,
        settings: StepSettings,
        writer: Writer,
        client: HubClient,
        poller: Poller,
        advance: Advance,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        pages: PageBudget | None = None,
    ) -> None:
        self.settings = settings
        self.writer = writer
        self.client = client
        self.poller = poller
        self.advance = advance
        self.clock = clock
        self.rng = rng or random.Random()
        self.pages = pages or PageBudget(PageLimits())  # the page budget; none by default
        # Jobs whose last creation request certainly made nothing at the hub (a refusal,
        # no connection): their next attempt need not look for a job to adopt.
        self.nothing_created: set[int] = set()
        self.nothing_uploaded: set[int] = set()  # likewise for an upload: no listing
        self.taken_over: dict[int, str] = {}  # job id -> the instance whose lease expired

    def forget(self, job_id: int) -> None:
        """Drop what is remembered of a job that is final (or gone)."""
        self.nothing_created.discard(job_id)
        self.nothing_uploaded.discard(job_id)
        self.taken_over.pop(job_id, None)

    def for_stage(self, stage: Stage) -> Callable[[Job], Awaitable[Job]]:
        """The step that moves a job on from ``stage``."""
        steps = {
            Stage.PENDING: self.upload,
            Stage.UPLOADING: self.upload,
            Stage.UPLOADED: self.submit,
            Stage.SUBMITTING: self.submit,
            Stage.SUBMITTED: self.await_remote,
            Stage.DOWNLOADING: self.download,
            Stage.DOWNLOADED: self.publish_kept,
            Stage.PUBLISHED: self.finish_input,
        }
        return steps[stage]

    # -- upload ------------------------------------------------------------------------

    async def upload(self, job: Job) -> Job:
        """Send the input (or adopt an upload a crash interrupted); duplicates per policy."""
        maybe_sent = job.stage is Stage.UPLOADING and job.id not in self.nothing_uploaded
        if maybe_sent and job.sha256 is not None:
            adopted = await self._find_upload(job, job.sha256)
            if adopted is not None:  # a job may have been created on it before the crash
                return await self._uploaded(job, adopted, job.sha256, fresh=False)
        try:
            with open_input(
                self.settings.inbox, job.path, allow_hardlinks=self.settings.allow_hardlinks
            ) as fd:
                check_unchanged(fd, signature(job), job.path)
                digest = await asyncio.to_thread(sha256_of, fd)
                job, done = await self._begin_upload(job, digest)
                if done:
                    return job
                info = await self._send(job, fd, digest)
        except RetryLater as exc:
            if not exc.maybe_done:  # refused (a 429) or never sent: nothing to look for
                self.nothing_uploaded.add(job.id)
            raise
        except InputGone as exc:
            raise InputChanged(f"{exc.message}; nothing was converted") from None
        failpoints.hit("after-upload")
        metrics.record_uploaded(job.size)
        return await self._uploaded(job, info, digest, fresh=True)

    async def _send(self, job: Job, fd: int, digest: str) -> tuple[str, float | None]:
        """Upload from the open input; InputChanged when what was sent is not the version
        hashed (its signature, or the hash of the bytes actually read)."""
        reader = HashingReader(fd)
        fmt = formats.InputFormat(job.input_format) if job.input_format else None
        name = upload_name(job.path, digest, fmt)
        mime = formats.MIME_TYPES[fmt] if fmt else "application/octet-stream"
        info = await self.client.upload(cast(BinaryIO, reader), name, mime, job.size)
        check_unchanged(fd, signature(job), job.path)
        if reader.hexdigest() != digest:
            raise InputChanged(
                f"{job.path} changed while it was uploaded; the new version will be converted"
            )
        return info.file_id, epoch(info.expires_at)

    async def _uploaded(
        self, job: Job, info: tuple[str, float | None], digest: str, *, fresh: bool
    ) -> Job:
        file_id, expires = info
        self.nothing_uploaded.discard(job.id)
        if fresh:
            self.nothing_created.add(job.id)  # no creation request was sent for this upload
        return await self.advance(
            job,
            Stage.SUBMITTING,
            remote_file_id=file_id,
            upload_expires_at=expires,
            sha256=digest,
            attempts=0,
        )

    async def _find_upload(self, job: Job, digest: str) -> tuple[str, float | None] | None:
        """An upload of this very content (its name carries the hash) that the hub keeps."""
        fmt = formats.InputFormat(job.input_format) if job.input_format else None
        name = upload_name(job.path, digest, fmt)
        for info in await self.client.list_files():  # newest first
            if info.filename == name and info.size == job.size:
                return info.file_id, epoch(info.expires_at)
        return None

    async def _begin_upload(self, job: Job, digest: str) -> tuple[Job, bool]:
        """Apply ``on_duplicate`` (True: the job is done without an upload), else mark
        the upload as begun, in one writer round trip."""
        policy = self.settings.on_duplicate
        if policy != "convert":
            args = (digest, job.engine, job.language, job.output_format, job.id)
            found = await self.writer.call(self.writer.store.converted_before, *args)
            if found is not None:
                done = await self._reuse_earlier(job, digest, found)
                if done is not None:
                    return done, True
        return await self.advance(job, Stage.UPLOADING, sha256=digest), False

    async def _reuse_earlier(self, job: Job, digest: str, found: tuple[Job, bool]) -> Job | None:
        """Apply ``on_duplicate`` to an input whose content was converted before (``found``:
        the earlier job, and whether its output is still its own); None means convert it."""
        earlier, current = found
        action = duplicates.decide(self.settings.on_duplicate, True, current)
        if action is duplicates.Action.CONVERT:
            return None
        if action is duplicates.Action.REUSE and not await self._copy_earlier(job, earlier):
            return None
        log.info(
            "same content was converted before; "
            + ("its output was reused" if action is duplicates.Action.REUSE else "skipped"),
            job_id=job.id,
            path=job.path,
            earlier_job_id=earlier.id,
            earlier_path=earlier.path,
        )
        await asyncio.to_thread(outbox.remove_error_file, self.settings.outbox, job.path)
        output = job.output if action is duplicates.Action.REUSE else None
        return await self.advance(
            job,
            Stage.PUBLISHED,
            sha256=digest,
            output=output,
            attempts=0,
            error_code=None,
            error_message=None,
        )

    async def _copy_earlier(self, job: Job, earlier: Job) -> bool:
        if earlier.output is None or job.output is None:
            return False
        return await asyncio.to_thread(
            duplicates.copy_output,
            self.settings.outbox,
            earlier.output,
            job.output,
            job.output_format,
            job_id=job.id,
            perms=self.settings.perms,
            instance=self.settings.instance,
        )

    # -- submit ------------------------------------------------------------------------

    async def submit(self, job: Job) -> Job:
        """Create the remote job (paid), or adopt one a lost answer left behind."""
        file_id = job.remote_file_id
        if file_id is None:  # only a hand-edited row gets here
            return await self.advance(job, Stage.PENDING)
        records = await self.writer.call(self.writer.store.remote_records, job.id)
        running = [r for r in records if r.status in RUNNING_REMOTE]
        if running:  # a conversion of this attempt the hub still runs: follow it
            return await self.advance(
                job, Stage.SUBMITTED, remote_job_id=running[-1].remote_job_id, attempts=0
            )
        maybe_sent = job.stage is Stage.SUBMITTING and job.id not in self.nothing_created
        if maybe_sent:
            adopted = await self._adoptable(job, records)
            if adopted is not None:
                return await self._created(job, adopted)
        if job.submits >= self.settings.max_conversions:
            raise JobFailed(
                f"the hub was paid for {job.submits} conversions of this file without "
                "delivering an output; run `ldx-hotfolder retry` to pay for another",
                code="too_many_conversions",
            )
        await self.pages.admit(job.id, job.pages)  # BudgetReached: wait, pay nothing
        if job.stage is not Stage.SUBMITTING:
            job = await self.advance(job, Stage.SUBMITTING)
        self.nothing_created.discard(job.id)
        try:
            created = await self.client.create_job(
                file_id, job.engine, job.language, job.output_format
            )
        except RetryLater as exc:
            if not exc.maybe_done:
                self.nothing_created.add(job.id)
                self.pages.release(job.id)
            raise
        except JobFailed as exc:
            self.nothing_created.add(job.id)
            self.pages.release(job.id)
            if await self._upload_lost(job, exc):
                return await self.advance(job, Stage.PENDING, remote_file_id=None)
            raise
        failpoints.hit("after-create")
        return await self._created(job, created)

    async def _adoptable(self, job: Job, records: list[RemoteRecord]) -> RemoteJob | None:
        """A remote job created for this attempt: on this upload, not one the job knows,
        created no earlier than the newest it knows (the hub's clock on both sides)."""
        assert job.remote_file_id is not None
        known = {record.remote_job_id for record in records}
        since = max((r.created_at for r in records if r.created_at is not None), default=None)
        for remote in await self.client.list_jobs():  # newest first
            if remote.file_id != job.remote_file_id or remote.job_id in known:
                continue
            created = epoch(remote.created_at)
            if since is not None and (created is None or created < since):
                continue
            return remote
        return None

    async def _upload_lost(self, job: Job, refusal: JobFailed) -> bool:
        """Whether a refused creation means the uploaded file is gone (expired): then the
        input is uploaded again (uploads are not billed), else the refusal stands."""
        if isinstance(refusal, RemoteNotFound):
            return True
        assert job.remote_file_id is not None
        try:
            await self.client.file_info(job.remote_file_id)
        except RemoteNotFound:
            return True
        return False

    async def _created(self, job: Job, remote: RemoteJob) -> Job:
        """Commit a remote job the moment it is known, with its conversion counted, in one
        transaction: a crash leaves both or neither."""
        assert job.remote_file_id is not None
        record = RemoteRecord(
            job.id, remote.job_id, job.remote_file_id, epoch(remote.created_at), "queued"
        )
        store, now = self.writer.store, self.clock()
        return await self.advance(
            job,
            Stage.SUBMITTED,
            along=lambda: store.record_remote(record, now),
            remote_job_id=remote.job_id,
            output_file_id=None,
            submits=job.submits + 1,
            attempts=0,
        )

    # -- await -------------------------------------------------------------------------

    async def await_remote(self, job: Job) -> Job:
        """Wait (with every other job, ``Poller``) until the hub ends the remote job."""
        if job.remote_job_id is None:  # only a hand-edited row gets here
            return await self.advance(job, Stage.UPLOADED)
        try:
            async with asyncio.timeout(self.settings.job_deadline):
                remote = await self.poller.until_final(
                    job.remote_job_id, engine=job.engine, pages=job.pages
                )
        except RemoteNotFound:
            # The hub forgot the job (expired, or lost): convert again from what it holds.
            await self._record(job, job.remote_job_id, status="lost")
            return await self.advance(job, Stage.UPLOADED, remote_job_id=None)
        except TimeoutError:
            hours = self.settings.job_deadline / 3600
            raise JobFailed(
                f"the hub kept the job {job.remote_job_id} running for {hours:g} h without "
                "an end; it was given up (job_deadline)",
                code="hub_job_deadline",
            ) from None
        return await self._judge(job, remote)

    async def _judge(self, job: Job, remote: RemoteJob) -> Job:
        """Record the outcome (and what was billed), then go on or fail."""
        usage = remote.usage.input_pages if remote.usage else None
        expires = epoch(remote.expires_at)
        status = remote.state.value
        await self._record(
            job,
            remote.job_id,
            status=status,
            output=remote.output_file_id,
            expires=expires,
            pages=usage,
            error=remote.error.code if remote.error else None,
        )
        if remote.state is JobState.COMPLETED and remote.output_file_id:
            return await self.advance(
                job,
                Stage.DOWNLOADING,
                output_file_id=remote.output_file_id,
                output_expires_at=expires,
                attempts=0,
            )
        error = remote.error
        code = error.code if error else "remote_failed"
        message = error.message if error else "no error details returned by the hub"
        if code in TRANSIENT_REMOTE_CODES and job.submits < self.settings.max_conversions:
            base = self.settings.resubmit_delay
            delay = min(6 * base, base * 2 ** max(job.submits - 1, 0)) * self.rng.uniform(1, 1.25)
            raise Requeue(Stage.UPLOADED, delay, code, message)
        raise JobFailed(f"the hub could not convert it: {message}", code=code)

    async def _record(
        self,
        job: Job,
        remote_job_id: str,
        *,
        status: str,
        output: str | None = None,
        expires: float | None = None,
        pages: int | None = None,
        error: str | None = None,
    ) -> None:
        """Update what the hub holds for ``remote_job_id`` (and note what it billed)."""
        record = RemoteRecord(
            job.id,
            remote_job_id,
            job.remote_file_id or "",
            None,
            status,
            output,
            expires,
            pages,
            error,
        )
        store, now = self.writer.store, self.clock()

        def save() -> bool:
            known = {r.remote_job_id: r for r in store.remote_records(job.id)}
            earlier = known.get(remote_job_id)
            created = earlier.created_at if earlier is not None else None
            kept = RemoteRecord(**{**record.__dict__, "created_at": created})
            store.record_remote(kept, now)
            return store.record_usage(job, kept, folder_of(job.path), now)

        billed = await self.writer.call(save)
        # At once after the commit: the budget's sums stay in step with the database.
        self.pages.settle(job.id, pages if billed else None)
        if billed and pages is not None:
            metrics.record_pages(folder_of(job.path), pages)

    # -- download and publish ----------------------------------------------------------

    async def download(self, job: Job) -> Job:
        """Fetch the output, check it, publish it (or keep it when its folder refuses)."""
        if job.output_file_id is None or job.output is None:  # only a hand-edited row
            return await self.advance(job, Stage.PENDING)
        final = self.settings.outbox / job.output
        tmp, kept = await asyncio.to_thread(self._download_target, job, final)
        try:
            with open_output(tmp) as sink:
                cap = output_cap(job.size, self.settings.max_output_mb)
                written = await self.client.download(job.output_file_id, sink, cap)
        except RemoteNotFound:
            outbox.discard(tmp)
            return await self._output_missing(job)
        except BaseException:
            outbox.discard(tmp)
            raise
        failpoints.hit("mid-download")
        metrics.record_downloaded(written)
        await asyncio.to_thread(self._verify, tmp, job)
        if kept:
            job = await self.advance(job, Stage.DOWNLOADED)
            raise _publish_denied(final, None)
        return await self._publish(job, tmp, final)

    def _download_target(self, job: Job, final: Path) -> tuple[Path, bool]:
        """Where to download: beside the output (True: in the held folder instead,
        because the output's folder cannot be written)."""
        previous = self.taken_over.get(job.id)
        if previous is not None:  # the partial download of the instance that died
            outbox.discard(outbox.temp_path_for(final, job.id, previous))
        try:
            make_dirs(self.settings.outbox, final.parent, self.settings.perms)
            tmp = outbox.temp_path_for(final, job.id, self.settings.instance)
            with open_output(tmp):
                pass
        except OSError as exc:
            if exc.errno not in _PUBLISH_DENIED:
                raise
            return self._held_path(job), True
        return tmp, False

    def held_path(self, job: Job) -> Path:
        """Where the daemon keeps ``job``'s output while its folder refuses it."""
        return held_path(self.settings.held, job)

    def output_kept(self, job: Job) -> bool:
        """Whether the daemon keeps a downloaded output of ``job`` (publish, not fetch)."""
        return self.held_path(job).exists()

    def _held_path(self, job: Job) -> Path:
        self.settings.held.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self.held_path(job)

    def _verify(self, path: Path, job: Job) -> None:
        try:
            verify_package(path, job.output_format)
        except OoxmlProblem as exc:
            outbox.discard(path)
            raise RetryLater(
                f"the downloaded output is not a valid {job.output_format}: {exc}",
                code="bad_output",
            ) from exc

    async def _publish(self, job: Job, tmp: Path, final: Path) -> Job:
        try:
            await asyncio.to_thread(self._place, tmp, final, job)
        except OSError as exc:
            if exc.errno not in _PUBLISH_DENIED:
                outbox.discard(tmp)
                raise
            await asyncio.to_thread(_move, tmp, self._held_path(job))
            job = await self.advance(job, Stage.DOWNLOADED)
            raise _publish_denied(final, exc) from None
        failpoints.hit("after-publish")
        return await self.published(job)

    def _place(self, tmp: Path, final: Path, job: Job) -> None:
        """Publish the checked output and drop a stale error file (one thread hop)."""
        outbox.publish(tmp, final, self.settings.perms)
        outbox.remove_error_file(self.settings.outbox, job.path)

    async def publish_kept(self, job: Job) -> Job:
        """Publish an output the daemon kept because its folder refused it before."""
        held = self.held_path(job)
        if not held.exists():  # lost (the state folder was cleaned): fetch it again
            return await self.advance(job, Stage.DOWNLOADING)
        assert job.output is not None
        final = self.settings.outbox / job.output

        def copy() -> Path:
            make_dirs(self.settings.outbox, final.parent, self.settings.perms)
            tmp = outbox.temp_path_for(final, job.id, self.settings.instance)
            _copy(held, tmp)
            return tmp

        try:
            tmp = await asyncio.to_thread(copy)
        except OSError as exc:
            if exc.errno not in _PUBLISH_DENIED:
                raise
            raise _publish_denied(final, exc) from None
        job = await self._publish(job, tmp, final)
        await asyncio.to_thread(outbox.discard, held)
        return job

    async def _output_missing(self, job: Job) -> Job:
        """The output answers 404: not yet (before its expiry), else convert again."""
        now = self.clock()
        expires = job.output_expires_at
        limit = expires if expires is not None else job.updated_at + LOST_OUTPUT_SECONDS
        if now < limit:
            raise NotYet(
                "the hub reports the job completed but its output is not there yet; "
                "fetching it again shortly (no new conversion)",
            )
        await self._record(job, job.remote_job_id or "", status="lost")
        return await self.advance(
            job, Stage.UPLOADED, remote_job_id=None, output_file_id=None, output_expires_at=None
        )

    async def published(self, job: Job, **changes: Any) -> Job:
        """The output is in place: done, or published with the input still to handle."""
        stage = Stage.PUBLISHED if self.handles_input(job) else Stage.DONE
        return await self.advance(
            job, stage, attempts=0, error_code=None, error_message=None, **changes
        )

    def handles_input(self, job: Job) -> bool:
        """Whether the input is deleted or archived once its output is published."""
        policy = job.on_success or self.settings.on_success
        return policy == "delete" or (policy == "archive" and self.settings.archive_dir is not None)

    # -- finish ------------------------------------------------------------------------

    async def finish_input(self, job: Job) -> Job:
        """Delete or archive the input, only the very version that was converted."""
        failpoints.hit("after-commit")
        policy = job.on_success or self.settings.on_success
        inbox = self.settings.inbox
        if policy == "delete":
            await asyncio.to_thread(outbox.delete_input, inbox, job.path, signature(job))
        elif policy == "archive" and self.settings.archive_dir is not None:
            archive = self.settings.archive_dir
            await asyncio.to_thread(outbox.archive_input, inbox, archive, job.path, signature(job))
        failpoints.hit("before-done")
        return await self.advance(job, Stage.DONE)


def _publish_denied(final: Path, exc: OSError | None) -> RetryLater:
    why = f" ({exc.strerror})" if exc is not None and exc.strerror else ""
    return RetryLater(
        f"the output folder {final.parent} cannot be written{why}; the downloaded output "
        "is kept by the daemon and published as soon as the folder can be written "
        "(no new conversion)",
        code="publish_failed",
    )


def _copy(source: Path, target: Path) -> None:
    with source.open("rb") as src, open_output(target) as dst:
        while chunk := src.read(1024 * 1024):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())


def _move(source: Path, target: Path) -> None:
    """Move a file, across filesystems if it must (copy, flush, remove)."""
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy(source, target)
        with contextlib.suppress(FileNotFoundError):
            source.unlink()
