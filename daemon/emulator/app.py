"""The LDX hub emulator's HTTP face: a Starlette app over a ``Hub``.

API routes (fact sheet §4-§7); all but the engine list need ``Authorization: Bearer <key>``:

    GET  /files                    {"data": [FileInfo]}, newest first
    POST /files                    multipart/form-data, part "file" -> 201 FileInfo
    GET  /files/{file_id}          FileInfo
    GET  /files/{file_id}/content  the bytes; Range -> 206, If-Unmodified-Since -> 412
    POST /uploads                  {"filename": ...} -> 201 FileInfo of an empty file
    PUT  /uploads/{file_id}        {"data": base64, <= 5 MB decoded} -> FileInfo, appended
    GET  /renderocr/engines        public engine list
    POST /renderocr/jobs           {file_id, engine, languages, output_format} -> 202 job
    GET  /renderocr/jobs           {"data": [job]}, newest first, no paging
    GET  /renderocr/jobs/{job_id}  the job; ?wait=N holds it up to N s (1-10) until terminal

Admin routes: no auth, never faulted, not counted in the ledger:

    GET  /_emulator/ledger        {"requests": {"METHOD /route": n}, "uploads": [{file_id,
                                  filename, size, sha256, content_type, received_at}],
                                  "jobs": [{job_id, file_id, engine, languages,
                                  output_format, created_at}], "downloads": [{file_id, size,
                                  status}], "faults": {kind: n}}
    POST /_emulator/faults        partial update of the fault knobs -> all knobs
    POST /_emulator/clock         {"advance": seconds} -> {"now": ..., "offset": seconds}
    POST /_emulator/keys          {"api_keys": [...], "revoked": [...]} -> both lists
    POST /_emulator/reset-ledger  -> the emptied ledger

Error bodies follow who would answer in the real stack: the gateway (auth, rate limits,
injected faults, size limits, unknown routes) sends Zuplo's problem+json; the backend
(validation, unknown ids) sends ``{"code", "message", "request_id"}``. The real codes of
the backend errors are unknown.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from contextlib import aclosing
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import quote

import anyio
import httpx
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from daemon.emulator.hub import (
    Access,
    Download,
    FileInfo,
    Hub,
    HubError,
    IncomingFile,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    bearer_key,
    iso,
    new_id,
)

MAX_WAIT_SECONDS = 10.0
POLL_STEP_SECONDS = 0.1  # how soon a long poll notices a clock advance
BUILD_ID = str(uuid.uuid4())  # Zuplo puts its deployment's build id in every problem trace

_UPLOAD_BUFFER = 1024 * 1024  # hand the body to the parser thread in pieces this big
_MULTIPART_OVERHEAD = 64 * 1024  # Content-Length slack for boundaries and part headers
_JSON_LIMIT = 1024 * 1024
_JSON_SLACK = 4096  # room for the {"data": ...} around a base64 chunk
_DOWNLOAD_CHUNK = 256 * 1024
# Files up to this size are read and parsed on the event loop: cheaper than thread hops.
_INLINE_BYTES = 1024 * 1024
T = TypeVar("T")

Handler = Callable[[Request], Awaitable[Response]]


class ServerHooks:
    """What a hosting server lends the app: a way to cut a connection and a stop flag.

    Without a server (``httpx.ASGITransport``) ``drop`` stays None and the app raises
    the error a client would see instead. Long polls sleep in ``doze``, which ends early
    on a ``nudge`` (the hub clock moved, from any thread) or when the server stops.
    """

    def __init__(self) -> None:
        self._stopping = False
        self.drop: Callable[[Scope], bool] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None

    @property
    def stopping(self) -> bool:
        """Whether the server is shutting down (long polls and stalls then end at once)."""
        return self._stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self._stopping = value
        if value:
            self.nudge()

    async def doze(self, seconds: float) -> None:
        """Sleep up to ``seconds``; return early on a nudge."""
        if self._wakeup is None or self._loop is not asyncio.get_running_loop():
            self._loop, self._wakeup = asyncio.get_running_loop(), asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), seconds)

    def nudge(self) -> None:
        """Wake every dozing long poll (safe from any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(self._wake_all)

    def _wake_all(self) -> None:
        woken, self._wakeup = self._wakeup, asyncio.Event()
        if woken is not None:
            woken.set()


def hooks_of(app: Starlette) -> ServerHooks:
    """Return the hooks of an app made by ``create_app``."""
    return cast(ServerHooks, app.state.hooks)


def parse_wait(value: str | None) -> float:
    """Seconds a ``?wait=`` long poll may hold: 0 if absent, invalid or <= 0, else 1..10."""
    try:
        seconds = float(value) if value is not None else 0.0
    except ValueError:
        return 0.0
    if not seconds > 0:  # also NaN
        return 0.0
    return min(max(seconds, 1.0), MAX_WAIT_SECONDS)


class RangeNotSatisfiable(Exception):
    """A byte range that starts past the end of the file."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (start, end) of a single ``bytes=`` range, or None to send it all.

    Malformed and multi-range headers are ignored, which RFC 9110 allows.
    """
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, dash, last = header[len("bytes=") :].strip().partition("-")
    if not dash or not (first or last) or not all(p.isdigit() for p in (first, last) if p):
        return None
    if not first:  # a suffix: the last N bytes
        if int(last) == 0 or size == 0:
            raise RangeNotSatisfiable
        return (max(0, size - int(last)), size - 1)
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable
    return (start, min(int(last), size - 1) if last else size - 1)


def create_app(hub: Hub) -> Starlette:
    """Build the emulator's ASGI app over ``hub``."""
    api = _Api(hub, ServerHooks())
    hub.clock.subscribe(api.hooks.nudge)
    app = Starlette(
        routes=api.routes(),
        middleware=[Middleware(_DropMiddleware, hooks=api.hooks)],
        exception_handlers={HubError: api.on_hub_error, HTTPException: api.on_http_error},
    )
    app.state.hooks = api.hooks
    return app


class _DropConnection(Exception):
    """Raised by a route to have its connection cut without any response."""


class _DropMiddleware:
    """Turns ``_DropConnection`` into a dropped connection."""

    def __init__(self, app: ASGIApp, hooks: ServerHooks) -> None:
        self.app = app
        self.hooks = hooks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except _DropConnection:
            if self.hooks.drop is not None and self.hooks.drop(scope):
                await anyio.sleep(0)  # let the server notice the loss before we return
                return
            # In process there is no socket to cut: raise what the client would see.
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a response."
            ) from None


# The daemon names the job a request belongs to in this header (any client may omit it).
TRACE_HEADER = "x-ldx-hotfolder-job"
# The event that tells when a stalled download ended, and how (for the deadline tests).
STALL_EVENT = "stalled download ended"


class _Api:
    """The route handlers, sharing the hub and the server hooks."""

    def __init__(self, hub: Hub, hooks: ServerHooks) -> None:
        self.hub = hub
        self.hooks = hooks
        # Padded outputs make rendering slow: then hub calls leave the event loop.
        self._heavy = hub.settings.output_size > _INLINE_BYTES

    async def _hub_call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a hub operation on the loop, or in a worker thread when it may be slow.

        Hub operations are short (a lock, some dict work, at most a small document
        rendered into the page cache), cheaper than the two thread switches of a worker
        thread; only padded outputs or big inputs are worth a thread.
        """
        if self._heavy:
            return await run_in_threadpool(fn, *args)
        return fn(*args)

    def routes(self) -> list[Route]:
        return [
            self._api("GET", "/files", self.list_files),
            self._api("POST", "/files", self.upload_file),
            self._api("GET", "/files/{file_id}", self.get_file),
            self._api("GET", "/files/{file_id}/content", self.download),
            self._api("POST", "/uploads", self.create_upload),
            self._api("PUT", "/uploads/{file_id}", self.append_upload),
            self._public("GET", "/renderocr/engines", self.engines),
            self._api("POST", "/renderocr/jobs", self.create_job),
            self._api("GET", "/renderocr/jobs", self.list_jobs),
            self._api("GET", "/renderocr/jobs/{job_id}", self.get_job),
            Route("/_emulator/ledger", self.admin_ledger, methods=["GET"]),
            Route("/_emulator/faults", self.admin_faults, methods=["POST"]),
            Route("/_emulator/clock", self.admin_clock, methods=["POST"]),
            Route("/_emulator/keys", self.admin_keys, methods=["POST"]),
            Route("/_emulator/reset-ledger", self.admin_reset_ledger, methods=["POST"]),
        ]

    # -- gatekeeping --------------------------------------------------------------------

    def _public(self, method: str, path: str, handler: Handler) -> Route:
        async def endpoint(request: Request) -> Response:
            self.hub.count_request(f"{request.method} {path}")
            return await handler(request)

        return Route(path, endpoint, methods=[method])

    def _api(self, method: str, path: str, handler: Handler) -> Route:
        async def endpoint(request: Request) -> Response:
            self.hub.count_request(f"{request.method} {path}")
            started = time.monotonic()
            try:
                refusal = await self._admit(request, path)
                response = refusal if refusal is not None else await handler(request)
            except _DropConnection:
                self._record_event(request, path, started, "drop")
                raise
            self._record_event(request, path, started, response.status_code, response)
            return response

        return Route(path, endpoint, methods=[method])

    def _record_event(
        self,
        request: Request,
        route: str,
        started: float,
        status: int | str,
        response: Response | None = None,
    ) -> None:
        """Log one request for tests: when, what, for which client job, and the answer."""
        retry_after = response.headers.get("retry-after") if response is not None else None
        self.hub.record_event(
            {
                "at": started,
                # The answer exists from here on: a client sees it no sooner.
                "answered": time.monotonic(),
                "route": f"{request.method} {route}",
                "path": request.url.path,
                "trace": request.headers.get(TRACE_HEADER),
                "status": status,
                "retry_after": float(retry_after) if retry_after else None,
            }
        )

    async def _admit(self, request: Request, path: str) -> Response | None:
        """Apply latency, the key check, the /files rate limit and drawn faults, in the
        order the gateway would: its policies run before the backend sees anything."""
        latency = self.hub.faults.latency
        if latency > 0:
            await anyio.sleep(latency)
        authorization = request.headers.get("authorization")
        access = self.hub.check_key(authorization)
        if access is not Access.GRANTED:
            return self._auth_problem(request, access)
        if path.startswith("/files"):
            wait = self.hub.throttle(bearer_key(authorization) or "")
            if wait is not None:
                return self._rate_limited(request, wait)
        fault = self.hub.draw_fault(request.headers.get(TRACE_HEADER))
        if fault is None:
            return None
        if fault.kind == "drop":
            raise _DropConnection
        if fault.kind == "rate_limit":
            return self._rate_limited(request, fault.retry_after)
        detail = "Emulated transient failure of the gateway or backend; retry later."
        return self._problem(request, fault.status, detail)

    def _auth_problem(self, request: Request, access: Access) -> Response:
        if access is Access.REVOKED:
            return self._problem(request, 403, "The API key has been revoked.")
        detail = {
            Access.MISSING: "No Authorization header was sent; use 'Bearer <API key>'.",
            Access.MALFORMED: "The Authorization header must be 'Bearer <API key>'.",
        }.get(access, "The API key is not valid.")
        return self._problem(request, 401, detail)

    def _rate_limited(self, request: Request, seconds: float) -> Response:
        retry_after = str(int(seconds)) if seconds == int(seconds) else f"{seconds:g}"
        detail = f"Rate limit exceeded; retry after {retry_after} seconds."
        return self._problem(request, 429, detail, {"Retry-After": retry_after})

    def _problem(
        self, request: Request, status: int, detail: str, headers: Mapping[str, str] | None = None
    ) -> Response:
        """A Zuplo-style RFC 7807 problem+json response."""
        timestamp = self.hub.clock.now().isoformat(timespec="milliseconds")
        body = {
            "type": f"https://httpproblems.com/http-status/{status}",
            "title": HTTPStatus(status).phrase,
            "status": status,
            "detail": detail,
            "instance": request.url.path,
            "trace": {
                "timestamp": timestamp.replace("+00:00", "Z"),
                "requestId": str(uuid.uuid4()),
                "buildId": BUILD_ID,
            },
        }
        return JSONResponse(body, status, headers, media_type="application/problem+json")

    async def on_hub_error(self, request: Request, exc: Exception) -> Response:
        """Map a hub refusal to its HTTP answer."""
        error = cast(HubError, exc)
        if isinstance(error, PayloadTooLarge):  # the gateway enforces body sizes
            return self._problem(request, 413, error.message)
        return _backend_error(404 if isinstance(error, NotFound) else 400, error)

    async def on_http_error(self, request: Request, exc: Exception) -> Response:
        """Routing errors (unknown route, wrong method) as the gateway's problem+json."""
        error = cast(HTTPException, exc)
        detail = error.detail
        if error.status_code == 404:
            detail = f"No route matches {request.method} {request.url.path}."
        return self._problem(request, error.status_code, detail, error.headers)

    # -- files --------------------------------------------------------------------------

    async def list_files(self, request: Request) -> Response:
        files = await self._hub_call(self.hub.list_files)
        return JSONResponse({"data": [info.to_json() for info in files]})

    async def get_file(self, request: Request) -> Response:
        info = await self._hub_call(self.hub.get_file, request.path_params["file_id"])
        return JSONResponse(info.to_json())

    async def upload_file(self, request: Request) -> Response:
        """Stream the "file" part to disk while hashing; 413 over the cap.

        Answers 201: the real code is unknown and clients accept 200 or 201.
        """
        limit = self.hub.settings.max_upload_bytes
        declared = _content_length(request)
        if declared is not None and declared > limit + _MULTIPART_OVERHEAD:
            await _drain(request)
            message = f"The file exceeds the maximum upload size of {limit} bytes."
            raise PayloadTooLarge("file_too_large", message)
        try:
            boundary = _boundary(request.headers.get("content-type"))
            if boundary is None:
                message = "Send the file as multipart/form-data in a part named 'file'."
                raise InvalidRequest("invalid_request", message)
            with self.hub.receive_file() as incoming:
                form = _MultipartFile(boundary, incoming)
                await _feed(request, form)
                info = await self._hub_call(form.commit)
        except HubError:
            # Read the rest so the client, busy sending, gets to see our answer.
            await _drain(request)
            raise
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is left to read it
        return JSONResponse(info.to_json(), status_code=201)

    async def download(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        try:
            item = await self._hub_call(self.hub.open_download, file_id)
            handle = await _open_for_download(item.path, item.size)
        except (NotFound, FileNotFoundError):  # unknown, expired, or expired just now
            self.hub.record_download(file_id, 0, 404)
            message = f"File {file_id!r} does not exist or has expired."
            raise NotFound("file_not_found", message) from None
        refusal = self._refuse_download(request, item.size, item.updated_at)
        if refusal is not None:
            if not isinstance(handle, bytes):
                await handle.aclose()
            self.hub.record_download(file_id, 0, refusal.status_code)
            return refusal
        span = parse_range(request.headers.get("range"), item.size)
        start, end = span if span is not None else (0, item.size - 1)
        length, status = end - start + 1, 206 if span is not None else 200
        headers = _download_headers(item, start, end, partial=span is not None)
        self.hub.record_download(file_id, length, status)
        stall = self.hub.take_stall()
        if isinstance(handle, bytes) and not stall:
            # A small file is already in memory: one body message, no streaming task.
            return Response(handle[start : end + 1], status, headers)
        if isinstance(handle, bytes):
            handle = await anyio.open_file(item.path, "rb")
        return _FileStream(
            handle,
            start=start,
            length=length,
            status=status,
            headers=headers,
            stall=stall,
            hooks=self.hooks,
            on_stall_end=self._stall_recorder(request, length) if stall else None,
        )

    def _stall_recorder(self, request: Request, length: int) -> StallEnd:
        """Log when a stalled download ended: the moment a client's deadline shows."""

        def record(held_from: float, ended: float, how: str) -> None:
            self.hub.record_event(
                {
                    "at": ended,
                    "held_from": held_from,  # just before the headers went out
                    "route": STALL_EVENT,
                    "path": request.url.path,
                    "trace": request.headers.get(TRACE_HEADER),
                    "status": how,
                    "retry_after": None,
                    "length": length,
                }
            )

        return record

    def _refuse_download(
        self, request: Request, size: int, updated_at: datetime
    ) -> Response | None:
        """412 for a failed If-Unmodified-Since, 416 for a range past the end, else None."""
        if _modified_since(request.headers.get("if-unmodified-since"), updated_at):
            error = InvalidRequest("precondition_failed", "The file changed after that date.")
            return _backend_error(412, error)
        try:
            parse_range(request.headers.get("range"), size)
        except RangeNotSatisfiable:
            error = InvalidRequest("range_not_satisfiable", "The range starts past the end.")
            return _backend_error(416, error, {"Content-Range": f"bytes */{size}"})
        return None

    # -- uploads ------------------------------------------------------------------------

    async def create_upload(self, request: Request) -> Response:
        """Create an upload session; 201 (the real code is unknown)."""
        body = await _json_body(request)
        filename = body.get("filename") if isinstance(body, dict) else None
        if not isinstance(filename, str) or not filename.strip():
            raise InvalidRequest("invalid_request", "'filename' is required and must be a string.")
        info = await run_in_threadpool(self.hub.create_upload_session, filename)
        return JSONResponse(info.to_json(), status_code=201)

    async def append_upload(self, request: Request) -> Response:
        chunk_limit = self.hub.settings.max_chunk_bytes
        raw = await _read_body(request, 4 * math.ceil(chunk_limit / 3) + _JSON_SLACK)
        if raw is None:
            message = f"A chunk may hold at most {chunk_limit} bytes."
            raise PayloadTooLarge("chunk_too_large", message)
        file_id = request.path_params["file_id"]
        info = await run_in_threadpool(self._append, file_id, raw)
        return JSONResponse(info.to_json())

    def _append(self, file_id: str, raw: bytes) -> FileInfo:
        """Decode a chunk body and append it (in a worker thread: both can be slow)."""
        body = _parse_json(raw)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, str):
            raise InvalidRequest("invalid_request", "'data' must be a base64 string.")
        try:
            # Line breaks are tolerated, as lenient decoders do; other junk is refused.
            decoded = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("invalid_request", "'data' is not valid base64.") from None
        return self.hub.append_upload(file_id, decoded)

    # -- RenderOCR ----------------------------------------------------------------------

    async def engines(self, request: Request) -> Response:
        return JSONResponse({"data": self.hub.engines()})

    async def create_job(self, request: Request) -> Response:
        body = await _json_body(request)
        file_id = body.get("file_id") if isinstance(body, dict) else None
        # Creating a job reads the input to sniff it: a big one goes to a worker thread.
        big = isinstance(file_id, str) and self.hub.file_size(file_id) > _INLINE_BYTES
        if big or self._heavy:
            job = await run_in_threadpool(self.hub.create_job, body)
        else:
            job = self.hub.create_job(body)
        return JSONResponse(job.to_json(), status_code=202)

    async def list_jobs(self, request: Request) -> Response:
        jobs = await self._hub_call(self.hub.list_jobs)
        return JSONResponse({"data": [job.to_json() for job in jobs]})

    async def get_job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        wait = parse_wait(request.query_params.get("wait"))
        if wait > 0:
            await self._wait_for_end(job_id, wait)
        job = await self._hub_call(self.hub.get_job, job_id)
        return JSONResponse(job.to_json())

    async def _wait_for_end(self, job_id: str, wait: float) -> None:
        """Sleep until the job's end on the hub clock, the wait's end, or server stop.

        The end time is fixed at creation, so the poll sleeps until then (answering as
        the job ends, not up to a polling step later); a clock advance or the server's
        stop nudges it awake to look again.
        """
        ends_at = self.hub.job_terminal_at(job_id)
        if ends_at is None:
            return
        deadline = anyio.current_time() + wait
        while not self.hooks.stopping:
            until_end = (ends_at - self.hub.clock.now()).total_seconds()
            remaining = deadline - anyio.current_time()
            if until_end <= 0 or remaining <= 0:
                return
            await self.hooks.doze(min(until_end, remaining))

    # -- admin --------------------------------------------------------------------------

    async def admin_ledger(self, request: Request) -> Response:
        return JSONResponse(self.hub.ledger())

    async def admin_faults(self, request: Request) -> Response:
        body = _object(await _json_body(request))
        try:
            knobs = self.hub.update_faults(body)
        except ValueError as exc:
            raise InvalidRequest("invalid_request", str(exc)) from None
        return JSONResponse(knobs.to_json())

    async def admin_clock(self, request: Request) -> Response:
        advance = _object(await _json_body(request)).get("advance", 0)
        if not isinstance(advance, int | float) or isinstance(advance, bool) or advance < 0:
            raise InvalidRequest("invalid_request", "'advance' must be a number of seconds >= 0.")
        self.hub.clock.advance(advance)
        return JSONResponse({"now": iso(self.hub.clock.now()), "offset": self.hub.clock.offset})

    async def admin_keys(self, request: Request) -> Response:
        body = _object(await _json_body(request))
        lists: dict[str, list[str] | None] = {}
        for name in ("api_keys", "revoked"):
            value = body.get(name)
            if value is not None and not (
                isinstance(value, list) and all(isinstance(key, str) for key in value)
            ):
                raise InvalidRequest("invalid_request", f"'{name}' must be a list of strings.")
            lists[name] = value
        return JSONResponse(self.hub.set_keys(lists["api_keys"], lists["revoked"]))

    async def admin_reset_ledger(self, request: Request) -> Response:
        self.hub.reset_ledger()
        return JSONResponse(self.hub.ledger())


# Called with the time just before a stalled response's headers went out, the time it
# ended and how: "client gave up" (it disconnected) or "server stopped".
StallEnd = Callable[[float, float, str], None]


class _FileStream(Response):
    """A file body streamed from disk; a stalled one sends half, then waits.

    A stall lasts until the client gives up (disconnects) or the server stops; then
    ``on_stall_end`` hears when and how.
    """

    def __init__(
        self,
        handle: anyio.AsyncFile[bytes],
        *,
        start: int,
        length: int,
        status: int,
        headers: Mapping[str, str],
        stall: bool,
        hooks: ServerHooks,
        on_stall_end: StallEnd | None = None,
    ) -> None:
        self.status_code = status
        self.background = None
        self.init_headers(headers)
        self._handle = handle
        self._start = start
        self._length = length
        self._stall = stall
        self._hooks = hooks
        self._on_stall_end = on_stall_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self._handle:
            start = {"type": "http.response.start", "status": self.status_code}
            # Taken before the client can see the headers, so no client deadline counted
            # from their arrival can end before ``held_from`` + that deadline.
            held_from = time.monotonic()
            await send({**start, "headers": self.raw_headers})
            if scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            if self._stall and self._hooks.drop is None:
                # In process the client cannot time out on a socket: raise what it would see.
                await self._send_part(send, self._length // 2)
                raise httpx.ReadTimeout("The emulated download stalled.")
            async with anyio.create_task_group() as group:
                group.start_soon(_cancel_on_disconnect, receive, group.cancel_scope)
                await self._send_body(scope, send)
                group.cancel_scope.cancel()
            if self._on_stall_end is not None:
                how = "server stopped" if self._hooks.stopping else "client gave up"
                self._on_stall_end(held_from, time.monotonic(), how)

    async def _send_body(self, scope: Scope, send: Send) -> None:
        if not self._stall:
            await self._send_part(send, self._length)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await self._send_part(send, self._length // 2)
        while not self._hooks.stopping:  # until cancelled by the client's disconnect
            await anyio.sleep(POLL_STEP_SECONDS)
        if self._hooks.drop is not None:
            self._hooks.drop(scope)
            await anyio.sleep(0)

    async def _send_part(self, send: Send, limit: int) -> None:
        """Send the first ``limit`` bytes of the span, leaving the response open."""
        await self._handle.seek(self._start)
        sent = 0
        while sent < limit:
            chunk = await self._handle.read(min(_DOWNLOAD_CHUNK, limit - sent))
            if not chunk:
                break
            sent += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


class _MultipartFile:
    """Parses a multipart/form-data body, writing the part named "file" to the store.

    ``feed`` and ``commit`` run in worker threads: parsing and disk writes stay off the
    event loop.
    """

    def __init__(self, boundary: bytes, sink: IncomingFile) -> None:
        self._sink = sink
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._in_file = False
        self._found = False
        self._ended = False
        self._filename = "file"
        self._content_type: str | None = None
        try:
            self._parser = MultipartParser(
                boundary,
                {
                    "on_part_begin": self._headers.clear,
                    "on_header_field": self._on_header_field,
                    "on_header_value": self._on_header_value,
                    "on_header_end": self._on_header_end,
                    "on_headers_finished": self._on_headers_finished,
                    "on_part_data": self._on_part_data,
                    "on_part_end": self._on_part_end,
                    "on_end": self._on_end,
                },
            )
        except FormParserError as exc:
            raise InvalidRequest("invalid_request", f"Bad multipart boundary: {exc}") from None

    def feed(self, data: bytes) -> None:
        """Parse more of the body; PayloadTooLarge once the file passes the cap."""
        try:
            self._parser.write(data)
        except FormParserError as exc:
            raise InvalidRequest("invalid_request", f"Malformed multipart body: {exc}") from None

    def commit(self) -> FileInfo:
        """Store the received file; InvalidRequest if the body was cut or had no file."""
        if not self._ended:
            raise InvalidRequest("invalid_request", "The multipart body is incomplete.")
        if not self._found:
            raise InvalidRequest("invalid_request", "The form has no part named 'file'.")
        return self._sink.commit(self._filename, self._content_type)

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _on_headers_finished(self) -> None:
        disposition = self._headers.get(b"content-disposition", b"").decode("latin-1")
        _, params = parse_options_header(disposition)
        self._in_file = not self._found and params.get(b"name") == b"file"
        if self._in_file:
            self._found = True
            self._filename = _text(params.get(b"filename", b"file"))
            content_type = self._headers.get(b"content-type")
            self._content_type = _text(content_type) if content_type else None

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self._sink.write(data[start:end])

    def _on_part_end(self) -> None:
        self._in_file = False

    def _on_end(self) -> None:
        self._ended = True


# ---------------------------------------------------------------------------------------
# Helpers


def _backend_error(
    status: int, error: HubError, headers: Mapping[str, str] | None = None
) -> Response:
    """The backend's own error style, as in JobError."""
    body = {"code": error.code, "message": error.message, "request_id": new_id()}
    return JSONResponse(body, status, headers)


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _boundary(content_type: str | None) -> bytes | None:
    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        return None
    return params.get(b"boundary") or None


def _content_length(request: Request) -> int | None:
    try:
        return int(request.headers["content-length"])
    except (KeyError, ValueError):
        return None


def _download_headers(item: Download, start: int, end: int, *, partial: bool) -> dict[str, str]:
    headers = {
        "Content-Type": item.media_type,
        "Content-Length": str(end - start + 1),
        "Content-Disposition": _attachment(item.filename),
        "Accept-Ranges": "bytes",
        "Last-Modified": format_datetime(item.updated_at, usegmt=True),
    }
    if partial:
        headers["Content-Range"] = f"bytes {start}-{end}/{item.size}"
    return headers


def _attachment(filename: str) -> str:
    """Content-Disposition with an ASCII fallback and the exact UTF-8 name (RFC 6266)."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _modified_since(header: str | None, updated_at: datetime) -> bool:
    """True when If-Unmodified-Since names a moment before the file's last change."""
    if not header:
        return False
    try:
        since = parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return False  # an unreadable date is ignored, as RFC 9110 says
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    return updated_at.replace(microsecond=0) > since


async def _feed(request: Request, form: _MultipartFile) -> None:
    """Pass the request body to the parser in pieces of about a megabyte.

    Full pieces are parsed (and written) in a worker thread; the last, smaller one, which
    is all of a typical scan, on the loop: a thread hop would cost more than the parsing.
    """
    buffer = bytearray()
    async with aclosing(request.stream()) as stream:
        async for chunk in stream:
            buffer += chunk
            if len(buffer) >= _UPLOAD_BUFFER:
                await run_in_threadpool(form.feed, bytes(buffer))
                buffer.clear()
    if buffer:
        form.feed(bytes(buffer))


async def _open_for_download(path: Path, size: int) -> bytes | anyio.AsyncFile[bytes]:
    """A small file's bytes (read at once from the page cache), else an async handle."""
    if size <= _INLINE_BYTES:
        with path.open("rb") as handle:
            return handle.read()
    return await anyio.open_file(path, "rb")


async def _drain(request: Request) -> None:
    """Read and discard what is left of the body.

    Clients send the whole body before reading the answer; closing on them instead can
    reset the connection and lose the answer. A real gateway may just cut them off.
    """
    try:
        async with aclosing(request.stream()) as stream:
            async for _ in stream:
                pass
    except (ClientDisconnect, RuntimeError):  # gone, or the body was already all read
        pass


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The whole body, or None (after draining it) if it is longer than ``limit``."""
    declared = _content_length(request)
    if declared is not None and declared > limit:
        await _drain(request)
        return None
    chunks: list[bytes] = []
    size = 0
    async with aclosing(request.stream()) as stream:
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                break
            chunks.append(chunk)
    if size > limit:
        await _drain(request)
        return None
    return b"".join(chunks)


async def _json_body(request: Request) -> object:
    raw = await _read_body(request, _JSON_LIMIT)
    if raw is None:
        raise PayloadTooLarge("body_too_large", f"The body exceeds {_JSON_LIMIT} bytes.")
    return _parse_json(raw)


def _parse_json(raw: bytes) -> object:
    try:
        return cast(object, json.loads(raw))
    except ValueError:
        raise InvalidRequest("invalid_request", "The body must be valid JSON.") from None


def _object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("invalid_request", "The body must be a JSON object.")
    return cast(dict[str, Any], body)
