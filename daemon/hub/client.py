"""The LDX hub client: one method per endpoint over an injected ``httpx.AsyncClient``.

Every request takes a token from the shared ``RequestBudget`` and passes the ``Gate``
(both optional), runs within a wall-clock deadline, and has every foreign failure and
HTTP error status translated into the project's tree (``daemon.errors``) here, at one
boundary, as httpx translates httpcore's: the pipeline imports no httpx.

Nothing the hub sends is trusted further than it must be. A JSON answer is read up to
``max_json_bytes`` decoded bytes; a download is counted on decoded bytes and stops at
the caller's cap, and a transfer slower than ``min_transfer_rate`` (after the first
``deadline`` seconds) is cut, so neither an endless stream nor a trickle holds a job
for ever. A download follows redirects to a storage host without the API key. Error
bodies of every plausible shape give the hub's own code and message, cleaned of the
key and of control characters (``models.hub_text``).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx

from daemon.errors import (
    AuthRejected,
    ConfigError,
    HubBusy,
    HubRefused,
    HubUnavailable,
    JobFailed,
    LdxError,
    OutputRefused,
    RemoteNotFound,
)
from daemon.hub.bodies import ACCEPT_ENCODING, decoded, encodings
from daemon.hub.budget import RequestBudget
from daemon.hub.gate import Gate
from daemon.hub.models import (
    Engine,
    FileInfo,
    RemoteJob,
    hub_text,
    read,
    read_engines,
    read_list,
)
from daemon.logs import register_secret

USER_AGENT = "ldx-hotfolder"
# Connections kept open while idle. Enough for the few requests a daemon has at once
# against a real hub; more cost CPU on every request, as the pool looks at each idle
# one before and after it (bench (a): 13.6 ms of CPU per file with 40 kept, 9.6 with 8).
IDLE_CONNECTIONS = 8
CHUNK = 256 * 1024
MAX_JSON_BYTES = 16 * 1024 * 1024  # a listing of thousands of jobs fits; a bomb does not
# Names the job a request belongs to, for the hub's logs and the emulator's ledger.
TRACE_HEADER = "X-Ldx-Hotfolder-Job"
current_job: ContextVar[int | None] = ContextVar("ldx_hotfolder_job", default=None)

FILES = "GET /files"
FILE_INFO = "GET /files/{id}"
UPLOAD = "POST /files"
CREATE = "POST /renderocr/jobs"
POLL = "GET /renderocr/jobs/{id}"
LIST_JOBS = "GET /renderocr/jobs"
DOWNLOAD = "GET /files/{id}/content"
ENGINES = "GET /renderocr/engines"


@dataclass(frozen=True)
class Limits:
    """How long a request may take, and how much the hub may send."""

    deadline: float = 120.0  # seconds for any request, plus a transfer's own time
    min_transfer_rate: float = 50_000.0  # bytes/s below which a transfer is cut
    max_json_bytes: int = MAX_JSON_BYTES


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """``Retry-After`` given as seconds (maybe fractional) or as an HTTP date."""
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


_TAGS = re.compile(r"<[^>]*>")


def error_detail(content: bytes, content_type: str) -> tuple[str | None, str]:
    """(code, message) of an error body: problem+json, ``{"error": {code, message}}``,
    ``{code, message}``, ``{message}``, plain text or an HTML page."""
    try:
        body = json.loads(content)
    except ValueError:
        text = content[:4096].decode("utf-8", "replace")
        if "html" in content_type.lower() or text.lstrip().startswith("<"):
            text = _TAGS.sub(" ", text)
        return None, hub_text(text, 200)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if not isinstance(body, dict):
        return None, hub_text(body, 200)
    if isinstance(body.get("error"), str) and not body.get("message"):
        body = {**body, "message": body["error"]}
    code = body.get("code")
    message = body.get("message") or body.get("detail") or body.get("title") or ""
    return (hub_text(code, 64) if code else None), hub_text(message, 200)


def segment(value: str) -> str:
    """A path segment for an id: every reserved character escaped, dots too, so an id
    like ``..`` can never walk up the hub's URL tree."""
    return quote(value, safe="").replace(".", "%2E")


class HubClient:
    """Async client for the RenderOCR part of the LDX hub API, answering in models."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        api_key: str,
        *,
        limits: Limits | None = None,
        budget: RequestBudget | None = None,
        gate: Gate | None = None,
        key_source: Callable[[], str] | None = None,
    ) -> None:
        """``key_source`` reads the key anew (a fixed key file takes effect while paused)."""
        self._http = http
        self._api_key = api_key
        register_secret(api_key)  # a hub that echoes it back must never get it shown
        self.limits = limits or Limits()
        self.budget = budget
        self.gate = gate
        self._key_source = key_source
        if gate is not None:
            gate.probe = self._probe

    @classmethod
    def connect(
        cls,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Any,
    ) -> HubClient:
        """A client with its own connection pool (``options`` as for the constructor)."""
        limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=min(max_connections, IDLE_CONNECTIONS),
        )
        http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
            limits=limits,
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": ACCEPT_ENCODING},
            transport=transport,
        )
        return cls(http, api_key, **options)

    def set_api_key(self, api_key: str) -> None:
        """Use another key from now on (after the operator fixed it)."""
        register_secret(api_key)
        self._api_key = api_key

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> HubClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- endpoints ---------------------------------------------------------------------

    async def engines(self) -> list[Engine] | None:
        """``GET /renderocr/engines`` (public: sent without the key, and again with it
        when a gateway wants it); None when the answer holds no readable engine list."""
        try:
            body = await self._json("GET", "/renderocr/engines", ENGINES, auth=False)
        except AuthRejected:
            body = await self._json("GET", "/renderocr/engines", ENGINES)
        return read_engines(body)

    async def list_files(self) -> list[FileInfo]:
        """``GET /files``: the files of this key; also proves the key is accepted."""
        return read_list(FileInfo, await self._json("GET", "/files", FILES), "list files")

    async def file_info(self, file_id: str) -> FileInfo:
        """``GET /files/{id}``: one file's metadata (RemoteNotFound when it is gone)."""
        body = await self._json("GET", f"/files/{segment(file_id)}", FILE_INFO)
        return read(FileInfo, body, "file info")

    async def upload(
        self, stream: BinaryIO, filename: str, content_type: str, size: int
    ) -> FileInfo:
        """``POST /files`` with the multipart field ``file``, streamed from ``stream``."""
        files = {"file": (filename, stream, content_type)}
        extra = self._transfer_time(size)
        body = await self._json("POST", "/files", UPLOAD, files=files, extra_time=extra)
        return read(FileInfo, body, "upload")

    async def create_job(
        self, file_id: str, engine: str, language: str, output_format: str
    ) -> RemoteJob:
        """``POST /renderocr/jobs``: start converting an uploaded file (this is paid)."""
        payload = {
            "file_id": file_id,
            "engine": engine,
            "languages": [language],
            "output_format": output_format,
        }
        try:
            return read(
                RemoteJob,
                await self._json("POST", "/renderocr/jobs", CREATE, json=payload),
                "create job",
            )
        except HubUnavailable as exc:
            if exc.code == "bad_response":  # a 2xx we cannot read: the job exists, paid
                exc.maybe_done = True
            raise

    async def get_job(self, job_id: str, wait: float = 0) -> RemoteJob:
        """``GET /renderocr/jobs/{id}``, long-polling up to ``wait`` seconds when > 0."""
        params = {"wait": f"{wait:g}"} if wait > 0 else None
        url = f"/renderocr/jobs/{segment(job_id)}"
        body = await self._json("GET", url, POLL, params=params, extra_time=wait)
        return read(RemoteJob, body, "poll job")

    async def list_jobs(self) -> list[RemoteJob]:
        """``GET /renderocr/jobs``: this key's jobs, newest first."""
        body = await self._json("GET", "/renderocr/jobs", LIST_JOBS)
        return read_list(RemoteJob, body, "list jobs")

    async def download(self, file_id: str, sink: BinaryIO, max_bytes: int) -> int:
        """Stream ``GET /files/{id}/content`` into ``sink``; return the bytes written.

        Follows redirects (a storage host gets no key). Counts decoded bytes: more than
        ``max_bytes`` raises ``OutputRefused``; fewer than announced ``HubUnavailable``.
        """
        url = f"/files/{segment(file_id)}/content"
        async with self._request("GET", url, DOWNLOAD, stream=True) as (response, deadline):
            declared = _declared_length(response)
            if declared is not None:  # the transfer's own time, for no more than the cap
                extra = self._transfer_time(min(declared, max_bytes))
                deadline.reschedule(
                    asyncio.get_running_loop().time() + self.limits.deadline + extra
                )
            return await self._save(response, sink, max_bytes)

    # -- plumbing ----------------------------------------------------------------------

    def _headers(self, auth: bool) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self._api_key}"} if auth else {}
        job = current_job.get()
        if job is not None:
            headers[TRACE_HEADER] = str(job)
        return headers

    def _transfer_time(self, size: int) -> float:
        """Seconds a transfer of ``size`` bytes may take beyond the plain deadline."""
        return size / self.limits.min_transfer_rate

    async def _json(
        self, method: str, url: str, route: str, *, auth: bool = True, **kwargs: Any
    ) -> Any:
        async with self._request(method, url, route, auth=auth, stream=True, **kwargs) as exchange:
            raw = await _read_capped(exchange[0], self.limits.max_json_bytes, route)
        try:
            return json.loads(raw)
        except ValueError:
            # A 2xx body that is no JSON: most likely a proxy or a gateway hiccup.
            raise HubUnavailable(
                f"{route}: the hub's answer is not JSON", code="bad_response"
            ) from None

    @contextlib.asynccontextmanager
    async def _request(
        self,
        method: str,
        url: str,
        route: str,
        *,
        auth: bool = True,
        stream: bool = False,
        extra_time: float = 0.0,
        admit: bool = True,
        **kwargs: Any,
    ) -> AsyncIterator[tuple[httpx.Response, asyncio.Timeout]]:
        """Send one request through the budget and the gate (``admit``: wait while the
        gate holds ``route``); yield its 2xx response (streamed) and its deadline (which
        a transfer may extend by its size); raise the project's error for anything else."""
        if self.budget is not None:
            await self.budget.take()
        gate = self.gate if self.gate is not None and admit else _OPEN
        async with gate.admission(route):
            try:
                async with (
                    _translate(route),
                    asyncio.timeout(self.limits.deadline + extra_time) as deadline,
                    self._http.stream(
                        method,
                        url,
                        headers=self._headers(auth),
                        follow_redirects=route == DOWNLOAD,
                        **kwargs,
                    ) as response,
                ):
                    if not response.is_success:
                        body = await _read_capped(response, 64 * 1024, route, strict=False)
                        raise await self._refusal(response, body, route, auth=auth)
                    self._answered(route, proven=auth)
                    yield response, deadline
            except (HubUnavailable, HubBusy) as exc:
                self._failed(route, exc)
                raise

    async def _probe(self) -> None:
        """The gate's probe while it holds everything: ``GET /files``, past the gate, with
        the key read anew (a person may have fixed the key file meanwhile)."""
        if self._key_source is not None:
            try:
                self.set_api_key(self._key_source())
            except ConfigError as exc:
                if self.gate is not None:
                    self.gate.key_rejected(exc.message)  # the file is the problem now
                return
        async with self._request("GET", "/files", FILES, stream=True, admit=False):
            pass

    def _answered(self, route: str, *, proven: bool) -> None:
        if self.budget is not None:
            self.budget.answered()
        if self.gate is not None:
            self.gate.answered(route, proven=proven)  # a public route proves no key

    def _failed(self, route: str, exc: LdxError) -> None:
        if isinstance(exc, HubBusy):
            if self.budget is not None:
                self.budget.refusal(exc.retry_after)
            return
        if self.gate is not None and exc.code != "bad_response":
            self.gate.unreachable(route, exc.message)

    async def _refusal(
        self, response: httpx.Response, body: bytes, route: str, *, auth: bool = True
    ) -> LdxError:
        """The error an unsuccessful answer means; closes the gate for a refused key or
        a refused route (a request sent without the key says nothing of the key)."""
        error = status_error(response.status_code, response.headers, body, route)
        if not auth and isinstance(error, AuthRejected):
            return error
        if isinstance(error, AuthRejected) and route != FILES:
            error = await self._key_or_plan(error, route)
        if self.gate is not None:
            if isinstance(error, AuthRejected):
                self.gate.key_rejected(error.message)
            elif isinstance(error, HubRefused):
                self.gate.refused(route, error.message)
            elif not isinstance(error, HubUnavailable | HubBusy):
                # A 4xx of the request's own: the hub works, but it proves no key.
                self.gate.answered(route, proven=False)
        return error

    async def _key_or_plan(self, error: AuthRejected, route: str) -> LdxError:
        """A 403 (or 401) on one route: does the key work elsewhere? Then the plan refuses
        this route; else the key is rejected."""
        try:
            async with (
                asyncio.timeout(self.limits.deadline),
                self._http.stream("GET", "/files", headers=self._headers(True)) as check,
            ):
                works = check.is_success
        except (httpx.HTTPError, TimeoutError):
            return error  # cannot tell: the key's refusal stands
        if not works:
            return error
        return HubRefused(
            f"the hub refuses {route} while the key works elsewhere ({error.message}); "
            "the plan may not include RenderOCR",
            route=route,
            code="plan_refused",
        )

    async def _save(self, response: httpx.Response, sink: BinaryIO, max_bytes: int) -> int:
        declared = _declared_length(response)
        if declared is not None and declared > max_bytes and _identity(response):
            raise _too_large(declared, max_bytes)
        written, started = 0, time.monotonic()
        async for chunk in _body(response, DOWNLOAD):
            written += len(chunk)
            if written > max_bytes:
                raise _too_large(written, max_bytes)
            sink.write(chunk)
            self._check_rate(response.num_bytes_downloaded, started, DOWNLOAD)
        sink.flush()
        received = response.num_bytes_downloaded if not _identity(response) else written
        if declared is not None and received != declared:
            raise HubUnavailable(
                f"download: got {received} of {declared} bytes", code="short_download"
            )
        return written

    def _check_rate(self, received: int, started: float, route: str) -> None:
        """Cut a transfer that, past the plain deadline, runs below the minimum rate."""
        elapsed = time.monotonic() - started
        grace = self.limits.deadline
        if elapsed > grace and received < self.limits.min_transfer_rate * (elapsed - grace):
            raise HubUnavailable(
                f"{route}: the transfer runs below {self.limits.min_transfer_rate:g} bytes/s",
                code="too_slow",
            )


class _OpenGate:
    """The gate of a client that has none: always open."""

    @contextlib.asynccontextmanager
    async def admission(self, route: str) -> AsyncIterator[bool]:
        yield False


_OPEN = _OpenGate()


def status_error(status: int, headers: httpx.Headers, body: bytes, route: str) -> LdxError:
    """The project's error for an unsuccessful HTTP answer to ``route``."""
    code, message = error_detail(body, headers.get("content-type", ""))
    text = f"{route}: HTTP {status} {message}".strip()
    if status in (401, 403):
        what = "rejected the API key" if status == 401 or route == FILES else f"refused {route}"
        return AuthRejected(f"the LDX hub {what} (HTTP {status}: {message})")
    if status == 402:
        return HubRefused(
            f"the hub refuses {route}: {message or 'payment required (credit used up?)'}",
            route=route,
            code="credit_refused",
        )
    if status == 429:
        wait = retry_after_seconds(headers.get("retry-after"), time.time())
        return HubBusy(text, code="rate_limited", retry_after=wait)
    if status >= 500 or status == 408:
        wait = retry_after_seconds(headers.get("retry-after"), time.time())
        return HubUnavailable(text, code=f"http_{status}", retry_after=wait, maybe_done=True)
    if status in (404, 410):
        return RemoteNotFound(text, code=code or "not_found")
    return JobFailed(text, code=code or f"http_{status}")


async def _read_capped(
    response: httpx.Response, limit: int, route: str, *, strict: bool = True
) -> bytes:
    """The decoded body, at most ``limit`` bytes (more: an error, or cut when not strict)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in _body(response, route):
        size += len(chunk)
        if size > limit:
            if not strict:
                break
            raise HubUnavailable(
                f"{route}: the hub's answer passes {limit // 1024 // 1024} MiB; not read",
                code="bad_response",
            )
        parts.append(chunk)
    return b"".join(parts)


def _declared_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


def _identity(response: httpx.Response) -> bool:
    """Whether the body arrives as it is (no Content-Encoding to decode)."""
    return not encodings(response.headers.get("content-encoding", ""))


def _body(response: httpx.Response, route: str) -> AsyncIterator[bytes]:
    """``response``'s decoded body in pieces of at most ``CHUNK`` bytes."""
    if response.is_stream_consumed:  # built in memory (a mock transport): httpx decoded it
        return decoded(_in_memory(response.content), "", route, CHUNK)
    encoding = response.headers.get("content-encoding", "")
    return decoded(response.aiter_raw(CHUNK), encoding, route, CHUNK)


async def _in_memory(content: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(content), CHUNK):
        yield content[start : start + CHUNK]


def _too_large(size: int, cap: int) -> OutputRefused:
    return OutputRefused(
        f"the hub's output is larger than the {cap / 1e6:.0f} MB this input may produce "
        f"({size / 1e6:.0f} MB or more); the partial file was removed",
        code="output_too_large",
    )


@contextlib.asynccontextmanager
async def _translate(route: str) -> AsyncIterator[None]:
    """Turn httpx's exceptions and our own deadline into the project's tree."""
    try:
        yield
    except TimeoutError as exc:
        # Our own wall-clock deadline: httpx's timeouts are per read, and a server that
        # trickles bytes would otherwise hold a request for ever.
        raise HubUnavailable(
            f"{route}: no answer within its deadline", code="deadline", maybe_done=True
        ) from exc
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise HubUnavailable(f"{route}: {_plain(exc)}", code="network") from exc
    except httpx.TimeoutException as exc:
        raise HubUnavailable(
            f"{route}: timed out ({type(exc).__name__})", code="timeout", maybe_done=True
        ) from exc
    except httpx.TransportError as exc:
        raise HubUnavailable(f"{route}: {_plain(exc)}", code="network", maybe_done=True) from exc
    except httpx.DecodingError as exc:
        raise HubUnavailable(f"{route}: undecodable answer", code="bad_response") from exc


def _plain(exc: httpx.HTTPError) -> str:
    """A network error in words an office administrator follows."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return "the hub cannot be reached (no connection: network down, or the hub offline)"
    return f"the connection to the hub broke ({hub_text(exc, 120) or type(exc).__name__})"
