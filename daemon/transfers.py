"""Hub transfers in a child process: the daemon's HTTP work on a core of its own.

A Python process runs on one core at a time. About half of the daemon's CPU goes to
the four HTTP requests of each job (httpx, httpcore, h11), the other half to the state,
the checks and the publish. ``TransferProcess`` moves the ``HubClient`` into a child
(``python -m daemon.transfers``) and gives the worker a proxy with the same methods
(``client.Hub``), so that on two or more cores both halves run at once. It is off by
default (setting ``transfer_process``): the child is a second Python of about 45 MB.

The daemon keeps the state (SQLite's one writer), every decision, the hash of the input
taken before its upload, the OOXML check and the publish. The child only talks HTTP: it
opens an input itself by its path and refuses any version but the job's (the daemon then
compares the hash of the bytes sent with its own), and streams a download into the
temporary file the daemon names.

Messages are length-prefixed pickles on the child's stdin and stdout, between two ends
of this program and nothing else. The child ignores SIGINT and SIGTERM, since a stop
signal sent to the whole process group must let the daemon finish its transfers; it
exits when its input ends, and dies with the daemon (PR_SET_PDEATHSIG) when that is
killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import os
import pickle
import signal
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from daemon.client import (
    Engine,
    FileInfo,
    HubClient,
    InputUpload,
    RemoteJob,
    SentInput,
    current_job,
)
from daemon.errors import HubUnavailable
from daemon.logs import get_logger

log = get_logger(component="transfers")

_HEADER = struct.Struct(">I")
_PR_SET_PDEATHSIG = 1
STOP_TIMEOUT = 10.0  # seconds the child gets to close its connections on a clean stop

# What the child may be asked to run: the methods of ``client.Hub`` that talk to the hub.
CALLS = frozenset(
    {"engines", "list_files", "upload_input", "create_job", "get_job", "list_jobs", "download"}
)


@dataclass(frozen=True)
class ClientConfig:
    """How to build the ``HubClient`` (sent to the child on its input, never in argv)."""

    base_url: str
    api_key: str = field(repr=False)
    timeout: float
    deadline: float
    min_transfer_rate: float
    max_connections: int

    def client(self) -> HubClient:
        """The client these settings describe."""
        return HubClient(
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
    spares two task wakeups per message: the pipes carry four messages per job."""

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


class _Child(asyncio.SubprocessProtocol):
    """The daemon's end of the child's pipes."""

    def __init__(self, on_message: Callable[[Any], None]) -> None:
        self.frames = Frames(on_message)
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self.frames.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        # Called once the child has exited and both of its pipes have closed.
        if not self.gone.done():
            self.gone.set_result(None)


@dataclass
class _Running:
    """One child process and the means to talk to it."""

    transport: asyncio.SubprocessTransport
    protocol: _Child
    outbox: Outbox

    @property
    def alive(self) -> bool:
        return self.transport.get_returncode() is None and not self.protocol.gone.done()


class TransferProcess:
    """``client.Hub`` served by a child process, started on first use and again after
    it died (its calls in flight then fail as ``HubUnavailable``, to be retried)."""

    def __init__(self, config: ClientConfig) -> None:
        self._config = config
        self._child: _Running | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._closing = False

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._child.transport.get_pid() if self._child is not None else None

    async def start(self) -> None:
        """Start the child now rather than on the first call."""
        await self._running()

    async def _running(self) -> _Running:
        child = self._child
        if child is not None:
            return child
        async with self._lock:
            if self._closing:
                raise HubUnavailable("the daemon is stopping", code="stopping")
            if self._child is None:
                self._child = await self._spawn()
            return self._child

    async def _spawn(self) -> _Running:
        loop = asyncio.get_running_loop()
        command = [sys.executable, "-m", "daemon.transfers", str(os.getpid())]
        transport, protocol = await loop.subprocess_exec(
            lambda: _Child(self._settle),
            *command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
        )
        stdin = transport.get_pipe_transport(0)
        assert isinstance(stdin, asyncio.WriteTransport)  # piped, as asked above
        child = _Running(transport, protocol, Outbox(stdin))
        child.outbox.send(self._config)
        self._watcher = loop.create_task(self._watch(child))
        log.debug("transfer process started", pid=transport.get_pid())
        return child

    async def _watch(self, child: _Running) -> None:
        await child.protocol.gone
        code = child.transport.get_returncode()
        child.transport.close()
        self._child = None
        if not self._closing:
            log.warning(
                "the transfer process exited; a new one starts with the next request",
                exit_code=code,
                requests_lost=len(self._pending),
            )
        self._fail_pending(f"the transfer process exited (code {code})")

    def _settle(self, message: tuple[int, bool, Any]) -> None:
        call_id, ok, value = message
        future = self._pending.pop(call_id, None)
        if future is None or future.done():
            return  # cancelled meanwhile
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def _fail_pending(self, message: str) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(HubUnavailable(message, code="transfer_process"))

    async def _call(self, name: str, *args: Any) -> Any:
        child = await self._running()
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        child.outbox.send((call_id, current_job.get(), name, args))
        try:
            return await future
        except asyncio.CancelledError:
            if self._pending.pop(call_id, None) is not None and child.alive:
                child.outbox.send((call_id, None, None, None))  # cancel it there too
            raise

    def set_api_key(self, api_key: str) -> None:
        """Use another key from now on, in the running child and in any later one."""
        self._config = replace(self._config, api_key=api_key)
        child = self._child
        if child is not None and child.alive:
            child.outbox.send((0, None, "set_api_key", (api_key,)))

    async def aclose(self) -> None:
        """Let the child close its connections and exit; kill it if it does not."""
        async with self._lock:
            self._closing = True
            child = self._child
        if child is None:
            return
        child.outbox.close()
        try:
            await asyncio.wait_for(asyncio.shield(child.protocol.gone), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("the transfer process did not stop in time; killing it")
            with contextlib.suppress(ProcessLookupError):
                child.transport.kill()
        if self._watcher is not None:
            await self._watcher

    async def engines(self) -> list[Engine]:
        """``HubClient.engines`` in the child."""
        return cast(list[Engine], await self._call("engines"))

    async def list_files(self) -> list[FileInfo]:
        """``HubClient.list_files`` in the child."""
        return cast(list[FileInfo], await self._call("list_files"))

    async def upload_input(self, request: InputUpload) -> SentInput:
        """``HubClient.upload_input`` in the child."""
        return cast(SentInput, await self._call("upload_input", request))

    async def create_job(
        self, file_id: str, engine: str, language: str, output_format: str
    ) -> RemoteJob:
        """``HubClient.create_job`` in the child."""
        args = (file_id, engine, language, output_format)
        return cast(RemoteJob, await self._call("create_job", *args))

    async def get_job(self, job_id: str, wait: int = 0) -> RemoteJob:
        """``HubClient.get_job`` in the child."""
        return cast(RemoteJob, await self._call("get_job", job_id, wait))

    async def list_jobs(self) -> list[RemoteJob]:
        """``HubClient.list_jobs`` in the child."""
        return cast(list[RemoteJob], await self._call("list_jobs"))

    async def download(self, file_id: str, dest: Path) -> int:
        """``HubClient.download`` in the child."""
        return cast(int, await self._call("download", file_id, dest))


# -- the child -------------------------------------------------------------------------


class _Server:
    """The child's side: runs each call as a task and answers when it ends."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.client: HubClient | None = None
        self.tasks: dict[int, asyncio.Task[None]] = {}

    def handle(self, message: Any) -> None:
        """Act on one message from the daemon (the first one is the ``ClientConfig``)."""
        if self.client is None:
            self.client = cast(ClientConfig, message).client()
            return
        call_id, job, name, args = message
        if name is None:  # the daemon gave up on this call
            task = self.tasks.get(call_id)
            if task is not None:
                task.cancel()
        elif name == "set_api_key":
            self.client.set_api_key(args[0])
        elif name in CALLS:
            method = cast(Callable[..., Awaitable[Any]], getattr(self.client, name))
            task = asyncio.get_running_loop().create_task(self._answer(call_id, job, method, args))
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

    async def close(self) -> None:
        """Stop what runs, close the connections and send the last answers."""
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()
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
    """Entry point of the child: ``python -m daemon.transfers DAEMON_PID``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with(int(argv[0]))
    asyncio.run(serve())


if __name__ == "__main__":
    main(sys.argv[1:])
