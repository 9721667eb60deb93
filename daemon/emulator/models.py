"""The hub's records as its API shows them: ids, times, FileInfo, JobInfo and downloads.

Plain frozen values with their JSON bodies; the store, the jobs and the HTTP layer all
speak them. Nothing here holds state or reads a clock.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal


def new_id() -> str:
    """Return a fresh id in the hub's style: 32 lowercase alphanumerics."""
    # Hex digits are lowercase alphanumerics too; one call instead of 32 choices.
    return secrets.token_hex(16)


def hostile_id() -> str:
    """Return a fresh id with '..', '/' and '%' in it (the ``hostile_ids`` knob).

    The "%2F" in it is literal: a client that percent-encodes the id sends "%252F"; one
    that forgets the "%" sends "%2F", which the hub decodes to "/" and does not know.
    """
    return f"../../x%2F{secrets.token_hex(12)}"


def iso(moment: datetime) -> str:
    """Format an aware datetime the hub's way: ISO-8601 UTC, whole seconds, ``Z``."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def clean_filename(name: str) -> str:
    """Keep only the last path component of a client-given name ("file" if none)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return base or "file"


Stamp = Callable[[datetime], str]
"""Formats a moment for an answer body."""


@dataclass(frozen=True)
class FileInfo:
    """The hub's FileInfo: metadata of one stored file."""

    file_id: str
    filename: str
    size: int
    created_at: datetime
    updated_at: datetime
    expires_at: datetime

    def to_json(self, stamp: Stamp = iso) -> dict[str, Any]:
        """Return the FileInfo body the API sends; ``stamp`` formats its times."""
        return {
            "file_id": self.file_id,
            "filename": self.filename,
            "size": self.size,
            "created_at": stamp(self.created_at),
            "updated_at": stamp(self.updated_at),
            "expires_at": stamp(self.expires_at),
        }


@dataclass(frozen=True)
class Download:
    """What the HTTP layer needs to stream a stored file."""

    file_id: str
    path: Path
    filename: str
    size: int
    media_type: str
    updated_at: datetime


@dataclass(frozen=True)
class JobError:
    """The JobError of a failed job."""

    code: str
    message: str
    request_id: str

    def to_json(self) -> dict[str, str]:
        """Return the ``error`` object of a failed job."""
        return {"code": self.code, "message": self.message, "request_id": self.request_id}


@dataclass(frozen=True)
class JobInfo:
    """A RenderOCR job as the API shows it at one instant."""

    job_id: str
    file_id: str
    engine: str
    status: Literal["queued", "processing", "completed", "failed"]
    progress: float
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    expires_at: datetime
    output_file_id: str | None = None
    error: JobError | None = None
    usage: int | None = None  # input pages billed, once known

    def to_json(self, stamp: Stamp = iso) -> dict[str, Any]:
        """Return the job body; ``output_file_id``/``error``/``usage`` only when they apply."""
        body: dict[str, Any] = {
            "job_id": self.job_id,
            "file_id": self.file_id,
            "engine": self.engine,
            "status": self.status,
            "progress": self.progress,
        }
        if self.output_file_id is not None:
            body["output_file_id"] = self.output_file_id
        if self.error is not None:
            body["error"] = self.error.to_json()
        if self.usage is not None:
            # Usage is documented with input_pages (fact sheet §7.3); billing per page makes
            # it likely on RenderOCR jobs, so completed jobs carry it unless told not to.
            body["usage"] = {"input_pages": self.usage}
        body["created_at"] = stamp(self.created_at)
        body["updated_at"] = stamp(self.updated_at)
        body["completed_at"] = None if self.completed_at is None else stamp(self.completed_at)
        body["expires_at"] = stamp(self.expires_at)
        return body
