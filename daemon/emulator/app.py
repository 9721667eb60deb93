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
    GET  /_storage/{token}         a redirected download's bytes (download_redirect); no
                                   key needed, as a pre-signed storage URL; 403 when unknown

Admin routes: no auth, never faulted, not counted in the ledger:

    GET  /_emulator/ledger        {"requests": {"METHOD /route": n}, "refused": {"METHOD
                                  /route": 429s}, "uploads": [{file_id, filename, size,
                                  sha256, content_type, received_at}], "jobs": [{job_id,
                                  file_id, engine, languages, output_format, created_at,
                                  finishes_at, filename, input_pages, outcome, reply_lost}],
                                  "downloads": [{file_id, size, status[, mode]}], "events":
                                  [...], "faults": {kind: n}, "storage_saw_authorization": n}
    GET  /_emulator/faults        every knob
    POST /_emulator/faults        partial update of any knobs -> every knob; 400 names a
                                  bad knob or value
    POST /_emulator/clock         {"advance": seconds} -> {"now": ..., "offset": seconds}
    POST /_emulator/keys          {"api_keys": [...], "revoked": [...]} -> both lists
    POST /_emulator/reset-ledger  -> the emptied ledger

Every job created is one paid conversion: ``hub.pages_billed(ledger)`` and
``hub.paid_conversions(ledger)`` add them up; ``hub.refused_share(ledger)`` is the share
of requests answered 429.

Knobs (``daemon/emulator/knobs.py``; JSON key = name, CLI flag = --name-with-dashes):

  Request faults (Faults)
    error_rate, rate_limit_rate, drop_rate  fractions answered 5xx / 429 / cut (one draw)
    retry_after                seconds of injected 429s
    job_failure_rate           fraction of jobs failing with upstream_service_error
    latency                    seconds added to authenticated routes
    stall_downloads            count: downloads that send half, then stall
    files_rate_limit           per-key requests/minute on /files (0 = off)
    requests_per_minute        per-key requests/minute on every authenticated route
    retry_after_format         seconds | http_date | absent, for every 429
    lose_create_replies        count: creates that make the job, then cut the connection
    drop_create_requests       count: creates cut before any job is made
    drop_create_after_failure  after a job fails, cut that many creates for its filename
    outage                     false | true (until cleared) | seconds from now
    outage_mode                drop | 503 | html502
    outage_spares_engines      the public engine list stays up in an outage
    refuse_route, refuse_status  one route ("POST /renderocr/jobs") answered 402 or 403
  Outputs and downloads (Storage)
    output_delay               seconds an output answers 404 after its job completed
    output_missing             outputs always answer 404
    output_ttl, job_ttl        seconds outputs / jobs live after completion (null = build)
    expired_status             404 | 410 for expired files and jobs
    download_mode              normal | endless | trickle | oversize | unsized
    trickle_interval, oversize_bytes  pace of trickle; extra bytes of oversize/unsized
    download_gzip              gzip Content-Encoding with the compressed Content-Length
    download_gzip_bomb, gzip_bomb_bytes  gzip body inflating to N bytes (1 GiB)
    download_redirect, storage_host  302 to /_storage/<token> on another host name
    output_bomb                none | deep_xml | zeros, for jobs completing from now on
    bomb_depth, bomb_bytes     10,000,000 nested elements; 4 GiB of zeros
  Answer shapes (Variants)
    create_status, upload_status  200 | 201 | 202 (defaults 202 and 201)
    extra_fields               unknown fields in job and file bodies
    progress_scale             fraction | percent_int | percent_float
    timestamp_style            z | fraction_z | offset
    timestamp_skew             seconds added to every reported time and HTTP date
    omit_fields                some of completed_at, expires_at, usage
    status_case                lower | upper
    extra_status               a status (e.g. running) reported instead of processing
    error_as_string            a failed job's error as "code: message"
    usage_on_failure           failed jobs report usage too
    engines_shape              objects | strings | other_wrapper | no_languages |
                               no_conversions | empty | auth_required
    error_body                 default | problem | nested | message | text | html
    missing_input_status, missing_input_code  400 invalid_file_id by default
    list_limit                 lists hold only the newest N
    wait_mode                  honour | ignore | reject
    echo_auth                  error bodies repeat the Authorization header
    hostile_ids                ids like "../../x%2F..." (send them percent-encoded)
    json_padding, gzip_json    pad job/list answers with N spaces; gzip them

Error bodies follow who would answer in the real stack: the gateway (auth, rate limits,
injected faults, outages, refused routes, size limits, unknown routes) sends Zuplo's
problem+json; the backend (validation, unknown ids) sends ``{"code", "message",
"request_id"}`` unless ``error_body`` says otherwise. The real codes of the backend
errors are unknown.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import quote, unquote

import anyio
import httpx
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from daemon.emulator import bombs, shapes
from daemon.emulator.hub import (
    Access,
    Download,
    Expired,
    FileInfo,
    Hub,
    HubError,
    IncomingFile,
    InvalidRequest,
    MissingInput,
    NotFound,
    PayloadTooLarge,
    bearer_key,
    iso,
)
from daemon.emulator.knobs import Knobs, Storage, Variants
from daemon.emulator.streams import (
    DOWNLOAD_CHUNK,
    FileStream,
    HostileBody,
    StallEnd,
    file_then_zeros,
    trickle,
)
from daemon.emulator.streams import ServerHooks as ServerHooks  # noqa: PLC0414

MAX_WAIT_SECONDS = 10.0
TRICKLE_LENGTH = 2**40  # the Content-Length a trickle declares: a tebibyte

_UPLOAD_BUFFER = 1024 * 1024  # hand the body to the parser thread in pieces this big
_MULTIPART_OVERHEAD = 64 * 1024  # Content-Length slack for boundaries and part headers
_JSON_LIMIT = 1024 * 1024
_JSON_SLACK = 4096  # room for the {"data": ...} around a base64 chunk
# Files up to this size are read and parsed on the event loop: cheaper than thread hops.
_INLINE_BYTES = 1024 * 1024
# Stands for a "/" decoded from "%2F" inside one path segment (a hostile id), so that the
# router still sees one segment; handlers turn it back (``_param``).
_SEGMENT_SLASH = "\x00"
T = TypeVar("T")

Handler = Callable[[Request], Awaitable[Response]]


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
        middleware=[Middleware(_GatewayMiddleware, hooks=api.hooks)],
        exception_handlers={HubError: api.on_hub_error, HTTPException: api.on_http_error},
    )
    app.state.hooks = api.hooks
    return app


class _DropConnection(Exception):
    """Raised by a route to have its connection cut without any response."""


class _GatewayMiddleware:
    """Keeps a "%2F" inside a path segment in its segment, and cuts connections.

    uvicorn decodes the whole path, so an id holding "/" (``hostile_ids``), sent
    percent-encoded as it must be, would split into several segments and match no route.
    ``_DropConnection`` raised by a route becomes a connection cut.
    """

    def __init__(self, app: ASGIApp, hooks: ServerHooks) -> None:
        self.app = app
        self.hooks = hooks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path")
        if scope["type"] == "http" and raw and b"%2f" in raw.lower():
            segments = raw.decode("ascii", "replace").split("/")
            path = "/".join(unquote(part).replace("/", _SEGMENT_SLASH) for part in segments)
            scope = {**scope, "path": path}
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


def _param(request: Request, name: str) -> str:
    """A path parameter, with a "/" it held (sent as "%2F") restored."""
    return cast(str, request.path_params[name]).replace(_SEGMENT_SLASH, "/")


def _path(request: Request) -> str:
    return request.url.path.replace(_SEGMENT_SLASH, "/")


# The daemon names the job a request belongs to in this header (any client may omit it).
TRACE_HEADER = "x-ldx-hotfolder-job"
# The event that tells when a stalled download ended, and how (for the deadline tests).
STALL_EVENT = "stalled download ended"
STORAGE_ROUTE = "GET /_storage/{token}"


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
            Route("/_storage/{token}", self.storage, methods=["GET"]),
            Route("/_emulator/ledger", self.admin_ledger, methods=["GET"]),
            Route("/_emulator/faults", self.admin_faults, methods=["GET", "POST"]),
            Route("/_emulator/clock", self.admin_clock, methods=["POST"]),
            Route("/_emulator/keys", self.admin_keys, methods=["POST"]),
            Route("/_emulator/reset-ledger", self.admin_reset_ledger, methods=["POST"]),
        ]

    # -- gatekeeping --------------------------------------------------------------------

    def _public(self, method: str, path: str, handler: Handler) -> Route:
        async def endpoint(request: Request) -> Response:
            route = f"{request.method} {path}"
            self.hub.count_request(route)
            mode = self.hub.outage(public=True)
            if mode is not None:
                return self._outage_answer(request, mode)
            refused = self.hub.refusal(route)
            if refused is not None:
                return self._refused(request, route, refused)
            return await handler(request)

        return Route(path, endpoint, methods=[method])

    def _api(self, method: str, path: str, handler: Handler) -> Route:
        async def endpoint(request: Request) -> Response:
            route = f"{request.method} {path}"
            self.hub.count_request(route)
            started = time.monotonic()
            try:
                refusal = await self._admit(request, route)
                response = refusal if refusal is not None else await handler(request)
            except _DropConnection:
                self._record_event(request, path, started, "drop")
                raise
            if response.status_code == 429:
                self.hub.count_refused(route)
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
                "path": _path(request),
                "trace": request.headers.get(TRACE_HEADER),
                "status": status,
                "retry_after": _retry_seconds(retry_after),
            }
        )

    async def _admit(self, request: Request, route: str) -> Response | None:
        """Apply latency, outages, the key check, rate limits, a refused route and drawn
        faults, in the order the gateway would: its policies run before the backend."""
        latency = self.hub.faults.latency
        if latency > 0:
            await anyio.sleep(latency)
        mode = self.hub.outage()
        if mode is not None:  # the gateway is down: keys are not even looked at
            return self._outage_answer(request, mode)
        authorization = request.headers.get("authorization")
        access = self.hub.check_key(authorization)
        if access is not Access.GRANTED:
            return self._auth_problem(request, access)
        limited = self._limit(request, route, bearer_key(authorization) or "")
        if limited is not None:
            return limited
        refused = self.hub.refusal(route)
        if refused is not None:
            return self._refused(request, route, refused)
        return self._drawn_fault(request)

    def _limit(self, request: Request, route: str, key: str) -> Response | None:
        """The per-key minute limits: /files alone, then every route."""
        wait = self.hub.throttle(key) if route.split(" ", 1)[1].startswith("/files") else None
        if wait is None:
            wait = self.hub.limit_requests(key)
        return None if wait is None else self._rate_limited(request, wait)

    def _drawn_fault(self, request: Request) -> Response | None:
        fault = self.hub.draw_fault(request.headers.get(TRACE_HEADER))
        if fault is None:
            return None
        if fault.kind == "drop":
            raise _DropConnection
        if fault.kind == "rate_limit":
            return self._rate_limited(request, fault.retry_after)
        detail = "Emulated transient failure of the gateway or backend; retry later."
        return self._problem(request, fault.status, detail)

    def _outage_answer(self, request: Request, mode: str) -> Response:
        """An outage: the connection cut, a 503 problem, or a proxy's 502 HTML page."""
        if mode == "drop":
            raise _DropConnection
        if mode == "html502":
            detail = "The upstream server is unreachable."
            return shapes.html_page(502, self._echo(request, detail))
        return self._problem(request, 503, "The service is temporarily unavailable.")

    def _refused(self, request: Request, route: str, status: int) -> Response:
        # A plan or credit check is a gateway policy (Zuplo monetization): problem+json.
        # The n8n README's "Credit limit exceeded" is the closest known wording.
        if status == 402:
            detail = "Credit limit exceeded: the monthly credit allowance of this key is used up."
        else:
            detail = f"Your plan does not include {route}."
        return self._problem(request, status, detail)

    def _auth_problem(self, request: Request, access: Access) -> Response:
        if access is Access.REVOKED:
            return self._problem(request, 403, "The API key has been revoked.")
        detail = {
            Access.MISSING: "No Authorization header was sent; use 'Bearer <API key>'.",
            Access.MALFORMED: "The Authorization header must be 'Bearer <API key>'.",
        }.get(access, "The API key is not valid.")
        return self._problem(request, 401, detail)

    def _rate_limited(self, request: Request, seconds: float) -> Response:
        """429 problem+json; Retry-After in seconds, as an HTTP date or absent.

        An HTTP date is the wall clock plus ``timestamp_skew`` (as a gateway's Date
        header), rounded up so that a client that waits until then waits long enough.
        """
        shown = str(int(seconds)) if seconds == int(seconds) else f"{seconds:g}"
        detail = f"Rate limit exceeded; retry after {shown} seconds."
        knobs = self.hub.knobs
        style = knobs.faults.retry_after_format
        headers: dict[str, str] = {}
        if style == "seconds":
            headers["Retry-After"] = shown
        elif style == "http_date":
            skew = knobs.variants.timestamp_skew
            when = datetime.fromtimestamp(math.ceil(time.time() + skew + seconds), UTC)
            headers["Retry-After"] = format_datetime(when, usegmt=True)
        return self._problem(request, 429, detail, headers)

    def _echo(self, request: Request, text: str) -> str:
        """``text``, plus the request's Authorization header when ``echo_auth`` is on."""
        authorization = request.headers.get("authorization")
        if authorization is None or not self.hub.knobs.variants.echo_auth:
            return text
        return f"{text} (Authorization: {authorization})"

    def _problem(
        self, request: Request, status: int, detail: str, headers: Mapping[str, str] | None = None
    ) -> Response:
        """A Zuplo-style RFC 7807 problem+json response."""
        moment = self.hub.clock.now() + timedelta(seconds=self.hub.knobs.variants.timestamp_skew)
        return shapes.problem(status, self._echo(request, detail), _path(request), moment, headers)

    def _backend_error(
        self,
        request: Request,
        status: int,
        error: HubError,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """The backend's own error style (JobError's), or the one ``error_body`` picks."""
        style = self.hub.knobs.variants.error_body
        message = self._echo(request, error.message)
        if style == "problem":
            return self._problem(request, status, error.message, headers)
        return shapes.backend_error(style, status, error.code, message, headers)

    async def on_hub_error(self, request: Request, exc: Exception) -> Response:
        """Map a hub refusal to its HTTP answer."""
        error = cast(HubError, exc)
        if isinstance(error, PayloadTooLarge):  # the gateway enforces body sizes
            return self._problem(request, 413, error.message)
        if isinstance(error, MissingInput):
            variants = self.hub.knobs.variants
            error = MissingInput(variants.missing_input_code, error.message)
            return self._backend_error(request, variants.missing_input_status, error)
        return self._backend_error(request, self._not_found_status(error), error)

    def _not_found_status(self, error: HubError) -> int:
        if isinstance(error, Expired):
            return self.hub.knobs.storage.expired_status
        return 404 if isinstance(error, NotFound) else 400

    async def on_http_error(self, request: Request, exc: Exception) -> Response:
        """Routing errors (unknown route, wrong method) as the gateway's problem+json."""
        error = cast(HTTPException, exc)
        detail = error.detail
        if error.status_code == 404:
            detail = f"No route matches {request.method} {_path(request)}."
        return self._problem(request, error.status_code, detail, error.headers)

    # -- files --------------------------------------------------------------------------

    async def list_files(self, request: Request) -> Response:
        files = await self._hub_call(self.hub.list_files)
        variants = self.hub.knobs.variants
        shape = shapes.file_shaper(variants)
        listed = [shape(info) for info in _newest(files, variants)]
        return shapes.json_response({"data": listed}, 200, variants)

    async def get_file(self, request: Request) -> Response:
        file_id = _param(request, "file_id")
        self.hub.hold_output(file_id)
        info = await self._hub_call(self.hub.get_file, file_id)
        return JSONResponse(shapes.file_body(info, self.hub.knobs.variants))

    async def upload_file(self, request: Request) -> Response:
        """Stream the "file" part to disk while hashing; 413 over the cap.

        Answers 201 (``upload_status``): the real code is unknown and clients accept 200
        or 201.
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
        variants = self.hub.knobs.variants
        return JSONResponse(shapes.file_body(info, variants), variants.upload_status)

    # -- downloads ----------------------------------------------------------------------

    async def download(self, request: Request) -> Response:
        file_id = _param(request, "file_id")
        storage = self.hub.knobs.storage
        try:
            self.hub.hold_output(file_id)
            item = await self._hub_call(self.hub.open_download, file_id)
            if storage.download_redirect:
                return self._redirect(request, item, storage)
            return await self._serve(request, item, storage)
        except NotFound as error:  # unknown, expired, held back, or expired just now
            self.hub.record_download(file_id, 0, self._not_found_status(error))
            raise

    def _redirect(self, request: Request, item: Download, storage: Storage) -> Response:
        """302 to the storage route on another host name, as object storage would be.

        Same port, other name: 127.0.0.1 and localhost reach the same server, and a
        client must treat them as different origins (never send the key there).
        """
        token = self.hub.storage_token(item.file_id)
        called = request.url.hostname or ""
        host = storage.storage_host or ("127.0.0.1" if called == "localhost" else "localhost")
        host = f"[{host}]" if ":" in host else host
        netloc = f"{host}:{request.url.port}" if request.url.port else host
        self.hub.record_download(item.file_id, 0, 302)
        location = f"{request.url.scheme}://{netloc}/_storage/{token}"
        return Response(status_code=302, headers={"Location": location})

    async def storage(self, request: Request) -> Response:
        """A redirected download: no key needed, and one sent is a leak the ledger counts."""
        self.hub.count_request(STORAGE_ROUTE)
        if "authorization" in request.headers:
            self.hub.count_storage_authorization()
        file_id = self.hub.resolve_storage_token(request.path_params["token"])
        if file_id is None:
            return _storage_error(403, "AccessDenied", "Request has expired")
        try:
            item = await self._hub_call(self.hub.open_download, file_id)
        except NotFound:
            return _storage_error(404, "NoSuchKey", "The specified key does not exist.")
        return await self._serve(request, item, self.hub.knobs.storage)

    async def _serve(self, request: Request, item: Download, storage: Storage) -> Response:
        """The bytes of a file, sent the way the storage knobs say."""
        if storage.download_gzip_bomb:
            return self._gzip_bomb(item, storage.gzip_bomb_bytes)
        if storage.download_mode != "normal":
            return self._hostile(item, storage)
        if storage.download_gzip:
            return await self._gzipped(item)
        return await self._plain_download(request, item)

    def _gzip_bomb(self, item: Download, size: int) -> Response:
        """A gzip body of ``size`` zeros, about a thousandth of that on the wire."""
        runs = bombs.gzip_bomb(size)
        length = bombs.gzip_size(runs)
        headers = _download_headers(item, 0, length - 1, partial=False, skew=0)
        headers.update({"Content-Encoding": "gzip", "Accept-Ranges": "none"})
        self.hub.record_download(item.file_id, length, 200, "gzip_bomb")
        return StreamingResponse(shapes.aiterate(bombs.gzip_chunks(runs)), 200, headers)

    async def _gzipped(self, item: Download) -> Response:
        """The file gzipped whole, with the compressed Content-Length (ranges ignored)."""
        try:
            body = await run_in_threadpool(_gzip_file, item.path)
        except FileNotFoundError:  # expired just now
            raise NotFound("file_not_found", f"File {item.file_id!r} has expired.") from None
        headers = _download_headers(item, 0, len(body) - 1, partial=False, skew=0)
        headers.update({"Content-Encoding": "gzip", "Accept-Ranges": "none"})
        self.hub.record_download(item.file_id, len(body), 200, "gzip")
        return Response(body, 200, headers)

    def _hostile(self, item: Download, storage: Storage) -> Response:
        """Endless, trickling, oversize or unsized bodies (``download_mode``)."""
        mode = storage.download_mode
        headers = _download_headers(item, 0, item.size - 1, partial=False, skew=0)
        headers["Accept-Ranges"] = "none"
        if mode == "endless":
            del headers["Content-Length"]  # chunked, for ever
            source = file_then_zeros(item.path, None)
        elif mode == "unsized":
            del headers["Content-Length"]  # chunked, longer than the file
            source = file_then_zeros(item.path, storage.oversize_bytes)
        elif mode == "trickle":
            headers["Content-Length"] = str(TRICKLE_LENGTH)
            source = trickle(file_then_zeros(item.path, None), storage.trickle_interval, self.hooks)
        else:  # oversize: the file fills the declared length, the overrun goes past it
            source = file_then_zeros(item.path, 0)
        declared = int(headers.get("Content-Length", "0"))
        self.hub.record_download(item.file_id, declared, 200, mode)
        return HostileBody(
            source,
            status=200,
            headers=headers,
            hooks=self.hooks,
            endless=mode in ("endless", "trickle"),
            overrun=storage.oversize_bytes if mode == "oversize" else 0,
        )

    async def _plain_download(self, request: Request, item: Download) -> Response:
        """The file as stored: ranges, preconditions, and stalls (``stall_downloads``)."""
        try:
            handle = await _open_for_download(item.path, item.size)
        except FileNotFoundError:  # expired just now
            raise NotFound("file_not_found", f"File {item.file_id!r} has expired.") from None
        skew = self.hub.knobs.variants.timestamp_skew
        refusal = self._refuse_download(request, item, skew)
        if refusal is not None:
            if not isinstance(handle, bytes):
                await handle.aclose()
            self.hub.record_download(item.file_id, 0, refusal.status_code)
            return refusal
        span = parse_range(request.headers.get("range"), item.size)
        start, end = span if span is not None else (0, item.size - 1)
        length, status = end - start + 1, 206 if span is not None else 200
        headers = _download_headers(item, start, end, partial=span is not None, skew=skew)
        self.hub.record_download(item.file_id, length, status)
        stall = self.hub.take_stall()
        if isinstance(handle, bytes) and not stall:
            # A small file is already in memory: one body message, no streaming task.
            return Response(handle[start : end + 1], status, headers)
        if isinstance(handle, bytes):
            handle = await anyio.open_file(item.path, "rb")
        return FileStream(
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
                    "path": _path(request),
                    "trace": request.headers.get(TRACE_HEADER),
                    "status": how,
                    "retry_after": None,
                    "length": length,
                }
            )

        return record

    def _refuse_download(self, request: Request, item: Download, skew: float) -> Response | None:
        """412 for a failed If-Unmodified-Since, 416 for a range past the end, else None.

        The client's date is compared with the Last-Modified it was shown (skewed).
        """
        shown = item.updated_at + timedelta(seconds=skew)
        if _modified_since(request.headers.get("if-unmodified-since"), shown):
            error = InvalidRequest("precondition_failed", "The file changed after that date.")
            return self._backend_error(request, 412, error)
        try:
            parse_range(request.headers.get("range"), item.size)
        except RangeNotSatisfiable:
            error = InvalidRequest("range_not_satisfiable", "The range starts past the end.")
            headers = {"Content-Range": f"bytes */{item.size}"}
            return self._backend_error(request, 416, error, headers)
        return None

    # -- uploads ------------------------------------------------------------------------

    async def create_upload(self, request: Request) -> Response:
        """Create an upload session; 201 (``upload_status``; the real code is unknown)."""
        body = await _json_body(request)
        filename = body.get("filename") if isinstance(body, dict) else None
        if not isinstance(filename, str) or not filename.strip():
            raise InvalidRequest("invalid_request", "'filename' is required and must be a string.")
        info = await run_in_threadpool(self.hub.create_upload_session, filename)
        variants = self.hub.knobs.variants
        return JSONResponse(shapes.file_body(info, variants), variants.upload_status)

    async def append_upload(self, request: Request) -> Response:
        chunk_limit = self.hub.settings.max_chunk_bytes
        raw = await _read_body(request, 4 * math.ceil(chunk_limit / 3) + _JSON_SLACK)
        if raw is None:
            message = f"A chunk may hold at most {chunk_limit} bytes."
            raise PayloadTooLarge("chunk_too_large", message)
        file_id = _param(request, "file_id")
        info = await run_in_threadpool(self._append, file_id, raw)
        return JSONResponse(shapes.file_body(info, self.hub.knobs.variants))

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
        shape = self.hub.knobs.variants.engines_shape
        if shape == "auth_required":
            access = self.hub.check_key(request.headers.get("authorization"))
            if access is not Access.GRANTED:
                return self._auth_problem(request, access)
        return JSONResponse(shapes.engines_body(self.hub.engines(), shape))

    async def create_job(self, request: Request) -> Response:
        body = await _json_body(request)
        if self.hub.take_create_drop(body):
            raise _DropConnection  # before any job exists
        file_id = body.get("file_id") if isinstance(body, dict) else None
        # Creating a job reads the input to sniff it: a big one goes to a worker thread.
        big = isinstance(file_id, str) and self.hub.file_size(file_id) > _INLINE_BYTES
        if big or self._heavy:
            job = await run_in_threadpool(self.hub.create_job, body)
        else:
            job = self.hub.create_job(body)
        if self.hub.take_lost_reply(job.job_id):
            raise _DropConnection  # the job exists; its reply never arrives
        variants = self.hub.knobs.variants
        answer = shapes.job_body(job, variants)
        return shapes.json_response(answer, variants.create_status, variants)

    async def list_jobs(self, request: Request) -> Response:
        jobs = await self._hub_call(self.hub.list_jobs)
        variants = self.hub.knobs.variants
        shape = shapes.job_shaper(variants)
        listed = [shape(job) for job in _newest(jobs, variants)]
        return shapes.json_response({"data": listed}, 200, variants)

    async def get_job(self, request: Request) -> Response:
        job_id = _param(request, "job_id")
        variants = self.hub.knobs.variants
        asked = request.query_params.get("wait")
        if asked is not None and variants.wait_mode == "reject":
            # As a strict backend refuses a query parameter it does not know.
            raise InvalidRequest("invalid_parameter", "Unknown query parameter 'wait'.")
        wait = parse_wait(asked) if variants.wait_mode == "honour" else 0.0
        if wait > 0:
            await self._wait_for_end(job_id, wait)
        job = await self._hub_call(self.hub.get_job, job_id)
        return shapes.json_response(shapes.job_body(job, variants), 200, variants)

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
        if request.method == "GET":
            return JSONResponse(self.hub.knobs.to_json())
        body = _object(await _json_body(request))
        try:
            knobs: Knobs = self.hub.update_knobs(body)
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


def _download_headers(
    item: Download, start: int, end: int, *, partial: bool, skew: float
) -> dict[str, str]:
    modified = item.updated_at + timedelta(seconds=skew)
    headers = {
        "Content-Type": item.media_type,
        "Content-Length": str(end - start + 1),
        "Content-Disposition": _attachment(item.filename),
        "Accept-Ranges": "bytes",
        "Last-Modified": format_datetime(modified, usegmt=True),
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


def _newest(items: list[T], variants: Variants) -> list[T]:
    """A newest-first list cut to ``list_limit`` (0: all)."""
    return items[: variants.list_limit] if variants.list_limit else items


def _retry_seconds(header: str | None) -> float | None:
    """Seconds a Retry-After header asks for (a number or an HTTP date), or None."""
    if not header:
        return None
    try:
        return float(header)
    except ValueError:
        pass
    try:
        return (parsedate_to_datetime(header) - datetime.now(UTC)).total_seconds()
    except (TypeError, ValueError):
        return None


def _storage_error(status: int, code: str, message: str) -> Response:
    """An object store's own refusal (S3's XML): a pre-signed URL expired or unknown."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    )
    return Response(body, status, media_type="application/xml")


def _gzip_file(path: Path) -> bytes:
    """A file gzipped, read in pieces (in a worker thread: it may be big)."""
    squeeze = zlib.compressobj(6, zlib.DEFLATED, 31)
    parts: list[bytes] = []
    with path.open("rb") as source:
        while chunk := source.read(DOWNLOAD_CHUNK):
            parts.append(squeeze.compress(chunk))
    parts.append(squeeze.flush())
    return b"".join(parts)
