"""Delivery: the output of a completed conversion fetched, checked and put in place.

The output streams into a hidden temporary file beside its final name, capped and timed
by the hub client, is checked (``outbox.verify``, in a thread), and renamed into place
(``outbox.publish``). An output that answers 404 before its expiry is "not yet" (storage
lagging behind the job table) and is fetched again later, never converted again; after
its expiry the job converts again from what the hub still holds. When the output's
folder cannot be written (read-only, permissions), the output is kept in the daemon's
state folder and published as soon as the folder can be, without a new conversion.
Last, with ``on_success`` delete or archive, the very version that was converted leaves
the inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from daemon.errors import NotYet, OoxmlProblem, OutputRefused, RemoteNotFound, RetryLater
from daemon.hub.client import HubClient
from daemon.inbox.stability import Signature
from daemon.jobs.model import Job, Stage
from daemon.ops import failpoints, metrics
from daemon.outbox import publish as outbox
from daemon.outbox.permissions import make_dirs, open_output
from daemon.outbox.verify import verify_package
from daemon.pipeline.ledger import HubLedger
from daemon.pipeline.settings import StepSettings

MB = 1_000_000
LOST_OUTPUT_SECONDS = 600.0  # a 404 output with no expiry known is "not yet" this long
_PUBLISH_DENIED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
Advance = Callable[..., Awaitable[Job]]


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


class Delivery:
    """The download, publish and finish steps of a job."""

    def __init__(
        self,
        settings: StepSettings,
        client: HubClient,
        advance: Advance,
        ledger: HubLedger,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.client = client
        self.advance = advance
        self.ledger = ledger
        self.clock = clock
        self.taken_over: dict[int, str] = {}  # job id -> the instance whose lease expired

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
        except OutputRefused:  # a bomb: the same output would break the limit again
            outbox.discard(path)
            raise
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
        await self.ledger.record(job, job.remote_job_id or "", status="lost")
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
