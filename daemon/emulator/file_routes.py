"""The file and upload routes: list and show files, multipart uploads, upload sessions.

``POST /files`` streams the part named "file" to the store while hashing it, parsing
the multipart body in pieces (``MultipartFile``); ``POST /uploads`` and ``PUT
/uploads/{file_id}`` make and grow an upload session from base64 chunks. Downloads are
``download_routes``.
"""

from __future__ import annotations

import base64
import binascii
import math
from contextlib import aclosing

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from daemon.emulator import shapes
from daemon.emulator.files import IncomingFile, too_large_message
from daemon.emulator.handling import (
    content_length,
    drain,
    hub_call,
    json_body,
    newest,
    param,
    parse_json,
    read_body,
)
from daemon.emulator.hub import Hub
from daemon.emulator.models import FileInfo
from daemon.emulator.refusals import HubError, InvalidRequest, PayloadTooLarge

_UPLOAD_BUFFER = 1024 * 1024  # hand the body to the parser thread in pieces this big
_MULTIPART_OVERHEAD = 64 * 1024  # Content-Length slack for boundaries and part headers
_JSON_SLACK = 4096  # room for the {"data": ...} around a base64 chunk


class FileRoutes:
    """Handlers of /files (but the content) and /uploads over one hub."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def list_files(self, request: Request) -> Response:
        """``GET /files``: every live file, newest first (cut to ``list_limit``)."""
        files = await hub_call(self.hub, self.hub.list_files)
        variants = self.hub.knobs.variants
        shape = shapes.file_shaper(variants)
        listed = [shape(info) for info in newest(files, variants)]
        return shapes.json_response({"data": listed}, 200, variants)

    async def get_file(self, request: Request) -> Response:
        """``GET /files/{file_id}``: one FileInfo (an output storage lags on answers 404)."""
        file_id = param(request, "file_id")
        self.hub.hold_output(file_id)
        info = await hub_call(self.hub, self.hub.get_file, file_id)
        return JSONResponse(shapes.file_body(info, self.hub.knobs.variants))

    async def upload_file(self, request: Request) -> Response:
        """Stream the "file" part to disk while hashing; 413 over the cap.

        Answers 201 (``upload_status``): the real code is unknown and clients accept 200
        or 201.
        """
        limit = self.hub.settings.max_upload_bytes
        declared = content_length(request)
        if declared is not None and declared > limit + _MULTIPART_OVERHEAD:
            await drain(request)
            raise PayloadTooLarge("file_too_large", too_large_message(limit))
        try:
            boundary = _boundary(request.headers.get("content-type"))
            if boundary is None:
                message = "Send the file as multipart/form-data in a part named 'file'."
                raise InvalidRequest("invalid_request", message)
            with self.hub.receive_file() as incoming:
                form = MultipartFile(boundary, incoming)
                await _feed(request, form)
                info = await hub_call(self.hub, form.commit)
        except HubError:
            # Read the rest so the client, busy sending, gets to see our answer.
            await drain(request)
            raise
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is left to read it
        variants = self.hub.knobs.variants
        return JSONResponse(shapes.file_body(info, variants), variants.upload_status)

    async def create_upload(self, request: Request) -> Response:
        """Create an upload session; 201 (``upload_status``; the real code is unknown)."""
        body = await json_body(request)
        filename = body.get("filename") if isinstance(body, dict) else None
        if not isinstance(filename, str) or not filename.strip():
            raise InvalidRequest("invalid_request", "'filename' is required and must be a string.")
        info = await run_in_threadpool(self.hub.create_upload_session, filename)
        variants = self.hub.knobs.variants
        return JSONResponse(shapes.file_body(info, variants), variants.upload_status)

    async def append_upload(self, request: Request) -> Response:
        """``PUT /uploads/{file_id}``: append a base64 chunk (413 past the chunk cap)."""
        chunk_limit = self.hub.settings.max_chunk_bytes
        raw = await read_body(request, 4 * math.ceil(chunk_limit / 3) + _JSON_SLACK)
        if raw is None:
            message = f"A chunk may hold at most {chunk_limit} bytes."
            raise PayloadTooLarge("chunk_too_large", message)
        file_id = param(request, "file_id")
        info = await run_in_threadpool(self._append, file_id, raw)
        return JSONResponse(shapes.file_body(info, self.hub.knobs.variants))

    def _append(self, file_id: str, raw: bytes) -> FileInfo:
        """Decode a chunk body and append it (in a worker thread: both can be slow)."""
        body = parse_json(raw)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, str):
            raise InvalidRequest("invalid_request", "'data' must be a base64 string.")
        try:
            # Line breaks are tolerated, as lenient decoders do; other junk is refused.
            decoded = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("invalid_request", "'data' is not valid base64.") from None
        return self.hub.append_upload(file_id, decoded)


class MultipartFile:
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


async def _feed(request: Request, form: MultipartFile) -> None:
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
