"""LDX hub client: the RenderOCR API as the daemon sees it, in typed models.

``HubClient`` makes each call through ``daemon.hub.api`` (httpx, every failure already
translated into the project's tree) and reads the JSON body into a model that accepts
unknown fields and absent optional fields; a body that does not fit is the hub's
hiccup, retried like a 5xx. The calls themselves run in this process, or in a child
process (``daemon.hub.transfers``) while the models are still read here.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from daemon.errors import HubUnavailable
from daemon.hub.api import Calls, HubApi, InputUpload, JobRun, Progress, Sent

M = TypeVar("M", bound="_Model")


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class FileInfo(_Model):
    """A file in the hub's store (an upload or a conversion output)."""

    file_id: str
    filename: str | None = None
    size: int | None = None
    created_at: str | None = None
    expires_at: str | None = None


class JobError(_Model):
    """Why a remote job failed."""

    code: str = "unknown"
    message: str = "no error details returned by the hub"
    request_id: str | None = None


class RemoteJob(_Model):
    """A RenderOCR job as the hub reports it."""

    job_id: str
    file_id: str | None = None
    engine: str | None = None
    status: str
    progress: float | None = None
    output_file_id: str | None = None
    error: JobError | None = None
    created_at: str | None = None
    completed_at: str | None = None
    expires_at: str | None = None

    @property
    def is_final(self) -> bool:
        """Whether the hub will not change this job any more."""
        return self.status in ("completed", "failed")


class Language(_Model):
    """A language an engine offers."""

    code: str
    display_name: str | None = None


class Conversion(_Model):
    """One input format to output format pair an engine offers."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    from_: str = Field(alias="from")
    to: str


class Engine(_Model):
    """A RenderOCR engine with its languages and conversions."""

    id: str
    display_name: str | None = None
    description: str | None = None
    supported_conversions: list[Conversion] = []
    supported_languages: list[Language] = []


class _Page(_Model):
    data: list[dict[str, Any]] = []


@dataclass(frozen=True)
class SentInput:
    """What an upload of an input sent."""

    file_id: str
    sha256: str | None  # of the bytes actually sent; None unless read in order to the end


@dataclass(frozen=True)
class RunEvent:
    """One step of ``HubClient.run_job``: ``kind`` is "uploaded" (with what was sent),
    "created" or "polled" (with the job), "download" (its output is being fetched) or
    "written" (with the bytes)."""

    kind: str
    sent: SentInput | None = None
    job: RemoteJob | None = None
    written: int = 0


class Hub(Protocol):
    """The hub operations the daemon uses (``HubClient``; tests may stand in for it)."""

    def set_api_key(self, api_key: str) -> None: ...
    async def aclose(self) -> None: ...
    async def engines(self) -> list[Engine]: ...
    async def list_files(self) -> list[FileInfo]: ...
    async def upload_input(self, request: InputUpload) -> SentInput: ...
    async def create_job(
        self, file_id: str, engine: str, language: str, output_format: str
    ) -> RemoteJob: ...
    async def get_job(self, job_id: str, wait: int = 0) -> RemoteJob: ...
    async def list_jobs(self) -> list[RemoteJob]: ...
    async def download(self, file_id: str, dest: Path) -> int: ...
    def run_job(self, file_id: str, run: JobRun) -> AsyncGenerator[RunEvent, None]: ...
    def upload_and_run(
        self, request: InputUpload, sha256: str, run: JobRun
    ) -> AsyncGenerator[RunEvent, None]: ...


def read(model: type[M], body: Any, what: str) -> M:
    """``body`` as ``model``; HubUnavailable (retried) when it does not fit."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        # A 2xx body we cannot read: most likely a proxy or a gateway hiccup.
        raise HubUnavailable(f"{what}: unreadable response ({exc})", code="bad_response") from exc


def read_page(model: type[M], body: Any, what: str) -> list[M]:
    """The ``data`` list of a page, each item as ``model``."""
    return [read(model, item, what) for item in read(_Page, body, what).data]


class HubClient:
    """Async client for the RenderOCR part of the LDX hub API, answering in models."""

    def __init__(self, base_url: str, api_key: str, **options: Any) -> None:
        """A client making its calls in this process (``options`` as for ``HubApi``)."""
        self.calls: Calls = HubApi(base_url, api_key, **options)

    @classmethod
    def over(cls, calls: Calls) -> HubClient:
        """A client whose calls are made by ``calls`` (e.g. a transfer process)."""
        client = cls.__new__(cls)
        client.calls = calls
        return client

    def set_api_key(self, api_key: str) -> None:
        """Use another key from now on (after the operator fixed it)."""
        self.calls.set_api_key(api_key)

    async def aclose(self) -> None:
        """Close the connection pool (or stop the transfer process)."""
        await self.calls.aclose()

    async def __aenter__(self) -> HubClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def engines(self) -> list[Engine]:
        """``GET /renderocr/engines`` (public: sent without the key)."""
        return read_page(Engine, await self.calls.engines(), "list engines")

    async def list_files(self) -> list[FileInfo]:
        """``GET /files``: the files of this key; also proves the key is accepted."""
        return read_page(FileInfo, await self.calls.list_files(), "list files")

    async def upload(self, stream: BinaryIO, filename: str, content_type: str) -> FileInfo:
        """``POST /files`` with the multipart field ``file``; streamed from ``stream``."""
        if not isinstance(self.calls, HubApi):  # a stream cannot go to another process
            raise TypeError("streams are uploaded only with the hub calls in this process")
        return read(FileInfo, await self.calls.upload(stream, filename, content_type), "upload")

    async def upload_input(self, request: InputUpload) -> SentInput:
        """Open an inbox input, check it is the job's version, and upload it."""
        return _sent_input(await self.calls.upload_input(request))

    async def create_job(
        self, file_id: str, engine: str, language: str, output_format: str
    ) -> RemoteJob:
        """``POST /renderocr/jobs``: start converting an uploaded file."""
        body = await self.calls.create_job(file_id, engine, language, output_format)
        return read(RemoteJob, body, "create job")

    async def get_job(self, job_id: str, wait: int = 0) -> RemoteJob:
        """``GET /renderocr/jobs/{id}``, long-polling up to ``wait`` seconds when > 0."""
        return read(RemoteJob, await self.calls.get_job(job_id, wait), "poll job")

    async def list_jobs(self) -> list[RemoteJob]:
        """``GET /renderocr/jobs``: this key's jobs, newest first."""
        return read_page(RemoteJob, await self.calls.list_jobs(), "list jobs")

    async def download(self, file_id: str, dest: Path) -> int:
        """Stream ``GET /files/{id}/content`` into ``dest``; return the bytes written."""
        return await self.calls.download(file_id, dest)

    def run_job(self, file_id: str, run: JobRun) -> AsyncGenerator[RunEvent, None]:
        """Create a job, follow it and fetch its output in one call (``HubApi.run_job``),
        each step read as it comes."""
        return self._read_steps(self.calls.run_job(file_id, run))

    def upload_and_run(
        self, request: InputUpload, sha256: str, run: JobRun
    ) -> AsyncGenerator[RunEvent, None]:
        """Upload an input, then ``run_job`` if what was sent hashes to ``sha256``."""
        return self._read_steps(self.calls.upload_and_run(request, sha256, run))

    async def _read_steps(
        self, steps: AsyncGenerator[Progress, None]
    ) -> AsyncGenerator[RunEvent, None]:
        async with aclosing(steps):
            async for kind, value in steps:
                yield _event(kind, value)


def _event(kind: str, value: Any) -> RunEvent:
    """A step of ``HubApi.run_job`` with its body read into a model."""
    if kind == "uploaded":
        return RunEvent(kind, sent=_sent_input(cast(Sent, value)))
    if kind in ("created", "polled"):
        what = "create job" if kind == "created" else "poll job"
        return RunEvent(kind, job=read(RemoteJob, value, what))
    return RunEvent(kind, written=value if kind == "written" else 0)


def _sent_input(sent: Sent) -> SentInput:
    return SentInput(read(FileInfo, sent.body, "upload").file_id, sent.sha256)
