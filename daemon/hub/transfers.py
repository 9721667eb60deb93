"""Hub transfers in a child process: the daemon's HTTP work on a core of its own.

A Python process runs on one core at a time. About half of the daemon's CPU goes to
the four HTTP requests of each job (httpx, httpcore, h11), the other half to the state,
the checks and the publish. ``TransferProcess`` makes the hub's calls
(``daemon.hub.api.Calls``) in a child process (``daemon.hub.transfer_child``), and the
``HubClient`` over it reads the answers into models here, so that on two or more cores
both halves run at once (setting ``transfer_process``: on by default with 2+ cores).

The daemon keeps the state (SQLite's one writer), every decision, the hash of the input
taken before its upload, the OOXML check and the publish. The child only talks HTTP: it
opens an input itself by its path and refuses any version but the job's (the daemon then
compares the hash of the bytes sent with its own), and streams a download into the
temporary file the daemon names. A call that yields its steps (``run_job``,
``upload_and_run``) passes each one on as it arrives, each within its answer limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from daemon.errors import HubUnavailable
from daemon.hub.api import InputUpload, JobRun, Progress, Sent, current_job, transfer_deadline
from daemon.hub.transfer_child import ClientConfig, Frames, Outbox
from daemon.logs import get_logger

log = get_logger(component="transfers")

STOP_TIMEOUT = 10.0  # seconds the child gets to close its connections on a clean stop
STUCK_FACTOR = 2.0  # a call unanswered for this many times its own deadline: a stuck child


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


def answer_limit(
    config: ClientConfig, name: str, args: tuple[Any, ...], after: str | None = None
) -> float | None:
    """How long the daemon waits for the child to answer call ``name`` (pure): twice the
    deadline the child itself applies, so only a stuck child ever reaches it. None for a
    download, whose deadline the child extends by the size the hub announces; a stuck
    child is then caught by the next other call. For a call that yields its steps, the
    wait for the step that follows step ``after`` (None: the first one): an upload's for
    the upload, a poll's for each step up to the download, then none."""
    if name == "download" or after == "download":
        return None
    if name == "upload_and_run" and after is None:
        return answer_limit(config, "upload_input", args[:1])
    if name in ("run_job", "upload_and_run"):
        return answer_limit(config, "get_job", ("", cast(JobRun, args[-1]).wait))
    own = config.deadline
    if name == "get_job" and len(args) > 1:
        own += float(args[1])  # the long poll's wait
    elif name == "upload_input" and args:
        size = cast(InputUpload, args[0]).signature.size
        own = transfer_deadline(config.deadline, size, config.min_transfer_rate)
    return STUCK_FACTOR * own


class TransferProcess:
    """``hubapi.Calls`` made by a child process, started on first use and again after
    it died (its calls in flight then fail as ``HubUnavailable``, to be retried)."""

    def __init__(self, config: ClientConfig) -> None:
        self._config = config
        self._child: _Running | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._streams: dict[int, asyncio.Queue[tuple[bool | None, Any]]] = {}
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
        command = [sys.executable, "-m", "daemon.hub.transfer_child", str(os.getpid())]
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

    def _settle(self, message: tuple[int, bool | None, Any]) -> None:
        call_id, ok, value = message
        stream = self._streams.get(call_id)
        if stream is not None:
            stream.put_nowait((ok, value))
            return
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
        for stream in self._streams.values():
            stream.put_nowait((False, HubUnavailable(message, code="transfer_process")))

    async def _call(self, name: str, *args: Any) -> Any:
        child = await self._running()
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        child.outbox.send((call_id, current_job.get(), name, args))
        limit = answer_limit(self._config, name, args)
        try:
            async with asyncio.timeout(limit):
                return await future
        except TimeoutError:
            self._pending.pop(call_id, None)
            raise self._stuck(child, name, limit) from None
        except asyncio.CancelledError:
            if self._pending.pop(call_id, None) is not None and child.alive:
                child.outbox.send((call_id, None, None, None))  # cancel it there too
            raise

    def _stuck(self, child: _Running, name: str, limit: float | None) -> HubUnavailable:
        """Kill a child that let a call outlive its own deadline (stopped, or blocked in a
        system call): its other calls fail too, and the next call starts a new one."""
        log.error("the transfer process stopped answering; replacing it", call=name, limit=limit)
        with contextlib.suppress(ProcessLookupError):
            child.transport.kill()
        message = f"the transfer process did not answer {name} within {limit} s"
        return HubUnavailable(message, code="transfer_process")

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

    async def engines(self) -> Any:
        """``HubApi.engines`` in the child."""
        return await self._call("engines")

    async def list_files(self) -> Any:
        """``HubApi.list_files`` in the child."""
        return await self._call("list_files")

    async def upload_input(self, request: InputUpload) -> Sent:
        """``HubApi.upload_input`` in the child."""
        sent: Sent = await self._call("upload_input", request)
        return sent

    async def create_job(self, file_id: str, engine: str, language: str, output_format: str) -> Any:
        """``HubApi.create_job`` in the child."""
        return await self._call("create_job", file_id, engine, language, output_format)

    async def get_job(self, job_id: str, wait: int = 0) -> Any:
        """``HubApi.get_job`` in the child."""
        return await self._call("get_job", job_id, wait)

    async def list_jobs(self) -> Any:
        """``HubApi.list_jobs`` in the child."""
        return await self._call("list_jobs")

    async def download(self, file_id: str, dest: Path) -> int:
        """``HubApi.download`` in the child."""
        written: int = await self._call("download", file_id, dest)
        return written

    def run_job(self, file_id: str, run: JobRun) -> AsyncGenerator[Progress, None]:
        """``HubApi.run_job`` in the child, its steps passed on as they arrive."""
        return self._stream("run_job", file_id, run)

    def upload_and_run(
        self, request: InputUpload, sha256: str, run: JobRun
    ) -> AsyncGenerator[Progress, None]:
        """``HubApi.upload_and_run`` in the child, its steps passed on as they arrive."""
        return self._stream("upload_and_run", request, sha256, run)

    async def _stream(self, name: str, *args: Any) -> AsyncGenerator[Progress, None]:
        """A call answered step by step, each step within its ``answer_limit``: a stuck
        child is killed and the call fails."""
        child = await self._running()
        call_id = next(self._ids)
        stream: asyncio.Queue[tuple[bool | None, Any]] = asyncio.Queue()
        self._streams[call_id] = stream
        child.outbox.send((call_id, current_job.get(), name, args))
        limit = answer_limit(self._config, name, args)
        ended = False
        try:
            while True:
                try:
                    async with asyncio.timeout(limit):
                        ok, value = await stream.get()
                except TimeoutError:
                    ended = True
                    raise self._stuck(child, name, limit) from None
                if ok is None:
                    progress = cast(Progress, value)
                    limit = answer_limit(self._config, name, args, after=progress[0])
                    yield progress
                    continue
                ended = True
                if not ok:
                    raise value
                return
        finally:
            self._streams.pop(call_id, None)
            if not ended and child.alive:
                child.outbox.send((call_id, None, None, None))  # stopped early: cancel it there
