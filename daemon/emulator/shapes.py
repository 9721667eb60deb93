"""How the ``Variants`` knobs shape the emulator's answers.

Timestamps (style and skew), job and file bodies, the engine list, backend and gateway
error bodies, HTML gateway pages, and JSON answers padded or gzipped for the hostile-hub
tests. Pure functions from hub models and knobs to bodies and Starlette responses; the
HTTP layer decides when each applies. With default knobs every function gives exactly the
answer the emulator gave before the knobs existed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from datetime import datetime, timedelta
from http import HTTPStatus
from typing import Any

from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)

from daemon.emulator import bombs
from daemon.emulator.knobs import Variants
from daemon.emulator.models import FileInfo, JobInfo, Stamp, iso, new_id

BUILD_ID = str(uuid.uuid4())  # Zuplo puts its deployment's build id in every problem trace
PADDING_FIELD = "x_padding"

# Fields no client knows, of the kinds a gateway or a newer backend adds: a scalar, a
# nested object, a null and a list.
EXTRA_FIELDS: dict[str, Any] = {
    "x_gateway_region": "ap-northeast-1",
    "priority": 0,
    "metadata": {"source": "ldx-hub-emulator", "labels": ["variant"], "retries": None},
    "links": [{"rel": "self", "href": None}],
}


# -- timestamps ------------------------------------------------------------------------------


def _fraction_z(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _offset(moment: datetime) -> str:
    return moment.replace(microsecond=0).isoformat()  # aware UTC: "+00:00"


_STYLES: dict[str, Stamp] = {"z": iso, "fraction_z": _fraction_z, "offset": _offset}


def stamper(variants: Variants) -> Stamp:
    """The formatter of every timestamp in a body: its style, shifted by the skew."""
    style = _STYLES[variants.timestamp_style]
    if not variants.timestamp_skew:
        return style
    skew = timedelta(seconds=variants.timestamp_skew)
    return lambda moment: style(moment + skew)


# -- bodies ----------------------------------------------------------------------------------


def _progress(fraction: float, scale: str) -> float | int:
    if scale == "percent_int":
        return round(fraction * 100)
    if scale == "percent_float":
        return fraction * 100.0
    return fraction


def _status(status: str, variants: Variants) -> str:
    if status == "processing" and variants.extra_status:
        status = variants.extra_status
    return status.upper() if variants.status_case == "upper" else status


_JOB_SHAPE = (
    "progress_scale",
    "status_case",
    "extra_status",
    "error_as_string",
    "omit_fields",
    "extra_fields",
    "timestamp_style",
    "timestamp_skew",
)
_DEFAULT_JOB_SHAPE = tuple(getattr(Variants(), name) for name in _JOB_SHAPE)


def job_shaper(variants: Variants) -> Callable[[JobInfo], dict[str, Any]]:
    """The function that shapes job bodies under ``variants`` (plain ``to_json`` if none do).

    Made once per answer, so a list of thousands of jobs pays for the check once.
    """
    if tuple(getattr(variants, name) for name in _JOB_SHAPE) == _DEFAULT_JOB_SHAPE:
        return JobInfo.to_json
    stamp = stamper(variants)

    def shape(job: JobInfo) -> dict[str, Any]:
        body = job.to_json(stamp)
        body["progress"] = _progress(job.progress, variants.progress_scale)
        body["status"] = _status(job.status, variants)
        if variants.error_as_string and job.error is not None:
            body["error"] = f"{job.error.code}: {job.error.message}"
        for name in variants.omit_fields:
            body.pop(name, None)
        if variants.extra_fields:
            body.update(EXTRA_FIELDS)
        return body

    return shape


def job_body(job: JobInfo, variants: Variants) -> dict[str, Any]:
    """A job's JSON body as the variants shape it."""
    return job_shaper(variants)(job)


def file_shaper(variants: Variants) -> Callable[[FileInfo], dict[str, Any]]:
    """The function that shapes FileInfo bodies under ``variants``."""
    plain = variants.timestamp_style == "z" and not variants.timestamp_skew
    if plain and not variants.extra_fields:
        return FileInfo.to_json
    stamp = stamper(variants)

    def shape(info: FileInfo) -> dict[str, Any]:
        body = info.to_json(stamp)
        if variants.extra_fields:
            body.update(EXTRA_FIELDS)
        return body

    return shape


def file_body(info: FileInfo, variants: Variants) -> dict[str, Any]:
    """A FileInfo body as the variants shape it."""
    return file_shaper(variants)(info)


def engines_body(engines: list[dict[str, Any]], shape: str) -> dict[str, Any]:
    """The engine list in one of the shapes of ``Variants.engines_shape``."""
    if shape == "strings":
        return {"data": [engine["id"] for engine in engines]}
    if shape == "other_wrapper":
        return {"engines": engines}
    if shape == "empty":
        return {"data": []}
    dropped = {"no_languages": "supported_languages", "no_conversions": "supported_conversions"}
    if shape in dropped:
        return {"data": [{k: v for k, v in e.items() if k != dropped[shape]} for e in engines]}
    return {"data": engines}  # "objects", and "auth_required" once the key is checked


# -- errors ----------------------------------------------------------------------------------


def problem(
    status: int,
    detail: str,
    instance: str,
    moment: datetime,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A Zuplo-style RFC 7807 problem+json response."""
    timestamp = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    body = {
        "type": f"https://httpproblems.com/http-status/{status}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": instance,
        "trace": {"timestamp": timestamp, "requestId": str(uuid.uuid4()), "buildId": BUILD_ID},
    }
    return JSONResponse(body, status, headers, media_type="application/problem+json")


def html_page(status: int, detail: str, headers: Mapping[str, str] | None = None) -> Response:
    """The HTML page a gateway or proxy sends on its own errors (e.g. a 502)."""
    phrase = f"{status} {HTTPStatus(status).phrase}"
    page = (
        f"<html>\r\n<head><title>{phrase}</title></head>\r\n<body>\r\n"
        f"<center><h1>{phrase}</h1></center>\r\n<p>{detail}</p>\r\n"
        "<hr><center>gateway</center>\r\n</body>\r\n</html>\r\n"
    )
    return HTMLResponse(page, status, headers)


def backend_error(
    style: str,
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A backend error (validation, unknown id) in one of ``Variants.error_body``'s styles.

    "problem" is left to the caller, which knows the request for ``instance``.
    """
    if style == "nested":
        return JSONResponse({"error": {"code": code, "message": message}}, status, headers)
    if style == "message":
        return JSONResponse({"message": message}, status, headers)
    if style == "text":
        return PlainTextResponse(f"{code}: {message}", status, headers)
    if style == "html":
        return html_page(status, f"{code}: {message}", headers)
    body = {"code": code, "message": message, "request_id": new_id()}
    return JSONResponse(body, status, headers)


# -- padded and gzipped JSON -----------------------------------------------------------------


def json_response(body: Mapping[str, Any], status: int, variants: Variants) -> Response:
    """``body`` as JSON; padded with ``json_padding`` spaces and gzipped if asked.

    A padded or gzipped body is streamed with its exact Content-Length, never built whole:
    hundreds of megabytes of padding cost a few kilobytes of memory.
    """
    if not (variants.json_padding or variants.gzip_json):
        return JSONResponse(body, status)
    text = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    runs = [bombs.Run(text)]
    if variants.json_padding:
        comma = b"," if len(text) > 2 else b""
        opening = text[:-1] + comma + f'"{PADDING_FIELD}":"'.encode()
        runs = [bombs.Run(opening), bombs.Run(b" ", variants.json_padding), bombs.Run(b'"}')]
    headers = {"Content-Type": "application/json"}
    if variants.gzip_json:
        headers["Content-Encoding"] = "gzip"
        headers["Content-Length"] = str(bombs.gzip_size(runs))
        return _streamed(bombs.gzip_chunks(runs), status, headers)
    headers["Content-Length"] = str(sum(run.size for run in runs))
    return _streamed(bombs.plain_chunks(runs), status, headers)


def _streamed(chunks: Iterator[bytes], status: int, headers: Mapping[str, str]) -> Response:
    return StreamingResponse(aiterate(chunks), status, dict(headers))


async def aiterate(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """Serve a cheap synchronous generator from the event loop (no thread per chunk)."""
    for chunk in chunks:
        yield chunk
