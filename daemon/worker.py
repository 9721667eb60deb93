"""Worker: drive queued jobs through the hub to a published output.

One asyncio task per job in flight (at most ``max_in_flight``), no thread per job.
Each step reads the job row, does one idempotent piece of work and commits the result
(every remote id the moment it is known) before the next step, so a restart resumes
where the job stopped:

    pending/uploading -> uploaded -> submitting -> submitted -> downloading
        -> published -> done

Faults are handled by class: ``RetryLater`` defers the step with jittered backoff,
``JobFailed`` fails the job with its reason, ``AuthRejected`` pauses all work without
failing anything until the key is accepted again.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from daemon import outbox
from daemon.backoff import retry_delay
from daemon.client import HubClient, RemoteJob
from daemon.config import Settings
from daemon.db import Db
from daemon.errors import (
    AuthRejected,
    ConfigError,
    JobFailed,
    RemoteNotFound,
    RetryLater,
)
from daemon.formats import InputFormat
from daemon.inputs import MIME_TYPES, open_input, sha256_of, signature_of
from daemon.logs import get_logger
from daemon.ooxml import OoxmlProblem, verify_package
from daemon.stability import Signature
from daemon.store import FINAL_STAGES, Job, Stage

log = get_logger(component="worker")
MAX_SUBMITS = 3  # remote jobs per input before giving up (expired outputs, lost jobs)
Step = Callable[[Job], Awaitable[Job]]


class InputChanged(JobFailed):
    """The input changed after it was taken; the new version becomes a new job."""

    code = "input_changed"


class Pipeline:
    """Schedules job tasks and runs their steps."""

    def __init__(
        self,
        settings: Settings,
        db: Db,
        client: HubClient,
        key_source: Callable[[], str],
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.inbox = settings.inbox.absolute()
        self.outbox = settings.outbox.absolute()
        self.db = db
        self.client = client
        self.key_source = key_source
        self.clock = clock
        self.rng = rng or random.Random()
        self.active: dict[int, asyncio.Task[None]] = {}
        self.paused: str | None = None
        self.polling: set[int] = set()  # jobs only waiting on the hub: safe to cancel at once
        self._wake = asyncio.Event()
        self._steps: dict[Stage, Step] = {
            Stage.PENDING: self._upload,
            Stage.UPLOADING: self._upload,
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
        while not stop.is_set():
            self._wake.clear()
            if self.paused is None:
                await self._start_due()
            await self._sleep_until_needed(stop)

    async def _start_due(self) -> None:
        free = self.settings.max_in_flight - len(self.active)
        if free <= 0:
            return
        jobs = await self.db.call(self.db.store.runnable, self.clock(), free, list(self.active))
        for job in jobs:
            self.active[job.id] = asyncio.create_task(self._drive(job), name=f"job-{job.id}")

    async def _sleep_until_needed(self, stop: asyncio.Event) -> None:
        timeout = 5.0
        if self.paused is None and len(self.active) < self.settings.max_in_flight:
            due = await self.db.call(self.db.store.next_due)
            if due is not None:
                timeout = min(timeout, max(0.0, due - self.clock()))
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        _, pending = await asyncio.wait(
            waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for waiter in pending:
            waiter.cancel()

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
        if not self.active:
            return
        _, pending = await asyncio.wait(list(self.active.values()), timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)

    # -- one job ---------------------------------------------------------------------

    async def _drive(self, job: Job) -> None:
        bound = log.bind(job_id=job.id, path=job.path)
        started = self.clock()
        try:
            while job.stage not in FINAL_STAGES and self.paused is None:
                job = await self._steps[job.stage](job)
            if job.stage is Stage.DONE:
                bound.info(
                    "job completed",
                    output=job.output,
                    seconds=round(self.clock() - started, 3),
                    remote_job_id=job.remote_job_id,
                )
        except AuthRejected as exc:
            await self._pause(exc)
        except RetryLater as exc:
            await self._defer(job, exc)
        except JobFailed as exc:
            await self._fail(job, exc)
        except OSError as exc:
            # Local disk trouble (full disk, I/O error): keep the job and try later.
            err = RetryLater(f"local file error: {exc}", code="local_io")
            await self._defer(job, err)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            bound.exception("unexpected error in job step", stage=job.stage.value)
            err = RetryLater(f"internal error: {type(exc).__name__}: {exc}", code="internal")
            await self._defer(job, err)
        finally:
            self.active.pop(job.id, None)
            self.wake()

    async def _advance(self, job: Job, stage: Stage, **changes: object) -> Job:
        return await self.db.call(self.db.store.advance, job.id, stage, self.clock(), **changes)

    async def _defer(self, job: Job, exc: RetryLater) -> None:
        attempts = job.attempts + 1
        if attempts > self.settings.max_attempts:
            message = f"{exc.message} (gave up after {job.attempts} retries)"
            await self._fail(job, JobFailed(message, code=exc.code))
            return
        delay = retry_delay(attempts, retry_after=exc.retry_after, rng=self.rng)
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

    async def _fail(self, job: Job, exc: JobFailed) -> None:
        if isinstance(exc, InputChanged):
            log.info("input changed; its new version will be taken", job_id=job.id, path=job.path)
        failed = await self._advance(
            job, Stage.FAILED, error_code=exc.code, error_message=exc.message
        )
        text = outbox.error_text(job.path, exc.code, exc.message, self.clock(), job.id)
        try:
            await asyncio.to_thread(outbox.write_error_file, self.outbox, job.path, text)
        except OSError as err:
            log.error("cannot write the error file", job_id=job.id, error=str(err))
        log.error(
            "job failed",
            job_id=failed.id,
            path=failed.path,
            code=exc.code,
            reason=exc.message,
            remote_job_id=failed.remote_job_id,
        )

    # -- pause while the key is rejected -----------------------------------------------

    async def _pause(self, exc: AuthRejected) -> None:
        if self.paused is not None:
            return
        self.paused = exc.message
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
        job = await self._advance(job, Stage.UPLOADING)
        info, digest = await self._send_input(job)
        return await self._advance(
            job, Stage.UPLOADED, remote_file_id=info, sha256=digest, attempts=0
        )

    async def _send_input(self, job: Job) -> tuple[str, str]:
        expected = Signature(job.size, job.mtime_ns, job.inode)
        with open_input(self.inbox, job.path) as fd:
            _check_unchanged(fd, expected, job.path)
            digest = await asyncio.to_thread(sha256_of, fd)
            fmt = InputFormat(job.input_format) if job.input_format else InputFormat.PDF
            with os.fdopen(os.dup(fd), "rb") as stream:
                info = await self.client.upload(stream, Path(job.path).name, MIME_TYPES[fmt])
            _check_unchanged(fd, expected, job.path)
        return info.file_id, digest

    async def _submit(self, job: Job) -> Job:
        file_id = job.remote_file_id
        if file_id is None:  # only a hand-edited row gets here: start the job over
            return await self._advance(job, Stage.PENDING)
        if job.stage is Stage.SUBMITTING:
            adopted = await self._find_remote_job(file_id)
            if adopted is not None:
                return await self._advance(job, Stage.SUBMITTED, remote_job_id=adopted.job_id)
        if job.submits >= MAX_SUBMITS:
            raise JobFailed(
                f"gave up after {job.submits} conversions at the hub did not deliver an output",
                code=job.error_code or "too_many_submits",
            )
        job = await self._advance(job, Stage.SUBMITTING, submits=job.submits + 1)
        remote = await self.client.create_job(file_id, job.engine, job.language, job.output_format)
        return await self._advance(job, Stage.SUBMITTED, remote_job_id=remote.job_id, attempts=0)

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
        if remote.status == "failed":
            error = remote.error
            code = error.code if error else "remote_failed"
            message = error.message if error else "no error details returned by the hub"
            raise JobFailed(f"the hub could not convert it: {message}", code=code)
        if not remote.output_file_id:
            raise RetryLater("the hub reported completion without an output file")
        return await self._advance(
            job, Stage.DOWNLOADING, output_file_id=remote.output_file_id, attempts=0
        )

    async def _poll_until_final(self, remote_job_id: str) -> RemoteJob:
        hub = self.settings.hub
        while True:
            asked = self.clock()
            remote = await self.client.get_job(remote_job_id, wait=hub.poll_wait)
            if remote.is_final:
                return remote
            if remote.status not in ("queued", "processing"):
                raise RetryLater(f"the hub reported an unknown job status {remote.status!r}")
            # A hub that ignores ?wait answers at once; never poll faster than poll_interval.
            pause = hub.poll_interval - (self.clock() - asked)
            if pause > 0:
                await asyncio.sleep(pause)

    async def _download(self, job: Job) -> Job:
        if job.output_file_id is None or job.output is None:  # only a hand-edited row
            return await self._advance(job, Stage.PENDING)
        final = self.outbox / job.output
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = outbox.temp_path_for(final, job.id)
        try:
            await self.client.download(job.output_file_id, tmp)
            await asyncio.to_thread(_verify, tmp, job.output_format)
            await asyncio.to_thread(outbox.publish, tmp, final)
        except RemoteNotFound:
            outbox.discard(tmp)
            # The output expired at the hub before we fetched it: convert again.
            return await self._advance(job, Stage.PENDING, remote_job_id=None, output_file_id=None)
        except BaseException:
            outbox.discard(tmp)
            raise
        await asyncio.to_thread(outbox.remove_error_file, self.outbox, job.path)
        return await self._advance(
            job, Stage.PUBLISHED, attempts=0, error_code=None, error_message=None
        )

    async def _finish_input(self, job: Job) -> Job:
        policy = self.settings.on_success
        if policy == "delete":
            expected = Signature(job.size, job.mtime_ns, job.inode)
            await asyncio.to_thread(outbox.delete_input, self.inbox, job.path, expected)
        elif policy == "archive" and self.settings.archive_dir is not None:
            archive = self.settings.archive_dir.absolute()
            await asyncio.to_thread(outbox.archive_input, self.inbox, archive, job.path)
        return await self._advance(job, Stage.DONE)


def _check_unchanged(fd: int, expected: Signature, rel_path: str) -> None:
    if signature_of(os.fstat(fd)) != expected:
        raise InputChanged(
            f"{rel_path} changed after it was taken; the new version will be converted"
        )


def _verify(path: Path, output_format: str) -> None:
    try:
        verify_package(path, output_format)
    except OoxmlProblem as exc:
        raise RetryLater(
            f"the downloaded output is not a valid {output_format}: {exc}", code="bad_output"
        ) from exc
