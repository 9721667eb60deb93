"""The LDX hub's HTTP calls over httpx: one request per method, the JSON body as it came.

``HubApi`` sends the requests and turns every foreign exception and HTTP error status
into the project's own tree (``daemon.errors``): retry later, fail this job, or tell the
operator. It returns bodies undecoded into models: ``daemon.hub.client.HubClient`` reads them,
in this process or, when the transfers run in a child process, in the daemon while the
child only talks HTTP. So this module imports neither pydantic nor the logging setup, and
the child stays small (``daemon.hub.transfer_child``). The transport is injectable, so tests
run the same code against the emulator in-process.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast
from urllib.parse import quote

import httpx

from daemon.errors import (
    AuthRejected,
    HubBusy,
    HubUnavailable,
    JobFailed,
    LdxError,
    RemoteNotFound,
)
from daemon.hub.transport import LeanTransport
from daemon.inbox.inputs import HashingReader, check_unchanged, open_input
from daemon.inbox.stability import Signature
from daemon.outbox.permissions import open_output

USER_AGENT = "ldx-hotfolder"
CHUNK = 256 * 1024
# Names the job a request belongs to, for the hub's logs and the emulator's ledger.
TRACE_HEADER = "X-Ldx-Hotfolder-Job"
current_job: ContextVar[int | None] = ContextVar("ldx_hotfolder_job", default=None)


@dataclass(frozen=True)
class InputUpload:
    """An inbox input to upload, named by path so that another process can open it."""

    inbox: Path
    path: str  # relative to the inbox, as stored
    signature: Signature  # the version the job describes; any other is refused
    allow_hardlinks: bool
    filename: str  # the name the hub is given
    content_type: str


@dataclass(frozen=True)
class Sent:
    """What an upload of an input sent, and the hub's answer to it."""

    body: Any  # the hub's FileInfo, undecoded
    sha256: str | None  # of the bytes actually sent; None unless read in order to the end


@dataclass(frozen=True)
class JobRun:
    """A conversion to create, follow to its end and fetch in one call (``run_job``)."""

    engine: str
    language: str
    output_format: str
    wait: int  # long-poll seconds per poll
    interval: float  # least seconds from one poll of the job to the next
    dest: Path  # the temporary file the output is streamed into


# What ``run_job`` yields, in this order: ("created", job body), ("polled", job body) for
# each poll, then for a completed job ("download", output file id) and ("written", bytes);
# ``upload_and_run`` yields ("uploaded", Sent) first.
Progress = tuple[str, Any]
FOLLOWED = ("queued", "processing")  # a job in these states is polled again


class Calls(Protocol):
    """The hub's calls as the daemon makes them: ``HubApi`` in this process, or
    ``daemon.hub.transfers.TransferProcess`` making them in a child process."""

    def set_api_key(self, api_key: str) -> None: ...
    async def aclose(self) -> None: ...
    async def engines(self) -> Any: ...
    async def list_files(self) -> Any: ...
    async def upload_input(self, request: InputUpload) -> Sent: ...
    async def create_job(
        self, file_id: str, engine: str, language: str, output_format: str
    ) -> Any: ...
    async def get_job(self, job_id: str, wait: int = 0) -> Any: ...
    async def list_jobs(self) -> Any: ...
    async def download(self, file_id: str, dest: Path) -> int: ...
    def run_job(self, file_id: str, run: JobRun) -> AsyncGenerator[Progress, None]: ...
    def upload_and_run(
        self, request: InputUpload, sha256: str, run: JobRun
    ) -> AsyncGenerator[Progress, None]: ...


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Parse ``Retry-After`` given as seconds (maybe fractional) or as an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def error_detail(response: httpx.Response) -> tuple[str | None, str]:
    """(code, message) from an error body: problem+json, {code,message} or plain text."""
    try:
        body = json.loads(response.content)
    except ValueError:
        text = response.content[:200].decode("utf-8", "replace").strip()
        return None, text or response.reason_phrase
    if not isinstance(body, dict):
        return None, str(body)[:200]
    code = body.get("code")
    message = body.get("message") or body.get("detail") or body.get("title") or ""
    return (str(code) if code else None), str(message) or response.reason_phrase


def _status_error(response: httpx.Response, what: str) -> LdxError:
    status = response.status_code
    code, message = error_detail(response)
    text = f"{what}: HTTP {status} {message}".strip()
    if status in (401, 403):
        return AuthRejected(
            f"the LDX hub rejected the API key (HTTP {status}: {message})", code="auth_rejected"
        )
    if status == 429:
        wait = retry_after_seconds(response.headers.get("retry-after"), time.time())
        return HubBusy(text, code="rate_limited", retry_after=wait)
    if status >= 500 or status == 408:
        wait = retry_after_seconds(response.headers.get("retry-after"), time.time())
        return HubUnavailable(text, code=f"http_{status}", retry_after=wait)
    if status in (404, 410):
        return RemoteNotFound(text, code=code or "not_found")
    return JobFailed(text, code=code or f"http_{status}")


@asynccontextmanager
async def _translate(what: str) -> AsyncIterator[None]:
    """Turn httpx's exceptions and undecodable bodies into the project's tree."""
    try:
        yield
    except TimeoutError as exc:
        # Our own wall-clock deadline: httpx's timeouts are per read, and a server that
        # trickles bytes would otherwise hold a request forever.
        raise HubUnavailable(f"{what}: no answer within its deadline", code="deadline") from exc
    except httpx.TimeoutException as exc:
        raise HubUnavailable(f"{what}: timed out ({type(exc).__name__})", code="timeout") from exc
    except httpx.TransportError as exc:
        raise HubUnavailable(f"{what}: {type(exc).__name__}: {exc}", code="network") from exc
    except ValueError as exc:
        # A 2xx body that is no JSON: most likely a proxy or a gateway hiccup.
        raise HubUnavailable(f"{what}: unreadable response ({exc})", code="bad_response") from exc


def transfer_deadline(deadline: float, size: int, min_rate: float) -> float:
    """Seconds a whole transfer of ``size`` bytes may take: the deadline of any request,
    plus the time the slowest acceptable rate needs for the bytes."""
    return deadline + size / min_rate


class HubApi:
    """The RenderOCR part of the LDX hub API over one httpx connection pool."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        deadline: float = 120.0,
        min_transfer_rate: float = 50_000.0,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._api_key = api_key
        self._deadline = deadline
        self._min_rate = min_transfer_rate
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
            limits=limits,
            headers={"User-Agent": USER_AGENT},
            transport=transport or LeanTransport(limits),
        )

    def set_api_key(self, api_key: str) -> None:
        """Use another key from now on (after the operator fixed it)."""
        self._api_key = api_key

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    def _auth(self) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self._api_key}"}
        job = current_job.get()
        if job is not None:
            headers[TRACE_HEADER] = str(job)
        return headers

    def transfer_deadline(self, size: int) -> float:
        """Seconds a whole transfer of ``size`` bytes may take."""
        return transfer_deadline(self._deadline, size, self._min_rate)

    async def _json(
        self,
        method: str,
        url: str,
        what: str,
        *,
        auth: bool = True,
        extra_time: float = 0.0,
        **kwargs: Any,
    ) -> Any:
        headers = self._auth() if auth else {}
        async with _translate(what), asyncio.timeout(self._deadline + extra_time):
            response = await self._http.request(method, url, headers=headers, **kwargs)
            if not response.is_success:
                raise _status_error(response, what)
            return response.json()

    async def engines(self) -> Any:
        """``GET /renderocr/engines`` (public: sent without the key)."""
        return await self._json("GET", "/renderocr/engines", "list engines", auth=False)

    async def list_files(self) -> Any:
        """``GET /files``: the files of this key; also proves the key is accepted."""
        return await self._json("GET", "/files", "list files")

    async def upload(self, stream: BinaryIO, filename: str, content_type: str) -> Any:
        """``POST /files`` with the multipart field ``file``; streamed from ``stream``."""
        files = {"file": (filename, stream, content_type)}
        size = _stream_size(stream)
        extra = self.transfer_deadline(size) - self._deadline
        return await self._json("POST", "/files", "upload", files=files, extra_time=extra)

    async def upload_input(self, request: InputUpload) -> Sent:
        """Open an inbox input, check it is the job's version, and upload it."""
        allow = request.allow_hardlinks
        with open_input(request.inbox, request.path, allow_hardlinks=allow) as fd:
            check_unchanged(fd, request.signature, request.path)
            reader = HashingReader(fd)
            stream = cast(BinaryIO, reader)
            body = await self.upload(stream, request.filename, request.content_type)
            check_unchanged(fd, request.signature, request.path)  # changed while it was sent
            return Sent(body, reader.hexdigest())

    async def create_job(self, file_id: str, engine: str, language: str, output_format: str) -> Any:
        """``POST /renderocr/jobs``: start converting an uploaded file."""
        payload = {
            "file_id": file_id,
            "engine": engine,
            "languages": [language],
            "output_format": output_format,
        }
        return await self._json("POST", "/renderocr/jobs", "create job", json=payload)

    async def get_job(self, job_id: str, wait: int = 0) -> Any:
        """``GET /renderocr/jobs/{id}``, long-polling up to ``wait`` seconds when > 0."""
        params = {"wait": wait} if wait > 0 else None
        url = f"/renderocr/jobs/{_quote(job_id)}"
        return await self._json("GET", url, "poll job", params=params, extra_time=wait)

    async def list_jobs(self) -> Any:
        """``GET /renderocr/jobs``: this key's jobs, newest first."""
        return await self._json("GET", "/renderocr/jobs", "list jobs")

    async def download(self, file_id: str, dest: Path) -> int:
        """Stream ``GET /files/{id}/content`` into ``dest``; return the bytes written.

        Raises ``HubUnavailable`` when fewer bytes arrive than Content-Length announced.
        """
        what = "download"
        url = f"/files/{_quote(file_id)}/content"
        async with (
            _translate(what),
            asyncio.timeout(self._deadline) as deadline,
            self._http.stream("GET", url, headers=self._auth()) as resp,
        ):
            if not resp.is_success:
                await resp.aread()
                raise _status_error(resp, what)
            expected = resp.headers.get("content-length")
            if expected is not None and expected.isdigit():
                loop = asyncio.get_running_loop()
                deadline.reschedule(loop.time() + self.transfer_deadline(int(expected)))
            written = await _save(resp, dest)
            if expected is not None and int(expected) != written:
                raise HubUnavailable(
                    f"download: got {written} of {expected} bytes", code="short_download"
                )
            return written

    async def upload_and_run(
        self, request: InputUpload, sha256: str, run: JobRun
    ) -> AsyncGenerator[Progress, None]:
        """Upload an input and, when the bytes sent are those hashed as ``sha256``, go on
        with ``run_job``: the whole conversion in one call. A version other than the
        hashed one ends the run after ("uploaded", Sent), before any job is created."""
        sent = await self.upload_input(request)
        yield "uploaded", sent
        file_id = _field(sent.body, "file_id")
        if sent.sha256 == sha256 and isinstance(file_id, str):
            async for step in self.run_job(file_id, run):
                yield step

    async def run_job(self, file_id: str, run: JobRun) -> AsyncGenerator[Progress, None]:
        """Create the job, poll it until it leaves ``FOLLOWED`` (long polls, at most one
        per ``run.interval``) and download the output of a completed one, yielding each
        step's outcome as it comes: the daemon commits the job id while the job runs,
        and across the transfer pipe three requests cost one round trip instead of three.
        Bodies are yielded undecoded; one without a job id or a status ends the run."""
        body = await self.create_job(file_id, run.engine, run.language, run.output_format)
        yield "created", body
        job_id = _field(body, "job_id")
        if not isinstance(job_id, str):
            return
        while True:
            asked = time.monotonic()
            body = await self.get_job(job_id, run.wait)
            yield "polled", body
            if _field(body, "status") not in FOLLOWED:
                break
            # A hub that ignores ?wait answers at once: never poll faster than the interval.
            await asyncio.sleep(max(0.0, run.interval - (time.monotonic() - asked)))
        output = _field(body, "output_file_id")
        if _field(body, "status") == "completed" and isinstance(output, str):
            yield "download", output
            yield "written", await self.download(output, run.dest)


def _field(body: Any, name: str) -> Any:
    """``body[name]`` of a JSON object, None for anything else (read strictly later)."""
    return body.get(name) if isinstance(body, dict) else None


async def _save(response: httpx.Response, dest: Path) -> int:
    written = 0
    with open_output(dest) as fh:  # never through a link planted at the temporary name
        async for chunk in response.aiter_bytes(CHUNK):
            fh.write(chunk)
            written += len(chunk)
        fh.flush()
    return written


def _stream_size(stream: BinaryIO) -> int:
    try:
        return os.fstat(stream.fileno()).st_size
    except (OSError, io.UnsupportedOperation):
        position = stream.tell()
        size = stream.seek(0, io.SEEK_END)
        stream.seek(position)
        return size


def _quote(segment: str) -> str:
    return quote(segment, safe="")
