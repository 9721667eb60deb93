"""What the emulator's route handlers share: path parameters, request bodies read within
limits, list cuts, and hub calls run on the event loop or in a worker thread.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar, cast

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from daemon.emulator.hub import Hub
from daemon.emulator.knobs import Variants
from daemon.emulator.refusals import InvalidRequest, PayloadTooLarge

# The daemon names the job a request belongs to in this header (any client may omit it).
TRACE_HEADER = "x-ldx-hotfolder-job"
# Files up to this size are read and parsed on the event loop: cheaper than thread hops.
INLINE_BYTES = 1024 * 1024
# Stands for a "/" decoded from "%2F" inside one path segment (a hostile id), so that the
# router still sees one segment; handlers turn it back (``param``).
SEGMENT_SLASH = "\x00"
_JSON_LIMIT = 1024 * 1024
T = TypeVar("T")

Handler = Callable[[Request], Awaitable[Response]]


def param(request: Request, name: str) -> str:
    """A path parameter, with a "/" it held (sent as "%2F") restored."""
    return cast(str, request.path_params[name]).replace(SEGMENT_SLASH, "/")


def request_path(request: Request) -> str:
    """The request's path as the client sent it (a "%2F" in a segment restored)."""
    return request.url.path.replace(SEGMENT_SLASH, "/")


def heavy(hub: Hub) -> bool:
    """Whether hub calls leave the event loop: padded outputs make rendering slow."""
    return hub.settings.output_size > INLINE_BYTES


async def hub_call(hub: Hub, fn: Callable[..., T], *args: Any) -> T:
    """Run a hub operation on the loop, or in a worker thread when it may be slow.

    Hub operations are short (a lock, some dict work, at most a small document
    rendered into the page cache), cheaper than the two thread switches of a worker
    thread; only padded outputs or big inputs are worth a thread.
    """
    if heavy(hub):
        return await run_in_threadpool(fn, *args)
    return fn(*args)


def newest(items: list[T], variants: Variants) -> list[T]:
    """A newest-first list cut to ``list_limit`` (0: all)."""
    return items[: variants.list_limit] if variants.list_limit else items


def content_length(request: Request) -> int | None:
    """The declared Content-Length, or None when absent or unreadable."""
    try:
        return int(request.headers["content-length"])
    except (KeyError, ValueError):
        return None


async def drain(request: Request) -> None:
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


async def read_body(request: Request, limit: int) -> bytes | None:
    """The whole body, or None (after draining it) if it is longer than ``limit``."""
    declared = content_length(request)
    if declared is not None and declared > limit:
        await drain(request)
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
        await drain(request)
        return None
    return b"".join(chunks)


async def json_body(request: Request) -> object:
    """The body parsed as JSON; PayloadTooLarge past a megabyte, InvalidRequest if not JSON."""
    raw = await read_body(request, _JSON_LIMIT)
    if raw is None:
        raise PayloadTooLarge("body_too_large", f"The body exceeds {_JSON_LIMIT} bytes.")
    return parse_json(raw)


def parse_json(raw: bytes) -> object:
    """``raw`` parsed as JSON; InvalidRequest if it is not."""
    try:
        return cast(object, json.loads(raw))
    except ValueError:
        raise InvalidRequest("invalid_request", "The body must be valid JSON.") from None


def json_object(body: object) -> dict[str, Any]:
    """``body`` if it is a JSON object; InvalidRequest if not."""
    if not isinstance(body, dict):
        raise InvalidRequest("invalid_request", "The body must be a JSON object.")
    return cast(dict[str, Any], body)
