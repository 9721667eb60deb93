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
import random
import time
from collections.abc import Awaitable, Callable
from typing import BinaryIO, cast

from daemon import formats
from daemon.errors import (
    InputChanged,
    InputGone,
    JobFailed,
    RemoteNotFound,
    Requeue,
    RetryLater,
)
from daemon.hub.client import HubClient
from daemon.hub.models import JobState, RemoteJob, epoch
from daemon.hub.polls import Poller
from daemon.inbox.inputs import HashingReader, check_unchanged, open_input, sha256_of
from daemon.jobs.model import RUNNING_REMOTE, Job, RemoteRecord, Stage
from daemon.jobs.writer import Writer
from daemon.logs import get_logger
from daemon.ops import failpoints, metrics
from daemon.ops.health import age_text
from daemon.outbox import duplicates
from daemon.outbox import publish as outbox
from daemon.outbox.layout import upload_name
from daemon.pipeline.delivery import Delivery, signature
from daemon.pipeline.faults import TRANSIENT_REMOTE_CODES
from daemon.pipeline.ledger import HubLedger
from daemon.pipeline.settings import StepSettings

log = get_logger(component="steps")


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
        delivery: Delivery,
        ledger: HubLedger,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        """``delivery`` fetches and places outputs; ``ledger`` records what the hub holds
        and billed (with the page budget it keeps in step)."""
        self.settings = settings
        self.writer = writer
        self.client = client
        self.poller = poller
        self.advance = advance
        self.delivery = delivery
        self.ledger = ledger
        self.pages = ledger.pages
        self.clock = clock
        self.rng = rng or random.Random()
        # Jobs whose last creation request certainly made nothing at the hub (a refusal,
        # no connection): their next attempt need not look for a job to adopt.
        self.nothing_created: set[int] = set()
        self.nothing_uploaded: set[int] = set()  # likewise for an upload: no listing

    def forget(self, job_id: int) -> None:
        """Drop what is remembered of a job that is final (or gone)."""
        self.nothing_created.discard(job_id)
        self.nothing_uploaded.discard(job_id)
        self.delivery.taken_over.pop(job_id, None)

    @property
    def taken_over(self) -> dict[int, str]:
        """Jobs taken over from an instance whose lease expired: job id -> that instance."""
        return self.delivery.taken_over

    def output_kept(self, job: Job) -> bool:
        """Whether the daemon keeps a downloaded output of ``job`` (publish, not fetch)."""
        return self.delivery.output_kept(job)

    def for_stage(self, stage: Stage) -> Callable[[Job], Awaitable[Job]]:
        """The step that moves a job on from ``stage``."""
        steps = {
            Stage.PENDING: self.upload,
            Stage.UPLOADING: self.upload,
            Stage.UPLOADED: self.submit,
            Stage.SUBMITTING: self.submit,
            Stage.SUBMITTED: self.await_remote,
            Stage.DOWNLOADING: self.delivery.download,
            Stage.DOWNLOADED: self.delivery.publish_kept,
            Stage.PUBLISHED: self.delivery.finish_input,
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
        try:
            listed = await self.client.list_files()  # newest first
        except JobFailed:
            return None  # a listing refused (404, a redirect): only a lookup, upload anew
        for info in listed:
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
        resumed = await self._resumed(job)
        if resumed is not None:
            return resumed
        if job.submits >= self.settings.max_conversions:
            raise JobFailed(
                f"the hub was paid for {job.submits} conversions of this file without "
                "delivering an output; run `ldx-hotfolder retry` to pay for another",
                code="too_many_conversions",
            )
        await self.pages.admit(job.id, job.pages)  # BudgetReached: wait, pay nothing
        if job.stage is not Stage.SUBMITTING:
            job = await self.advance(job, Stage.SUBMITTING)
        return await self._create(job, file_id)

    async def _resumed(self, job: Job) -> Job | None:
        """``job`` moved on to a remote job of this attempt the hub holds (one it still
        runs, or one a lost creation answer left behind); None when there is none."""
        records = await self._records(job)
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
        return None

    async def _create(self, job: Job, file_id: str) -> Job:
        """Ask the hub for a new, paid conversion of ``file_id``, noting when a refusal
        certainly made nothing (its pages are then released)."""
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

    async def _records(self, job: Job) -> list[RemoteRecord]:
        """The remote jobs made for ``job``, when they can matter: a job whose last
        creation certainly made nothing (a fresh upload, a refusal) has none running (a
        running one is recorded with the move to submitted, and is ended or lost before a
        job goes below it) and nothing to adopt, so it need not read them."""
        if job.id in self.nothing_created:
            return []
        return await self.writer.call(self.writer.store.remote_records, job.id)

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
            await self.ledger.record(job, job.remote_job_id, status="lost")
            return await self.advance(job, Stage.UPLOADED, remote_job_id=None)
        except TimeoutError:
            raise JobFailed(
                f"the hub kept the job {job.remote_job_id} running for "
                f"{age_text(self.settings.job_deadline)} without an end; it was given up "
                "(job_deadline)",
                code="hub_job_deadline",
            ) from None
        return await self._judge(job, remote)

    async def _judge(self, job: Job, remote: RemoteJob) -> Job:
        """Record the outcome (and what was billed), then go on or fail."""
        usage = remote.usage.input_pages if remote.usage else None
        expires = epoch(remote.expires_at)
        status = remote.state.value
        await self.ledger.record(
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
