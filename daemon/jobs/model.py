"""The job model: statuses, stages and their legal transitions, and the rows as values.

Pure: no I/O. ``Status`` is what a person sees (queued, processing, completed, failed);
``Stage`` is how far a job got, finer, and what a restart resumes from. Every stage
change goes through ``check_transition``, which refuses an illegal one with a sentence
(as httpx's ``ClientState`` and arq's ``JobStatus`` keep a state and its rules together).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Any


class Status(enum.StrEnum):
    """Public job status, as shown by ``status`` and ``jobs``."""

    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


class Stage(enum.StrEnum):
    """How far a job got; finer than ``Status`` and what a restart resumes from."""

    PENDING = "pending"  # taken from the inbox, nothing sent yet
    UPLOADING = "uploading"  # the upload may have reached the hub
    UPLOADED = "uploaded"  # remote_file_id known; a new conversion is to be created
    SUBMITTING = "submitting"  # a remote job may exist for remote_file_id
    SUBMITTED = "submitted"  # remote_job_id known; converting at the hub
    DOWNLOADING = "downloading"  # output_file_id known
    DOWNLOADED = "downloaded"  # the output is kept by the daemon; publishing it failed
    PUBLISHED = "published"  # output in place; the input is still to be handled
    DONE = "done"
    FAILED = "failed"


_STATUS_OF_STAGE = {
    Stage.PENDING: Status.QUEUED,
    Stage.PUBLISHED: Status.COMPLETED,
    Stage.DONE: Status.COMPLETED,
    Stage.FAILED: Status.FAILED,
}


def status_of(stage: Stage) -> Status:
    """The public status a stage shows as."""
    return _STATUS_OF_STAGE.get(stage, Status.PROCESSING)


FINAL_STAGES = frozenset({Stage.DONE, Stage.FAILED})
UNFINISHED_STAGES = tuple(stage.value for stage in Stage if stage not in FINAL_STAGES)
# Where a job may go from each stage (besides staying where it is, to retry).
_RESTART = {Stage.PENDING, Stage.UPLOADED, Stage.SUBMITTING, Stage.FAILED}
TRANSITIONS: dict[Stage, frozenset[Stage]] = {
    Stage.PENDING: frozenset(
        {Stage.UPLOADING, Stage.SUBMITTING, Stage.PUBLISHED, Stage.DONE, Stage.FAILED}
    ),
    Stage.UPLOADING: frozenset(
        {Stage.PENDING, Stage.SUBMITTING, Stage.PUBLISHED, Stage.DONE, Stage.FAILED}
    ),
    Stage.UPLOADED: frozenset({*_RESTART, Stage.SUBMITTED}),
    Stage.SUBMITTING: frozenset({*_RESTART, Stage.SUBMITTED}),
    Stage.SUBMITTED: frozenset({*_RESTART, Stage.DOWNLOADING}),
    Stage.DOWNLOADING: frozenset({*_RESTART, Stage.DOWNLOADED, Stage.PUBLISHED, Stage.DONE}),
    Stage.DOWNLOADED: frozenset({Stage.DOWNLOADING, Stage.PUBLISHED, Stage.DONE, Stage.FAILED}),
    Stage.PUBLISHED: frozenset({Stage.DONE}),
    Stage.DONE: frozenset(),
    # A person's retry (or a re-arm) resumes from the furthest point the hub still holds.
    Stage.FAILED: frozenset(
        {*_RESTART, Stage.SUBMITTED, Stage.DOWNLOADING, Stage.DOWNLOADED, Stage.PUBLISHED}
    ),
}


class IllegalTransition(ValueError):
    """A stage change the model does not allow (a bug, never an input's fault)."""


def check_transition(before: Stage, after: Stage) -> None:
    """Refuse a stage change the model does not allow, with a sentence saying so."""
    if before is after or after in TRANSITIONS[before]:
        return
    allowed = ", ".join(sorted(s.value for s in TRANSITIONS[before])) or "nothing"
    raise IllegalTransition(
        f"a job cannot go from {before.value} to {after.value} (from {before.value}: {allowed})"
    )


@dataclass(frozen=True)
class Job:
    """One row of the jobs table."""

    id: int
    path: str
    size: int
    mtime_ns: int
    inode: int
    input_format: str | None
    sha256: str | None
    status: Status
    stage: Stage
    engine: str
    language: str
    output_format: str
    on_success: str | None
    rule: str | None
    hook_error: str | None
    output: str | None
    remote_file_id: str | None
    remote_job_id: str | None
    output_file_id: str | None
    attempts: int
    submits: int
    rearms: int
    next_attempt_at: float | None
    error_code: str | None
    error_message: str | None
    created_at: float
    updated_at: float
    finished_at: float | None
    owner: str | None = None
    lease_until: float | None = None
    pages: int | None = None  # counted at intake (PDF pages, TIFF frames); None: unknown
    upload_expires_at: float | None = None  # the hub's expiry of remote_file_id
    output_expires_at: float | None = None  # the hub's expiry of output_file_id

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> Job:
        """Build a Job from a row's mapping (column name -> value)."""
        values = {name: data[name] for name in JOB_FIELDS if name in data}
        values["status"] = STATUSES[values["status"]]
        values["stage"] = STAGES[values["stage"]]
        return cls(**values)


JOB_ORDER = tuple(f.name for f in fields(Job))
JOB_FIELDS = frozenset(JOB_ORDER)
STATUSES = {status.value: status for status in Status}
STAGES = {stage.value: stage for stage in Stage}


@dataclass(frozen=True)
class NewJob:
    """What intake knows about a stable input when it enters the queue."""

    path: str
    size: int
    mtime_ns: int
    inode: int
    input_format: str | None
    engine: str
    language: str
    output_format: str
    on_success: str | None = None
    rule: str | None = None
    pages: int | None = None


Entry = tuple[NewJob, str, tuple[str, str] | None]  # (input, output name, refusal)


@dataclass(frozen=True)
class RemoteRecord:
    """A remote job the hub made for a job (each one paid): what the hub holds for it."""

    job_id: int
    remote_job_id: str
    remote_file_id: str
    created_at: float | None  # the hub's clock
    status: str  # the last state seen: queued, processing, completed, failed, lost
    output_file_id: str | None = None
    expires_at: float | None = None  # the hub's clock: when the output goes
    pages: int | None = None  # what the hub billed (usage.input_pages)
    error_code: str | None = None


@dataclass(frozen=True)
class Instance:
    """A daemon sharing the state database (a row of ``instances``)."""

    id: str
    host: str
    pid: int
    started_at: float
    seen_at: float
    stopped_at: float | None = None


@dataclass(frozen=True)
class Claim:
    """A job an instance just claimed, and who held it before (a takeover when that
    was another instance whose lease had expired)."""

    job: Job
    previous_owner: str | None
    previous_lease: float | None

    @property
    def taken_over(self) -> bool:
        """Whether the job came from another instance whose lease expired."""
        return (
            self.previous_owner is not None
            and self.previous_owner != self.job.owner
            and self.previous_lease is not None
        )


@dataclass(frozen=True)
class Waiting:
    """An input that intake still waits on, and why (a row of ``waiting``)."""

    path: str
    code: str
    reason: str
    since: float
    noted_at: float


@dataclass(frozen=True)
class NameClaims:
    """What intake knows of an input's path before it claims an output name for it."""

    latest: tuple[int, int, int] | None  # (size, mtime_ns, inode) its newest job took
    mine: frozenset[str]  # output names its own jobs claimed
    taken: frozenset[str]  # the candidate names the jobs of other inputs claim


EXPIRY_MARGIN = 600.0  # seconds: a hub expiry this close counts as passed (clocks differ)
RUNNING_REMOTE = frozenset({"queued", "processing", "unknown"})


def _alive(expires_at: float | None, now: float) -> bool:
    return expires_at is None or expires_at - EXPIRY_MARGIN > now


def resume_point(
    job: Job, records: list[RemoteRecord], now: float, *, output_kept: bool = False
) -> tuple[Stage, dict[str, Any]]:
    """Where a job goes on from after a retry, a re-arm or a takeover: the furthest point
    the hub (or the daemon) still holds, so that nothing paid for is paid for again.

    A kept output is published; an unexpired output is downloaded; a remote job still
    running is followed; an unexpired upload is converted; else the input is uploaded
    again (uploads are not billed). ``records`` come oldest first.
    """
    if output_kept:
        return Stage.DOWNLOADED, {}
    for record in reversed(records):
        if (
            record.status == "completed"
            and record.output_file_id
            and _alive(record.expires_at, now)
        ):
            return Stage.DOWNLOADING, {
                "remote_job_id": record.remote_job_id,
                "remote_file_id": record.remote_file_id,
                "output_file_id": record.output_file_id,
                "output_expires_at": record.expires_at,
            }
        if record.status in RUNNING_REMOTE:
            return Stage.SUBMITTED, {
                "remote_job_id": record.remote_job_id,
                "remote_file_id": record.remote_file_id,
            }
    if job.remote_file_id is not None and _alive(job.upload_expires_at, now):
        return Stage.UPLOADED, {"remote_job_id": None, "output_file_id": None}
    return Stage.PENDING, {"remote_file_id": None, "remote_job_id": None, "output_file_id": None}


def paid_conversions(records: list[RemoteRecord]) -> int:
    """How many conversions the hub made for a job (each remote job is paid)."""
    return len(records)
