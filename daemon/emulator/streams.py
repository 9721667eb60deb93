"""Response bodies the emulator streams itself: stalled, endless, trickling or overlong.

``ServerHooks`` is what a hosting server lends the app (cutting a connection, finding its
transport, a stop flag, a wake-up for long polls). ``FileStream`` sends a stored file and
can stall half way; ``HostileBody`` sends whatever an async source yields (endless bytes,
one byte every few seconds, more bytes than declared). Both end when the client hangs up
or the server stops. Without a server (``httpx.ASGITransport``) there is no socket for a
client to time out on, so a body that would never end raises the ``httpx.ReadTimeout``
such a client would see instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import cast

import anyio
import anyio.lowlevel
import httpx
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

POLL_STEP_SECONDS = 0.1  # how soon a stall or trickle notices the server stopping
DOWNLOAD_CHUNK = 256 * 1024


class ServerHooks:
    """What a hosting server lends the app: a way to cut a connection and a stop flag.

    Without a server (``httpx.ASGITransport``) ``drop`` and ``transport`` stay None and
    the app raises the error a client would see instead. Long polls sleep in ``doze``,
    which ends early on a ``nudge`` (the hub clock moved, from any thread) or when the
    server stops.
    """

    def __init__(self) -> None:
        self._stopping = False
        self.drop: Callable[[Scope], bool] | None = None
        # The socket transport of a request's connection, to write past HTTP framing.
        self.transport: Callable[[Scope], asyncio.WriteTransport | None] | None = None
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

    async def pause(self, seconds: float) -> None:
        """Sleep ``seconds`` of real time (clock advances do not shorten it), or until stop."""
        deadline = anyio.current_time() + seconds
        while not self._stopping:
            left = deadline - anyio.current_time()
            if left <= 0:
                return
            await anyio.sleep(min(left, POLL_STEP_SECONDS))

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


# Called with the time just before a stalled response's headers went out, the time it
# ended and how: "client gave up" (it disconnected) or "server stopped".
StallEnd = Callable[[float, float, str], None]


class FileStream(Response):
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
                group.start_soon(cancel_on_disconnect, receive, group.cancel_scope)
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
            chunk = await self._handle.read(min(DOWNLOAD_CHUNK, limit - sent))
            if not chunk:
                break
            sent += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` once the client has gone."""
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


# -- hostile bodies --------------------------------------------------------------------------


async def file_then_zeros(path: Path, extra: int | None) -> AsyncIterator[bytes]:
    """The file's bytes, then ``extra`` zero bytes (None: zeros for ever)."""
    async with await anyio.open_file(path, "rb") as handle:
        while chunk := await handle.read(DOWNLOAD_CHUNK):
            yield chunk
    zeros = bytes(DOWNLOAD_CHUNK)
    left = extra
    while left is None or left > 0:
        size = DOWNLOAD_CHUNK if left is None else min(left, DOWNLOAD_CHUNK)
        yield zeros[:size]
        if left is not None:
            left -= size


async def trickle(
    source: AsyncIterator[bytes], interval: float, hooks: ServerHooks
) -> AsyncIterator[bytes]:
    """``source`` one byte at a time, ``interval`` seconds of real time apart."""
    async with contextlib.aclosing(cast(AsyncGenerator[bytes, None], source)):
        async for chunk in source:
            for offset in range(len(chunk)):
                yield chunk[offset : offset + 1]
                await hooks.pause(interval)


class HostileBody(Response):
    """Streams ``source`` as the body; ``overrun`` bytes go past the HTTP framing.

    With ``endless`` the body is not expected to end (endless or trickling); then, in
    process, the first piece is sent and ``httpx.ReadTimeout`` raised. ``overrun`` bytes
    are written straight to the socket after a body whose Content-Length the source
    fills exactly (a server cannot send more through ASGI); in process, where nothing
    checks the length, they are simply sent as more body.
    """

    def __init__(
        self,
        source: AsyncIterator[bytes],
        *,
        status: int,
        headers: Mapping[str, str],
        hooks: ServerHooks,
        endless: bool = False,
        overrun: int = 0,
    ) -> None:
        self.status_code = status
        self.background = None
        self.init_headers(headers)
        self._source = source
        self._hooks = hooks
        self._endless = endless
        self._overrun = overrun

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The source holds the stored file open: close it however the body ends.
        async with contextlib.aclosing(cast(AsyncGenerator[bytes, None], self._source)):
            await self._respond(scope, receive, send)

    async def _respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code}
        await send({**start, "headers": self.raw_headers})
        if self._hooks.drop is None and self._endless:
            async for chunk in self._source:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                break
            raise httpx.ReadTimeout("The emulated download never ends.")
        ended = False  # stays so if the client hangs up first
        async with anyio.create_task_group() as group:
            group.start_soon(cancel_on_disconnect, receive, group.cancel_scope)
            ended = await self._send_source(send)
            group.cancel_scope.cancel()
        if not ended and self._hooks.stopping and self._hooks.drop is not None:
            self._hooks.drop(scope)
            await anyio.sleep(0)
        elif ended:
            await self._finish(scope, receive, send)

    async def _send_source(self, send: Send) -> bool:
        """Send the source's pieces; False if the server began to stop first."""
        async for chunk in self._source:
            if self._hooks.stopping:
                return False
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            # uvicorn's send returns at once to a gone client: without a checkpoint an
            # endless source would hold the loop and never see the disconnect.
            await anyio.lowlevel.checkpoint()
        return True

    async def _finish(self, scope: Scope, receive: Receive, send: Send) -> None:
        """End the body, or write the overrun past it and hang up."""
        find = self._hooks.transport
        transport = find(scope) if find is not None and self._overrun else None
        if transport is None:
            if self._overrun:  # in process: nothing checks the declared length
                body = bytes(self._overrun)
                await send({"type": "http.response.body", "body": body, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        transport.write(bytes(self._overrun))
        transport.close()  # after the buffer is flushed
        # Return only once the server has seen the connection go, or it would answer 500.
        while (await receive())["type"] != "http.disconnect":
            pass
