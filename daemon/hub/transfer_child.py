"""The transfer process: the daemon's HTTP work in a child of its own (``daemon.hub.transfers``).

The child answers the daemon's calls with ``daemon.hub.api.HubApi``: it opens an input
by its path and refuses any version but the job's, streams a download into the
temporary file the daemon names, and sends back the hub's JSON bodies as they came (the
daemon reads them into models). It imports asyncio, httpx and that module, not pydantic,
SQLAlchemy or the logging setup, so it stays a small process (about 25 MB).

Messages are length-prefixed pickles on the child's stdin and stdout, between two ends
of this program and nothing else: ``(call id, job id, name, args)`` down, and up
``(call id, True, result)``, ``(call id, False, exception)`` or, for each step of a
call that yields progress, ``(call id, None, item)`` before its ``(call id, True, None)``.
The child ignores SIGINT and SIGTERM, since a stop signal sent to the whole process
group must let the daemon finish its transfers; it exits when its input ends, and dies
with the daemon (PR_SET_PDEATHSIG) when that is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import pickle
import signal
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from daemon.hub.api import HubApi, current_job

_HEADER = struct.Struct(">I")
_PR_SET_PDEATHSIG = 1

# What the child may be asked to run: the calls of ``daemon.hub.api.Calls`` that talk to
# the hub, answered once, and those that yield progress, answered as they go.
CALLS = frozenset(
    {"engines", "list_files", "upload_input", "create_job", "get_job", "list_jobs", "download"}
)
STREAMS = frozenset({"run_job", "upload_and_run"})


@dataclass(frozen=True)
class ClientConfig:
    """How to build the ``HubApi`` (sent to the child on its input, never in argv)."""

    base_url: str
    api_key: str = field(repr=False)
    timeout: float
    deadline: float
    min_transfer_rate: float
    max_connections: int

    def api(self) -> HubApi:
        """The hub calls these settings describe."""
        return HubApi(
            self.base_url,
            self.api_key,
            timeout=self.timeout,
            deadline=self.deadline,
            min_transfer_rate=self.min_transfer_rate,
            max_connections=self.max_connections,
        )


def frame(message: object) -> bytes:
    """One message as it goes down a pipe."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


class Frames:
    """Cuts a byte stream into messages, calling ``on_message`` for each whole one.

    Parsing in the protocol's callback, rather than awaiting a header and then a body,
    spares two task wakeups per message: a job sends one call and gets about six back."""

    def __init__(self, on_message: Callable[[Any], None]) -> None:
        self._buffer = bytearray()
        self._on_message = on_message

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the stream."""
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= _HEADER.size:
            (length,) = _HEADER.unpack_from(buffer, start)
            end = start + _HEADER.size + length
            if len(buffer) < end:
                break
            message = pickle.loads(buffer[start + _HEADER.size : end])  # noqa: S301 (own child)
            start = end
            self._on_message(message)
        del buffer[:start]


class Outbox:
    """Sends messages down a pipe, all of one event-loop turn in a single write."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport
        self._chunks: list[bytes] = []

    def send(self, message: object) -> None:
        """Queue one message; it leaves at the end of this loop turn."""
        if not self._chunks:
            asyncio.get_running_loop().call_soon(self.flush)
        self._chunks.append(frame(message))

    def flush(self) -> None:
        """Write what is queued now."""
        if not self._chunks:
            return
        data = b"".join(self._chunks)
        self._chunks.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        """Write what is queued, then end the stream (the other end sees EOF)."""
        self.flush()
        self._transport.close()


def portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling as it is (the daemon's exceptions and OSError
    do), else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(exc))  # noqa: S301 (made here)
    except Exception:
        return RuntimeError(f"in the transfer process: {type(exc).__name__}: {exc}")
    return exc


class _Server:
    """The child's side: runs each call as a task and answers when it ends."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.api: HubApi | None = None
        self.tasks: dict[int, asyncio.Task[None]] = {}

    def handle(self, message: Any) -> None:
        """Act on one message from the daemon (the first one is the ``ClientConfig``)."""
        if self.api is None:
            self.api = cast(ClientConfig, message).api()
            return
        call_id, job, name, args = message
        if name is None:  # the daemon gave up on this call
            task = self.tasks.get(call_id)
            if task is not None:
                task.cancel()
        elif name == "set_api_key":
            self.api.set_api_key(args[0])
        elif name in CALLS or name in STREAMS:
            answer = self._answer if name in CALLS else self._stream
            work = answer(call_id, job, getattr(self.api, name), args)
            task = asyncio.get_running_loop().create_task(work)
            self.tasks[call_id] = task
            task.add_done_callback(lambda _: self.tasks.pop(call_id, None))
        else:
            self.outbox.send((call_id, False, RuntimeError(f"unknown transfer call {name!r}")))

    async def _answer(
        self, call_id: int, job: int | None, method: Callable[..., Awaitable[Any]], args: Any
    ) -> None:
        current_job.set(job)  # this task's requests carry the daemon's job id
        try:
            result = await method(*args)
        except Exception as exc:
            self.outbox.send((call_id, False, portable(exc)))
        else:
            self.outbox.send((call_id, True, result))

    async def _stream(
        self, call_id: int, job: int | None, method: Callable[..., AsyncIterator[Any]], args: Any
    ) -> None:
        current_job.set(job)
        try:
            async for item in method(*args):
                self.outbox.send((call_id, None, item))
        except Exception as exc:
            self.outbox.send((call_id, False, portable(exc)))
        else:
            self.outbox.send((call_id, True, None))

    async def close(self) -> None:
        """Stop what runs, close the connections and send the last answers."""
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        if self.api is not None:
            await self.api.aclose()
        self.outbox.close()


class _Input(asyncio.Protocol):
    """The child's end of its input pipe."""

    def __init__(self, on_message: Callable[[Any], None]) -> None:
        self.frames = Frames(on_message)
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.frames.feed(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)


async def serve() -> None:
    """Answer the daemon's calls until it closes the pipe."""
    loop = asyncio.get_running_loop()
    # Messages use the original stdout; anything printed goes to stderr instead.
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    transport, _ = await loop.connect_write_pipe(asyncio.Protocol, out)
    server = _Server(Outbox(transport))
    _, reader = await loop.connect_read_pipe(
        lambda: _Input(server.handle), os.fdopen(0, "rb", buffering=0)
    )
    try:
        await reader.ended
    finally:
        await server.close()


def _die_with(parent: int) -> None:
    # Killed when the daemon dies, even by SIGKILL; the check after closes the window in
    # which it died before the request was made.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(0)


def main(argv: list[str]) -> None:
    """Entry point of the child: ``python -m daemon.hub.transfer_child DAEMON_PID``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with(int(argv[0]))
    asyncio.run(serve())


if __name__ == "__main__":
    main(sys.argv[1:])
