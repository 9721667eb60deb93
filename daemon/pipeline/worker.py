"""Worker: drive queued jobs through the hub to a published output.

One asyncio task per job in flight (at most ``max_in_flight``), no thread per job.
Each step reads the job row, does one idempotent piece of work and commits the result
before the next step, so a restart resumes where the job stopped:

    pending/uploading -> submitting -> submitted -> downloading -> published -> done

Writes that no later step depends on are folded into their neighbours, since every
write is a round trip to the single writer. A new job makes one hub call for its four
requests (``_convert``): the duplicate lookup rides with the ``uploading`` mark, the
upload's file id is written with the remote job's id (``submitted``), and the output
once it is published (``done`` for an input that stays where it is). A restart in
between adopts the upload (``GET /files``) and then its job (``GET /renderocr/jobs``),
so nothing is paid for twice. A resumed job takes the stages one by one (``uploaded``
is only where a job waits to be converted again). A failure is handled from the stage
last committed (``latest``), never from where its step began.

Faults are handled by class: ``RetryLater`` defers the step with jittered backoff,
``JobFailed`` fails the job with its reason, ``AuthRejected`` pauses all work without
failing anything until the key is accepted again.

Jobs are claimed with a lease (``Store.claim``) so that several instances can share one
database: the leases of the jobs in flight are renewed every third of
``lease_seconds``, every change is written only while this instance still holds the job
(``LeaseLost`` otherwise: another instance took it over, and this one lets go), and a
deferred or finished job is let go at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from daemon.config import Settings
from daemon.errors import (
    AuthRejected,
    ConfigError,
    HubUnavailable,
    JobFailed,
    LeaseLost,
    RemoteNotFound,
    RetryLater,
)
from daemon.formats import InputFormat
from daemon.hub.api import FOLLOWED, InputUpload, JobRun, current_job
from daemon.hub.client import Hub, RemoteJob, RunEvent, SentInput
from daemon.inbox.inputs import (
    MIME_TYPES,
    InputChanged,
    InputGone,
    check_unchanged,
    open_input,
    sha256_of,
)
from daemon.inbox.stability import Signature
from daemon.jobs.offload import Offload
from daemon.jobs.store import FINAL_STAGES, Job, Stage
from daemon.jobs.writer import Db
from daemon.logs import get_logger
from daemon.ops import failpoints, metrics
from daemon.outbox import duplicates
from daemon.outbox import publish as outbox
from daemon.outbox.duplicates import Action
from daemon.outbox.layout import upload_name
from daemon.outbox.permissions import OutputPermissions, make_dirs
from daemon.outbox.verify import OoxmlProblem, verify_package
from daemon.pipeline.backoff import retry_delay
from daemon.pipeline.breaker import Breaker
from daemon.pipeline.hooks import HookEvent, Hooks

log = get_logger(component="worker")
MAX_SUBMITS = 3  # remote jobs per input before giving up (expired outputs, lost jobs)
# Hub-side failures that may well succeed when tried again (the hub already retried).
TRANSIENT_REMOTE_CODES = frozenset({"upstream_service_error", "internal_error", "timeout"})
# Failure codes whose jobs are re-armed by themselves after a cool-down.
TRANSIENT_CODES = TRANSIENT_REMOTE_CODES | {
    "hub_unavailable",
    "rate_limited",
    "network",
    "deadline",
    "bad_response",
    "bad_output",
    "short_download",
    "local_io",
    "too_many_submits",
    *(f"http_{code}" for code in (408, 500, 502, 503, 504)),
}
DISK_RETRY_SECONDS = 5.0
REARM_CHECK_SECONDS = 60.0
UPLOAD_MATCH_SLACK = 5.0  # seconds of clock difference tolerated when matching an upload
Step = Callable[[Job], Awaitable[Job]]


class _Requeue(Exception):
    """Internal: send a job back to an earlier stage after a delay."""

    def __init__(self, stage: Stage, delay: float, code: str, message: str) -> None:
        super().__init__(message)
        self.stage, self.delay, self.code, self.message = stage, delay, code, message


class Pipeline:
    """Schedules job tasks and runs their steps."""

    def __init__(
        self,
        settings: Settings,
        db: Db,
        client: Hub,
        key_source: Callable[[], str],
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        offload: Offload | None = None,
    ) -> None:
        self.settings = settings
        self.offload = offload or Offload()
        self.inbox = settings.inbox.absolute()
        self.outbox = settings.outbox.absolute()
        self.db = db
        self.client = client
        self.key_source = key_source
        self.clock = clock
        self.rng = rng or random.Random()
        self.active: dict[int, asyncio.Task[None]] = {}
        self.instance = settings.instance_id
        self.lease = settings.lease_seconds
        self.taken_over: dict[int, str] = {}  # job id -> the instance whose lease expired
        self.paused: str | None = None
        self.polling: set[int] = set()  # jobs only waiting on the hub: safe to cancel at once
        # Jobs this task moved to ``submitting`` itself with no create sent yet: nothing
        # at the hub to adopt, so no GET /renderocr/jobs before creating.
        self.fresh_submits: set[int] = set()
        # The row of each running job as last committed: a step that commits several
        # stages (``_convert``) and then fails is handled from where it got to.
        self.latest: dict[int, Job] = {}
        self.perms = OutputPermissions.of(settings.output_mode, settings.output_group)
        self.breaker = Breaker()
        self.hooks: Hooks | None = None  # set by the service when hooks are configured
        self.disk_low = False  # set by the service's free-space monitor
        self.on_disk_full: Callable[[], None] = lambda: None
        # InputChanged handling: intake looks at a withdrawn job's input again.
        self.on_input_changed: Callable[[str], None] = lambda path: None
        self._next_rearm_check = 0.0
        self._disk_full_reported = False  # one log line per full-disk episode
        self._wake = asyncio.Event()
        self._steps: dict[Stage, Step] = {
            Stage.PENDING: self._upload,
            Stage.UPLOADING: self._resume_upload,
            Stage.UPLOADED: self._submit,
            Stage.SUBMITTING: self._submit,
            Stage.SUBMITTED: self._await_remote,
            Stage.DOWNLOADING: self._download,
            Stage.PUBLISHED: self._finish_input,
        }

    def wake(self) -> None:
        """Look for runnable jobs now (new work arrived or a slot freed)."""
        self._wake.set()

    # -- scheduling ----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Start due jobs up to ``max_in_flight`` until ``stop`` is set."""
        stopping = asyncio.ensure_future(stop.wait())
        stopping.add_done_callback(lambda _: self._wake.set())  # a stop ends any sleep
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self._start_due()
                    await self._rearm_cooled_down()
                    await self._sleep_until_needed()
                except SQLAlchemyError as exc:
                    # The state database is unwritable (disk full, I/O error): wait, retry.
                    error = str(exc).splitlines()[0]
                    log.error("the state database failed; retrying", error=error)
                    await _wait(stop, DISK_RETRY_SECONDS)
        finally:
            stopping.cancel()

    def holding_back(self) -> str | None:
        """Why no new job may start now, or None."""
        if self.paused is not None:
            return "the API key is rejected"
        if self.disk_low:
            return "free disk space is low"
        if not self.breaker.allows(self.clock()):
            return "the hub keeps failing"
        return None

    async def _start_due(self) -> None:
        free = self.settings.max_in_flight - len(self.active)
        if free <= 0 or self.holding_back() is not None:
            return
        now = self.clock()
        store = self.db.store
        claims = await self.db.call(
            store.claim, now, free, list(self.active), self.instance, self.lease
        )
        for claim in claims:
            job = claim.job
            if claim.taken_over and claim.previous_owner is not None:
                self.taken_over[job.id] = claim.previous_owner
                log.warning(
                    "took over a job whose lease expired",
                    job_id=job.id,
                    path=job.path,
                    stage=job.stage.value,
                    previous_instance=claim.previous_owner,
                    lease_expired_at=claim.previous_lease,
                )
            self.active[job.id] = asyncio.create_task(self._drive(job), name=f"job-{job.id}")

    async def keep_leases(self, stop: asyncio.Event) -> None:
        """Renew the leases of the jobs in flight (and this instance's heartbeat row)
        until ``stop``; a job another instance took over meanwhile is let go."""
        while not stop.is_set():
            await _wait(stop, self.lease / 3)
            if stop.is_set():
                return
            now = self.clock()
            try:
                lost = await self.db.call(
                    self.db.store.renew, self.instance, list(self.active), now + self.lease, now
                )
            except SQLAlchemyError as exc:
                log.error("cannot renew the leases", error=str(exc).splitlines()[0][:200])
                continue
            for job_id in lost:
                task = self.active.get(job_id)
                if task is not None:
                    log.warning("another instance took this job over; letting go", job_id=job_id)
                    task.cancel()

    async def _rearm_cooled_down(self) -> None:
        settings = self.settings
        if settings.auto_retry_after <= 0 or self.clock() < self._next_rearm_check:
            return
        interval = min(REARM_CHECK_SECONDS, max(0.2, settings.auto_retry_after / 4))
        self._next_rearm_check = self.clock() + interval
        rearmed = await self.db.call(
            self.db.store.rearm_due,
            self.clock(),
            settings.auto_retry_after,
            TRANSIENT_CODES,
            settings.auto_retry_limit,
        )
        for job in rearmed:
            log.info("failed job re-armed after its cool-down", job_id=job.id, path=job.path)

    async def _sleep_until_needed(self) -> None:
        timeout = 5.0
        if self.settings.auto_retry_after > 0:
            timeout = min(timeout, max(0.0, self._next_rearm_check - self.clock()))
        reopen = self.breaker.open_until
        if reopen is not None and reopen > self.clock():
            timeout = min(timeout, reopen - self.clock())
        elif self.holding_back() is None and len(self.active) < self.settings.max_in_flight:
            due = await self.db.call(self.db.store.next_due, self.instance)
            if due is not None:
                timeout = min(timeout, max(0.0, due - self.clock()))
        # Runs once per finished job: no task per sleep, a stop sets _wake too (see run).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    async def idle(self) -> bool:
        """Whether no job is running or waiting (for ``once``)."""
        if self.active:
            return False
        return await self.db.call(self.db.store.unfinished_count) == 0

    async def shutdown(self, grace: float) -> None:
        """Let running steps finish for up to ``grace`` seconds, then cancel them.

        Cancelling is safe: every step is redone from the table on the next start.
        """
        for job_id in self.polling & set(self.active):
            self.active[job_id].cancel()
        if self.active:
            _, pending = await asyncio.wait(list(self.active.values()), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        try:  # let the other instances take what is left at once, not after the lease
            await self.db.call(self.db.store.release, self.instance, self.clock())
        except SQLAlchemyError as exc:
            log.error("cannot release the leases", error=str(exc).splitlines()[0][:200])

    # -- one job ---------------------------------------------------------------------

    async def _drive(self, job: Job) -> None:
        current_job.set(job.id)  # this task's requests carry the job id
        bound = log.bind(job_id=job.id, path=job.path)
        started = self.clock()
        timer = metrics.StageTimer(self.clock)
        try:
            while job.stage not in FINAL_STAGES and self.paused is None:
                with timer.stage(job.stage):
                    job = await self._steps[job.stage](job)
                self.breaker = self.breaker.success()
            if job.stage is Stage.DONE:
                metrics.record_finished("completed")
                bound.info(
                    "job completed",
                    output=job.output,
                    seconds=round(self.clock() - started, 3),
                    stages=timer.summary(),
                    remote_job_id=job.remote_job_id,
                )
                self._tell_hooks(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._handle(self.latest.get(job.id, job), exc)
        finally:
            self.latest.pop(job.id, None)
            self.active.pop(job.id, None)
            self.taken_over.pop(job.id, None)
            self.fresh_submits.discard(job.id)
            self.wake()

    async def _handle(self, job: Job, exc: Exception) -> None:
        """Deal with what stopped a job's step, by the exception's class."""
        try:
            await self._dispatch(job, exc)
        except LeaseLost:
            self._let_go(job)
        except SQLAlchemyError as db_exc:
            # Cannot even record the outcome; the row keeps its stage and is redone later.
            log.error("cannot record a job's outcome", job_id=job.id, error=str(db_exc)[:200])

    def _let_go(self, job: Job) -> None:
        log.warning(
            "another instance took this job over (this one's lease expired); letting go",
            job_id=job.id,
            path=job.path,
        )

    async def _dispatch(self, job: Job, exc: Exception) -> None:
        if isinstance(exc, LeaseLost):
            self._let_go(job)
        elif isinstance(exc, AuthRejected):
            await self._pause(exc)
        elif isinstance(exc, _Requeue):
            await self._requeue(job, exc)
        elif isinstance(exc, RetryLater):
            if isinstance(exc, HubUnavailable):
                self._hub_failed()
            await self._defer(job, exc)
        elif isinstance(exc, JobFailed):
            await self._fail(job, exc)
        elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            await self._disk_full(job, exc)
        elif isinstance(exc, OSError):
            await self._defer(job, RetryLater(f"local file error: {exc}", code="local_io"))
        elif isinstance(exc, SQLAlchemyError):
            raise exc
        else:
            log.exception("unexpected error in job step", job_id=job.id, stage=job.stage.value)
            message = f"internal error: {type(exc).__name__}: {exc}"
            await self._defer(job, RetryLater(message, code="internal"))

    def _hub_failed(self) -> None:
        was_open = self.breaker.is_open(self.clock())
        self.breaker = self.breaker.failure(self.clock())
        reopen = self.breaker.open_until
        if not was_open and reopen is not None and reopen > self.clock():
            log.error(
                "the hub keeps failing; no new work is started for a while",
                seconds=round(reopen - self.clock(), 1),
            )

    async def _disk_full(self, job: Job, exc: OSError) -> None:
        # Not the job's fault: do not count it as an attempt; the monitor pauses intake.
        self.on_disk_full()
        if not self._disk_full_reported:
            self._disk_full_reported = True
            log.error(
                "no space left on the disk; outputs wait until space is freed",
                path=str(exc.filename or self.outbox),
            )
        await self._advance(
            job,
            job.stage,
            next_attempt_at=self.clock() + DISK_RETRY_SECONDS,
            error_code="disk_full",
            error_message=f"no space left on the disk: {exc.filename or ''}".strip(),
        )

    async def _requeue(self, job: Job, exc: _Requeue) -> None:
        log.warning(
            "the hub failed the job; converting it again",
            job_id=job.id,
            path=job.path,
            code=exc.code,
            reason=exc.message,
            retry_in=round(exc.delay, 1),
        )
        await self._advance(
            job,
            exc.stage,
            remote_job_id=None,
            output_file_id=None,
            next_attempt_at=self.clock() + exc.delay,
            error_code=exc.code,
            error_message=exc.message,
        )

    async def _advance(self, job: Job, stage: Stage, **changes: object) -> Job:
        return await self.db.call(self._advance_call(job, stage, **changes))

    def _advance_call(self, job: Job, stage: Stage, **changes: object) -> Callable[[], Job]:
        """The store call that moves ``job`` to ``stage``, to run in the single writer."""
        # The worker holds the row as it stands: the store builds the new one from it.
        # Every change renews the lease; a deferred or final job is let go.
        now = self.clock()
        let_go = stage in FINAL_STAGES or changes.get("next_attempt_at") is not None
        changes["lease_until"] = None if let_go else now + self.lease
        advance = functools.partial(
            self.db.store.advance, job.id, stage, now, current=job, owner=self.instance, **changes
        )

        def run() -> Job:
            new = advance()
            if job.id in self.active:  # what a failure later in its step starts from
                self.latest[job.id] = new
            return new

        return run

    async def _defer(self, job: Job, exc: RetryLater) -> None:
        attempts = job.attempts + 1
        if attempts > self.settings.max_attempts:
            if job.stage is Stage.PUBLISHED:  # the output is out: only the input is stuck
                await self._leave_input(job, exc)
            else:
                message = f"{exc.message} (gave up after {job.attempts} retries)"
                await self._fail(job, JobFailed(message, code=exc.code))
            return
        delay = retry_delay(attempts, retry_after=exc.retry_after, rng=self.rng)
        metrics.record_error(exc.code, "retry", job.stage)
        log.warning(
            "step will be retried",
            job_id=job.id,
            path=job.path,
            stage=job.stage.value,
            error=exc.message,
            retry_in=round(delay, 2),
            attempt=attempts,
        )
        await self._advance(
            job,
            job.stage,
            attempts=attempts,
            next_attempt_at=self.clock() + delay,
            error_code=exc.code,
            error_message=exc.message,
        )

    async def _leave_input(self, job: Job, exc: RetryLater) -> None:
        """The output is published but the input cannot be deleted or archived: the job
        is done all the same (failing it would convert and pay again on retry), and the
        row and the log say why the input is still in the inbox."""
        verb = "deleted" if (job.on_success or self.settings.on_success) == "delete" else "archived"
        message = (
            f"the output {job.output} is published, but the input could not be {verb} "
            f"({exc.message}; tried {job.attempts + 1} times); it stays in the inbox"
        )
        done = await self._advance(
            job, Stage.DONE, attempts=0, error_code="input_kept", error_message=message
        )
        metrics.record_error("input_kept", "fail")
        metrics.record_finished("completed")
        where = "its folder" if verb == "deleted" else "its folder and archive_dir"
        log.error(
            f"job completed, but its input could not be {verb}",
            job_id=job.id,
            path=job.path,
            output=job.output,
            reason=exc.message,
            fix=f"check that the daemon may write to {where}; the input is not converted "
            "again, so remove or move it by hand",
        )
        self._tell_hooks(done)

    async def _fail(self, job: Job, exc: JobFailed) -> None:
        if isinstance(exc, InputChanged):
            await self._withdraw(job, exc)
            return
        failed = await self._advance(
            job, Stage.FAILED, error_code=exc.code, error_message=exc.message
        )
        text = outbox.error_text(job.path, exc.code, exc.message, self.clock(), job.id)
        try:
            await asyncio.to_thread(
                outbox.write_error_file, self.outbox, job.path, text, self.perms
            )
        except OSError as err:
            log.error("cannot write the error file", job_id=job.id, error=str(err))
        metrics.record_error(exc.code, "fail")
        metrics.record_finished("failed")
        log.error(
            "job failed",
            job_id=failed.id,
            path=failed.path,
            code=exc.code,
            reason=exc.message,
            stages=metrics.stage_summary(),
            remote_job_id=failed.remote_job_id,
        )
        self._tell_hooks(failed)

    def _tell_hooks(self, job: Job) -> None:
        if self.hooks is None or not self.hooks.enabled:
            return
        output = self.outbox / job.output if job.output and job.stage is Stage.DONE else None
        self.hooks.fire(
            HookEvent(
                job_id=job.id,
                status=job.status.value,
                input_path=self.inbox / job.path,
                input_rel=job.path,
                output_path=output,
                output_rel=job.output if output is not None else None,
                remote_job_id=job.remote_job_id,
                error_code=job.error_code,
                error_message=job.error_message,
                rule=job.rule,
            )
        )

    async def _withdraw(self, job: Job, exc: InputChanged) -> None:
        """The input changed or vanished before its upload counted: drop the job (nothing
        was converted, so nothing is lost) and let intake take the file again once stable;
        the new version then converts once, as a new job."""
        await self.db.call(self.db.store.withdraw, job.id, self.instance)
        log.info(
            "input changed before it was converted; job withdrawn, the file is taken again "
            "once it is stable",
            job_id=job.id,
            path=job.path,
            reason=exc.message,
        )
        self.on_input_changed(job.path)

    # -- pause while the key is rejected -----------------------------------------------

    async def _pause(self, exc: AuthRejected) -> None:
        if self.paused is not None:
            return
        self.paused = exc.message
        metrics.record_error(exc.code, "pause")
        log.error(
            "the LDX hub rejected the API key; all work is paused until it is accepted",
            reason=exc.message,
            fix="put a valid key in hub.api_key_file (read again every "
            f"{self.settings.auth_recheck_interval:g} s) or the systemd credential",
        )
        asyncio.get_running_loop().create_task(self._recheck_key())

    async def _recheck_key(self) -> None:
        while self.paused is not None:
            await asyncio.sleep(self.settings.auth_recheck_interval)
            try:
                self.client.set_api_key(self.key_source())
                await self.client.list_files()
            except (AuthRejected, ConfigError, RetryLater):
                continue
            log.info("the API key is accepted again; resuming work")
            self.paused = None
            self.wake()

    # -- steps -------------------------------------------------------------------------

    async def _upload(self, job: Job) -> Job:
        """Hash the input, mark the upload begun and send it; a job that may be converted
        at once goes on in the same hub call (``_convert``) and ends published."""
        allow = self.settings.allow_hardlinks
        try:
            with contextlib.ExitStack() as opened:
                fd = opened.enter_context(open_input(self.inbox, job.path, allow_hardlinks=allow))
                check_unchanged(fd, _signature(job), job.path)
                digest = await self.offload.run(job.size, sha256_of, fd)
                job, earlier = await self._begin_upload(job, digest)
                if earlier is not None:
                    done = await self._reuse_earlier(job, digest, earlier)
                    if done is not None:  # nothing is sent for these
                        return done
                    job = await self._advance(job, Stage.UPLOADING, sha256=digest)
                if job.output is not None and job.submits < MAX_SUBMITS:
                    return await self._convert(job, opened, fd, digest)
                file_id = await self._send_input(job, fd, digest)
        except InputGone as exc:
            raise InputChanged(f"{exc.message}; nothing was converted") from None
        failpoints.hit("after-upload")
        metrics.record_uploaded(job.size)
        job = await self._advance(
            job, Stage.SUBMITTING, remote_file_id=file_id, sha256=digest, attempts=0
        )
        self.fresh_submits.add(job.id)
        return job

    async def _convert(self, job: Job, opened: contextlib.ExitStack, fd: int, digest: str) -> Job:
        """Upload, create, follow and fetch in one hub call. The upload's and the job's
        ids are committed together as soon as the job exists; a restart before that
        commit adopts the upload, then looks for its job (``_resume_upload``)."""
        with self._temp_output(job) as (final, tmp):
            request = self._upload_request(job, digest)
            steps = self.client.upload_and_run(request, digest, self._run(job, tmp))
            async with contextlib.aclosing(steps):
                sent = (await _next(steps)).sent
                assert sent is not None  # upload_and_run starts with the upload
                self._check_sent(job, fd, digest, sent)
                opened.close()  # the input is not read again
                failpoints.hit("after-upload")
                metrics.record_uploaded(job.size)
                metrics.switch_stage(Stage.SUBMITTING)
                created = await _created(steps)
                failpoints.hit("after-create")
                job = await self._submitted(job, created.job_id, remote_file_id=sent.file_id)
                return await self._follow(job, steps, tmp, final)

    async def _begin_upload(self, job: Job, digest: str) -> tuple[Job, tuple[Job, bool] | None]:
        """One writer round trip: look for an earlier conversion of the same content and,
        unless ``on_duplicate`` applies to it, mark the upload as begun.

        Returns the job and, when the policy applies, the earlier job with whether its
        output is still its own (the job is then left at its stage).
        """
        policy = self.settings.on_duplicate
        store = self.db.store
        begin = self._advance_call(job, Stage.UPLOADING, sha256=digest)

        def run() -> tuple[Job, tuple[Job, bool] | None]:
            found = None
            if policy != "convert":
                args = (digest, job.engine, job.language, job.output_format, job.id)
                found = store.converted_before(*args)
            if found is None or duplicates.decide(policy, True, found[1]) is Action.CONVERT:
                return begin(), None
            return job, found

        return await self.db.call(run)

    async def _send_input(self, job: Job, fd: int, digest: str) -> str:
        """Upload the input; InputChanged when it changed meanwhile (its signature, or
        the hash of the bytes actually sent). ``fd`` stays open, so the version checked
        here is the one the upload opened again by its path (maybe in another process)."""
        sent = await self.client.upload_input(self._upload_request(job, digest))
        self._check_sent(job, fd, digest, sent)
        return sent.file_id

    def _upload_request(self, job: Job, digest: str) -> InputUpload:
        fmt = InputFormat(job.input_format) if job.input_format else InputFormat.PDF
        return InputUpload(
            inbox=self.inbox,
            path=job.path,
            signature=_signature(job),
            allow_hardlinks=self.settings.allow_hardlinks,
            filename=upload_name(job.path, digest),
            content_type=MIME_TYPES[fmt],
        )

    def _check_sent(self, job: Job, fd: int, digest: str, sent: SentInput) -> None:
        check_unchanged(fd, _signature(job), job.path)
        if sent.sha256 != digest:
            raise InputChanged(
                f"{job.path} changed while it was uploaded; the new version will be converted"
            )

    async def _reuse_earlier(self, job: Job, digest: str, found: tuple[Job, bool]) -> Job | None:
        """Apply ``on_duplicate`` to an input whose content was converted before (``found``:
        the earlier job, and whether its output is still its own); None means convert it."""
        earlier, current = found
        action = duplicates.decide(self.settings.on_duplicate, True, current)
        if action is Action.CONVERT:
            return None
        if action is Action.REUSE and not await self._copy_earlier(job, earlier):
            return None
        log.info(
            "same content was converted before; "
            + ("its output was reused" if action is Action.REUSE else "skipped"),
            job_id=job.id,
            path=job.path,
            earlier_job_id=earlier.id,
            earlier_path=earlier.path,
        )
        await asyncio.to_thread(outbox.remove_error_file, self.outbox, job.path)
        output = job.output if action is Action.REUSE else None
        return await self._advance(
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
            self.outbox,
            earlier.output,
            job.output,
            job.output_format,
            job_id=job.id,
            perms=self.perms,
            instance=self.instance,
        )

    async def _resume_upload(self, job: Job) -> Job:
        """An upload was under way when we stopped: adopt it if the hub has it."""
        adopted = await self._find_remote_file(job)
        if adopted is None:
            return await self._upload(job)
        log.info("adopted an upload from before a restart", job_id=job.id, file_id=adopted)
        # Its job may have been created in the same call (``_convert``): ``submitting``
        # makes the next step look for it before creating one.
        return await self._advance(job, Stage.SUBMITTING, remote_file_id=adopted, attempts=0)

    async def _find_remote_file(self, job: Job) -> str | None:
        # Match by name (it carries the content hash), size and time: the upload began
        # after the row's last update.
        if job.sha256 is None:
            return None  # recorded before the hash: upload again (uploads are not billed)
        name = upload_name(job.path, job.sha256)
        since = job.updated_at - UPLOAD_MATCH_SLACK
        for info in await self.client.list_files():
            created = _epoch(info.created_at)
            if info.filename == name and info.size == job.size and created >= since:
                return info.file_id
        return None

    async def _submit(self, job: Job) -> Job:
        file_id = job.remote_file_id
        if file_id is None:  # only a hand-edited row gets here: start the job over
            return await self._advance(job, Stage.PENDING)
        fresh = job.id in self.fresh_submits
        self.fresh_submits.discard(job.id)  # from here on a create may have been sent
        if job.stage is Stage.SUBMITTING and not fresh:
            # An earlier attempt may have created the job without us learning its id.
            adopted = await self._find_remote_job(file_id)
            if adopted is not None:
                return await self._submitted(job, adopted.job_id)
        if job.submits >= MAX_SUBMITS:
            raise JobFailed(
                f"gave up after {job.submits} conversions at the hub did not deliver an output",
                code=job.error_code or "too_many_submits",
            )
        if job.stage is not Stage.SUBMITTING:
            job = await self._advance(job, Stage.SUBMITTING)
        return await self._create_remote(job, file_id, fresh)

    async def _create_remote(self, job: Job, file_id: str, fresh: bool) -> Job:
        """Create the remote job and, in the same hub call, follow it and fetch its
        output (``run_job``); its id is committed as soon as the hub gives it."""
        if job.output is None:  # only a hand-edited row gets here
            return await self._advance(job, Stage.PENDING)
        with self._temp_output(job) as (final, tmp):
            steps = self.client.run_job(file_id, self._run(job, tmp))
            async with contextlib.aclosing(steps):
                try:
                    created = await _created(steps)
                except JobFailed as exc:
                    if fresh or not _upload_expired(exc):
                        raise  # a file the hub has just accepted is not expired: a real refusal
                    return await self._upload_again(job, exc)
                failpoints.hit("after-create")
                job = await self._submitted(job, created.job_id)
                return await self._follow(job, steps, tmp, final)

    def _run(self, job: Job, tmp: Path) -> JobRun:
        hub = self.settings.hub
        args = (job.engine, job.language, job.output_format, hub.poll_wait, hub.poll_interval)
        return JobRun(*args, tmp)

    async def _upload_again(self, job: Job, exc: JobFailed) -> Job:
        log.warning(
            "the uploaded file expired at the hub before its job was created; "
            "uploading it again (uploads are not billed)",
            job_id=job.id,
            path=job.path,
            reason=exc.message,
        )
        return await self._advance(job, Stage.PENDING, remote_file_id=None)

    async def _follow(
        self, job: Job, steps: AsyncGenerator[RunEvent, None], tmp: Path, final: Path
    ) -> Job:
        """The rest of a ``run_job``: the polls until the job ends, then its download
        (read to the call's end, so that nothing is left to cancel in the child)."""
        output_file_id, written = None, None
        self.polling.add(job.id)
        metrics.switch_stage(Stage.SUBMITTED)
        try:
            async for event in steps:
                if event.kind == "polled" and event.job is not None:
                    if event.job.status not in FOLLOWED:
                        self.polling.discard(job.id)
                        output_file_id = self._judge(job, event.job)
                elif event.kind == "download":
                    metrics.switch_stage(Stage.DOWNLOADING)
                elif event.kind == "written":
                    written = event.written
        except RemoteNotFound:
            # The hub forgot the job or its output (expired): convert again from the input.
            return await self._advance(job, Stage.PENDING, remote_job_id=None)
        finally:
            self.polling.discard(job.id)
        if output_file_id is None or written is None:
            raise RetryLater("the hub's job ended without its output being fetched")
        await self._place(tmp, final, job, written)
        return await self._published(job, output_file_id=output_file_id)

    async def _submitted(self, job: Job, remote_job_id: str, **changes: object) -> Job:
        """Record the job the hub created (and any other ``changes`` in the same commit)."""
        return await self._advance(
            job,
            Stage.SUBMITTED,
            remote_job_id=remote_job_id,
            submits=job.submits + 1,
            attempts=0,
            **changes,
        )

    async def _find_remote_job(self, file_id: str) -> RemoteJob | None:
        # We may have died after the hub created the job but before we stored its id.
        for remote in await self.client.list_jobs():
            if remote.file_id == file_id:
                return remote
        return None

    async def _await_remote(self, job: Job) -> Job:
        if job.remote_job_id is None:  # only a hand-edited row gets here
            return await self._advance(job, Stage.UPLOADED)
        self.polling.add(job.id)
        try:
            remote = await self._poll_until_final(job.remote_job_id)
        except RemoteNotFound:
            # The hub forgot the job (expired): convert again from the input.
            return await self._advance(job, Stage.PENDING, remote_job_id=None)
        finally:
            self.polling.discard(job.id)
        output = self._judge(job, remote)
        return await self._advance(job, Stage.DOWNLOADING, output_file_id=output, attempts=0)

    def _judge(self, job: Job, remote: RemoteJob) -> str:
        """The output file id of a remote job that left ``queued`` and ``processing``;
        raises what its failure (or an unknown status) means for this job."""
        if remote.status == "failed":
            error = remote.error
            code = error.code if error else "remote_failed"
            message = error.message if error else "no error details returned by the hub"
            if code in TRANSIENT_REMOTE_CODES and job.submits < MAX_SUBMITS:
                base = self.settings.resubmit_delay
                delay = min(6 * base, base * 2 ** (job.submits - 1)) * self.rng.uniform(1, 1.25)
                raise _Requeue(Stage.UPLOADED, delay, code, message)
            raise JobFailed(f"the hub could not convert it: {message}", code=code)
        if remote.status != "completed":
            raise RetryLater(f"the hub reported an unknown job status {remote.status!r}")
        if not remote.output_file_id:
            raise RetryLater("the hub reported completion without an output file")
        return remote.output_file_id

    async def _poll_until_final(self, remote_job_id: str) -> RemoteJob:
        hub = self.settings.hub
        while True:
            asked = self.clock()
            remote = await self.client.get_job(remote_job_id, wait=hub.poll_wait)
            if remote.status not in FOLLOWED:
                return remote  # final, or unknown (judged by the caller)
            # A hub that ignores ?wait answers at once; never poll faster than poll_interval.
            pause = hub.poll_interval - (self.clock() - asked)
            if pause > 0:
                await asyncio.sleep(pause)

    @contextlib.contextmanager
    def _temp_output(self, job: Job) -> Iterator[tuple[Path, Path]]:
        """The output's final path (its folder made) and this instance's temporary one,
        which is removed when the block fails."""
        assert job.output is not None  # callers check
        final = self.outbox / job.output
        make_dirs(self.outbox, final.parent, self.perms)
        tmp = outbox.temp_path_for(final, job.id, self.instance)
        try:
            yield final, tmp
        except BaseException:
            outbox.discard(tmp)
            raise

    async def _download(self, job: Job) -> Job:
        if job.output_file_id is None or job.output is None:  # only a hand-edited row
            return await self._advance(job, Stage.PENDING)
        with self._temp_output(job) as (final, tmp):
            previous = self.taken_over.get(job.id)
            if previous is not None:  # the partial download of the instance that died
                outbox.discard(outbox.temp_path_for(final, job.id, previous))
            try:
                written = await self.client.download(job.output_file_id, tmp)
                await self._place(tmp, final, job, written)
            except RemoteNotFound:
                outbox.discard(tmp)
                # The output expired at the hub before we fetched it: convert again.
                return await self._advance(
                    job, Stage.PENDING, remote_job_id=None, output_file_id=None
                )
        return await self._published(job)

    async def _place(self, tmp: Path, final: Path, job: Job, written: int) -> None:
        failpoints.hit("mid-download")
        await self.offload.run(written, self._place_output, tmp, final, job)
        metrics.record_downloaded(written)
        failpoints.hit("after-publish")

    async def _published(self, job: Job, **changes: object) -> Job:
        if self._disk_full_reported:
            self._disk_full_reported = False
            log.info("outputs are written again")
        # With nothing to do to the input, "published" and "done" are one write.
        stage = Stage.PUBLISHED if self._handles_input(job) else Stage.DONE
        return await self._advance(
            job, stage, attempts=0, error_code=None, error_message=None, **changes
        )

    def _handles_input(self, job: Job) -> bool:
        """Whether the input is deleted or archived once its output is published."""
        policy = job.on_success or self.settings.on_success
        return policy == "delete" or (policy == "archive" and self.settings.archive_dir is not None)

    def _place_output(self, tmp: Path, final: Path, job: Job) -> None:
        """Check the download, publish it, drop a stale error file (one worker-thread hop)."""
        _verify(tmp, job.output_format)
        outbox.publish(tmp, final, self.perms)
        outbox.remove_error_file(self.outbox, job.path)

    async def _finish_input(self, job: Job) -> Job:
        failpoints.hit("after-commit")
        policy = job.on_success or self.settings.on_success
        if policy == "delete":
            expected = Signature(job.size, job.mtime_ns, job.inode)
            await self.offload.run(0, outbox.delete_input, self.inbox, job.path, expected)
        elif policy == "archive" and self.settings.archive_dir is not None:
            archive = self.settings.archive_dir.absolute()
            await self.offload.run(0, outbox.archive_input, self.inbox, archive, job.path)
        failpoints.hit("before-done")
        return await self._advance(job, Stage.DONE)


async def _next(steps: AsyncGenerator[RunEvent, None]) -> RunEvent:
    """The next step of a hub call that must have one."""
    try:
        return await anext(steps)
    except StopAsyncIteration:
        raise HubUnavailable("the hub's answer ended too early", code="bad_response") from None


async def _created(steps: AsyncGenerator[RunEvent, None]) -> RemoteJob:
    """The job a ``run_job`` created (its first step)."""
    created = (await _next(steps)).job
    if created is None:
        raise HubUnavailable("the hub's answer skipped the job's creation", code="bad_response")
    return created


def _upload_expired(exc: JobFailed) -> bool:
    """Whether a refused job creation says its input file is gone: a 404, or the 400
    ``invalid_file_id`` that the facts sheet reports for an unknown or expired file."""
    return isinstance(exc, RemoteNotFound) or exc.code == "invalid_file_id"


def _epoch(stamp: str | None) -> float:
    if not stamp:
        return 0.0
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return 0.0


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


def _signature(job: Job) -> Signature:
    return Signature(job.size, job.mtime_ns, job.inode)


def _verify(path: Path, output_format: str) -> None:
    try:
        verify_package(path, output_format)
    except OoxmlProblem as exc:
        raise RetryLater(
            f"the downloaded output is not a valid {output_format}: {exc}", code="bad_output"
        ) from exc
