"""The download routes: a file's bytes, and the storage route a redirect points to.

``GET /files/{file_id}/content`` sends a stored file with ranges and preconditions, or
however the storage knobs say: gzipped, as a gzip bomb, endless, trickling, oversize,
unsized, stalled half way, or as a 302 to ``GET /_storage/{token}`` on another host name
(a pre-signed object-storage URL, which needs no key).
"""

from __future__ import annotations

import zlib
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from urllib.parse import quote

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from daemon.emulator import bombs, shapes
from daemon.emulator.handling import INLINE_BYTES, TRACE_HEADER, hub_call, param, request_path
from daemon.emulator.hub import Hub
from daemon.emulator.knobs import Storage
from daemon.emulator.models import Download
from daemon.emulator.problems import Problems
from daemon.emulator.refusals import InvalidRequest, NotFound
from daemon.emulator.streams import (
    DOWNLOAD_CHUNK,
    FileStream,
    HostileBody,
    ServerHooks,
    StallEnd,
    file_then_zeros,
    trickle,
)

TRICKLE_LENGTH = 2**40  # the Content-Length a trickle declares: a tebibyte
# The event that tells when a stalled download ended, and how (for the deadline tests).
STALL_EVENT = "stalled download ended"
STORAGE_ROUTE = "GET /_storage/{token}"


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


class DownloadRoutes:
    """Handlers of file contents and of the storage route over one hub."""

    def __init__(self, hub: Hub, hooks: ServerHooks, problems: Problems) -> None:
        self.hub = hub
        self.hooks = hooks
        self.problems = problems

    async def download(self, request: Request) -> Response:
        """``GET /files/{file_id}/content``: the bytes, a redirect, or what the knobs say."""
        file_id = param(request, "file_id")
        storage = self.hub.knobs.storage
        try:
            self.hub.hold_output(file_id)
            item = await hub_call(self.hub, self.hub.open_download, file_id)
            if storage.download_redirect:
                return self._redirect(request, item, storage)
            return await self._serve(request, item, storage)
        except NotFound as error:  # unknown, expired, held back, or expired just now
            self.hub.record_download(file_id, 0, self.problems.not_found_status(error))
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
            item = await hub_call(self.hub, self.hub.open_download, file_id)
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
                    "path": request_path(request),
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
            return self.problems.backend_error(request, 412, error)
        try:
            parse_range(request.headers.get("range"), item.size)
        except RangeNotSatisfiable:
            error = InvalidRequest("range_not_satisfiable", "The range starts past the end.")
            headers = {"Content-Range": f"bytes */{item.size}"}
            return self.problems.backend_error(request, 416, error, headers)
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


async def _open_for_download(path: Path, size: int) -> bytes | anyio.AsyncFile[bytes]:
    """A small file's bytes (read at once from the page cache), else an async handle."""
    if size <= INLINE_BYTES:
        with path.open("rb") as handle:
            return handle.read()
    return await anyio.open_file(path, "rb")


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
