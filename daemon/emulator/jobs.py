"""RenderOCR jobs: a state machine computed lazily from the ``Clock``, with no thread.

A job's times are fixed when it is created: queued until ``started_at``, processing until
``finished_at``, then completed or failed. It settles the first time any operation looks
after its end: its output is rendered and stored in the ``FileStore`` (or its failure
fixed), and its expiry starts. Views show a job as it stands at one instant. The jobs
share the file store's lock, as settling a job adds a file.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from daemon.emulator import bombs
from daemon.emulator.clock import Clock
from daemon.emulator.documents import write_package
from daemon.emulator.engine import JobRequest, parse_job_request
from daemon.emulator.files import MEDIA_TYPES, FileStore, remember
from daemon.emulator.gateway import Gateway
from daemon.emulator.inspection import Inspection, inspect_file
from daemon.emulator.knobs import Storage
from daemon.emulator.ledger import Ledger
from daemon.emulator.models import JobError, JobInfo, iso, new_id
from daemon.emulator.refusals import Expired, MissingInput, NotFound
from daemon.emulator.settings import HubSettings
from daemon.formats import SNIFF_BYTES

UPSTREAM_ERROR_MESSAGE = (
    "An error occurred while communicating with an upstream service. Please try again later."
)
_PROGRESS_STEPS = 10


class Renderer(Protocol):
    """Builds an output document; ``daemon.emulator.documents.render_document`` by default."""

    def __call__(
        self,
        output_format: str,
        *,
        source_name: str,
        engine: str,
        language: str,
        pages: int,
        input_format: str,
    ) -> bytes: ...


@dataclass
class Job:
    """One job as the hub keeps it: its request, its fixed times and, once settled, its end."""

    job_id: str
    file_id: str
    engine: str
    languages: tuple[str, ...]
    output_format: str
    source_name: str
    inspection: Inspection
    created_at: datetime
    started_at: datetime
    finished_at: datetime
    failure: JobError | None
    seq: int
    output_file_id: str | None = None
    settled: bool = False
    expires_at: datetime | None = None  # fixed when it settles (job_ttl may change later)


class Jobs:
    """Every live RenderOCR job; thread-safe through the file store's lock."""

    def __init__(
        self,
        files: FileStore,
        gateway: Gateway,
        *,
        settings: HubSettings,
        clock: Clock,
        ledger: Ledger,
        renderer: Renderer,
    ) -> None:
        self._files = files
        self._gateway = gateway
        self._settings = settings
        self._clock = clock
        self._ledger = ledger
        self._render = renderer
        self._jobs: dict[str, Job] = {}
        self._due: list[tuple[datetime, str]] = []  # unsettled jobs by finish time
        self._expiry: list[tuple[datetime, str]] = []
        self._gone: dict[str, None] = {}  # expired ids, oldest first (for a 410)
        self._seq = itertools.count()
        files.on_settle(self._settle)

    def create_job(self, body: object) -> JobInfo:
        """Validate a ``POST /renderocr/jobs`` body and queue the job.

        Refusals raise InvalidRequest. A file that is unsupported or broken is accepted
        here and the job fails later, as the real hub detects formats while converting.
        """
        request = parse_job_request(body)
        with self._files.lock:
            self._files.settle()
            found = self._files.source(request.file_id)
            if found is None:
                raise _no_such_input(request.file_id)
            path, source_name = found
        try:  # outside the lock: a big PDF takes a moment to scan
            inspection = inspect_file(path)
        except FileNotFoundError:  # expired while we looked
            raise _no_such_input(request.file_id) from None
        with self._files.lock:
            job = self._new_job(request, source_name, inspection)
            self._jobs[job.job_id] = job
            heapq.heappush(self._due, (job.finished_at, job.job_id))
            self._ledger.record("jobs", _ledger_entry(job))
            # The 202 answer shows the job as accepted: queued, whatever the queue delay.
            return self._view(job, job.created_at)

    def list_jobs(self) -> list[JobInfo]:
        """Every live job, newest first (no paging, as documented)."""
        with self._files.lock:
            now = self._files.settle()
            jobs = sorted(self._jobs.values(), key=lambda j: j.seq, reverse=True)
            return [self._view(job, now) for job in jobs]

    def get_job(self, job_id: str) -> JobInfo:
        """A job as it stands now; NotFound if unknown or expired."""
        with self._files.lock:
            now = self._files.settle()
            job = self._jobs.get(job_id)
            if job is None:
                gone = Expired if job_id in self._gone else NotFound
                raise gone("job_not_found", f"Job {job_id!r} does not exist or has expired.")
            return self._view(job, now)

    def job_terminal_at(self, job_id: str) -> datetime | None:
        """When a job reaches completed/failed on the clock (None if unknown), for long polls."""
        with self._files.lock:
            job = self._jobs.get(job_id)
            return None if job is None else job.finished_at

    def fill_outcomes(self, entries: list[dict[str, Any]], now: datetime) -> None:
        """Set the outcome of pending ledger entries whose job has ended by ``now``.

        Worked out without settling the jobs, so that reading the ledger never moves the
        rendering of outputs into the reader's thread.
        """
        with self._files.lock:
            for entry in entries:
                job = self._jobs.get(entry["job_id"]) if entry["outcome"] == "pending" else None
                if job is not None and job.finished_at <= now:
                    entry["outcome"] = "failed" if job.failure is not None else "completed"

    # -- the state machine --------------------------------------------------------------

    def _new_job(self, request: JobRequest, source_name: str, inspection: Inspection) -> Job:
        now = self._clock.now()
        started = now + timedelta(seconds=self._settings.queue_delay)
        failure: JobError | None = None
        if inspection.problem is not None:
            # The real hub sniffs while converting, so refusals come as soon as work starts.
            finished = started
            failure = JobError(*inspection.problem, request_id=new_id())
        else:
            finished = started + timedelta(seconds=self._gateway.draw_processing_time())
            if self._gateway.draw_job_failure(source_name):
                failure = JobError("upstream_service_error", UPSTREAM_ERROR_MESSAGE, new_id())
        return Job(
            job_id=self._files.new_id(),
            file_id=request.file_id,
            engine=request.engine,
            languages=request.languages,
            output_format=request.output_format,
            source_name=source_name,
            inspection=inspection,
            created_at=now,
            started_at=started,
            finished_at=finished,
            failure=failure,
            seq=next(self._seq),
        )

    def _settle(self, now: datetime) -> None:
        """Finish the jobs due by ``now`` and drop expired ones (the store's settle hook).

        Called under the store lock by every operation, so state is always current
        without any background thread.
        """
        while self._due and self._due[0][0] <= now:
            _, job_id = heapq.heappop(self._due)
            job = self._jobs.get(job_id)
            if job is not None:
                self._finish(job, now)
        while self._expiry and self._expiry[0][0] <= now:
            _, job_id = heapq.heappop(self._expiry)
            if self._jobs.pop(job_id, None) is not None:
                remember(self._gone, job_id)

    def _finish(self, job: Job, now: datetime) -> None:
        """Settle a job that reached its end: render its output file if it succeeded."""
        job.settled = True
        storage = self._gateway.knobs.storage
        job.expires_at = job.finished_at + timedelta(
            seconds=storage.job_ttl or self._settings.job_ttl
        )
        heapq.heappush(self._expiry, (job.expires_at, job.job_id))
        if job.failure is None:
            self._store_output(job, now, storage)
        outcome = "failed" if job.failure is not None else "completed"
        self._ledger.update_job(job.job_id, outcome=outcome)
        if job.failure is not None:
            self._gateway.arm_drops(job.source_name)

    def _store_output(self, job: Job, now: datetime, storage: Storage) -> None:
        """Render and store a completed job's output (or fail the job if rendering fails)."""
        output_id = self._files.new_id()
        job.output_file_id = output_id
        ttl = storage.output_ttl or self._settings.file_ttl
        if job.finished_at + timedelta(seconds=ttl) <= now:
            # The clock jumped past the output's own expiry: nothing left to store.
            self._files.forget(output_id)
            return
        fmt = job.inspection.input_format
        try:
            document = self._render(
                job.output_format,
                source_name=job.source_name,
                engine=job.engine,
                language=job.languages[0],
                pages=job.inspection.pages,
                input_format=fmt.value if fmt else "",
            )
        except Exception as exc:  # a renderer bug must show, not hang the job
            job.output_file_id = None
            job.failure = JobError("internal_error", f"Rendering failed: {exc}", new_id())
            return
        path = self._files.disk_path(output_id)
        size = self._write_output(path, document, job.output_format, storage)
        stem = PurePosixPath(job.source_name).stem or "output"
        self._files.add_output(
            output_id,
            f"{stem}.{job.output_format}",
            job.finished_at,
            ttl,
            size=size,
            head=document[:SNIFF_BYTES],
            media_type=MEDIA_TYPES[job.output_format],
        )

    def _write_output(self, path: Path, document: bytes, output_format: str, knobs: Storage) -> int:
        """Write an output: the document, padded to ``output_size``, or a bomb built from it."""
        if knobs.output_bomb == "none" or output_format not in bombs.MAIN_PARTS:
            return write_package(path, document, self._settings.output_size)
        if knobs.output_bomb == "zeros":
            members = bombs.zeros_bomb(document, knobs.bomb_bytes)
        else:
            members = bombs.deep_xml_bomb(document, output_format, knobs.bomb_depth)
        return bombs.write_zip(path, members)

    # -- views --------------------------------------------------------------------------

    def _view(self, job: Job, now: datetime) -> JobInfo:
        """The job as seen at ``now`` (already settled if its end has passed)."""
        knobs = self._gateway.knobs
        ttl = timedelta(seconds=knobs.storage.job_ttl or self._settings.job_ttl)
        return view(job, now, ttl, usage_on_failure=knobs.variants.usage_on_failure)


def view(job: Job, now: datetime, job_ttl: timedelta, *, usage_on_failure: bool) -> JobInfo:
    """A job as the API shows it at ``now``; ``job_ttl`` dates an unsettled job's expiry.

    A settled job is completed or failed; before that it is queued until it starts, then
    processing, its progress moving in tenths.
    """
    if job.settled:
        failed = job.failure is not None
        billed = job.inspection.pages
        usage = None if failed and not usage_on_failure else billed
        return JobInfo(
            job.job_id,
            job.file_id,
            job.engine,
            "failed" if failed else "completed",
            0.0 if failed else 1.0,  # failed jobs keep progress 0.0, as observed
            job.created_at,
            job.finished_at,
            job.finished_at,
            job.expires_at or job.finished_at + job_ttl,
            output_file_id=job.output_file_id,
            error=job.failure,
            usage=usage,
        )
    # Until completion expires_at is provisional (the real value is unknown).
    provisional_expiry = job.created_at + job_ttl
    if now <= job.started_at:
        return JobInfo(
            job.job_id,
            job.file_id,
            job.engine,
            "queued",
            0.0,
            job.created_at,
            job.created_at,
            None,
            provisional_expiry,
        )
    # Progress moves in tenths; updated_at is when the current tenth was reached.
    total = max(job.finished_at - job.started_at, timedelta(microseconds=1))
    step = min(_PROGRESS_STEPS - 1, int((now - job.started_at) / total * _PROGRESS_STEPS))
    return JobInfo(
        job.job_id,
        job.file_id,
        job.engine,
        "processing",
        step / _PROGRESS_STEPS,
        job.created_at,
        job.started_at + total * step / _PROGRESS_STEPS,
        None,
        provisional_expiry,
    )


def _ledger_entry(job: Job) -> dict[str, Any]:
    """The ledger's record of a job just created."""
    return {
        "job_id": job.job_id,
        "file_id": job.file_id,
        "engine": job.engine,
        "languages": list(job.languages),
        "output_format": job.output_format,
        "created_at": iso(job.created_at),
        # Exact end on the hub clock (epoch seconds), for latency benchmarks.
        "finishes_at": job.finished_at.timestamp(),
        # What is billed: this job's pages, whatever its outcome.
        "filename": job.source_name,
        "input_pages": job.inspection.pages,
        "outcome": "pending",  # then "completed" or "failed"
        "reply_lost": False,  # lose_create_replies cut the 202
    }


def _no_such_input(file_id: str) -> MissingInput:
    # The n8n node's docs list "400 Bad Request - invalid file_id" for this case.
    return MissingInput("invalid_file_id", f"File {file_id!r} does not exist or has expired.")
