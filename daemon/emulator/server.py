"""Run the LDX hub emulator as a real HTTP server, in the background or in the foreground.

``EmulatorServer`` serves a hub from a background thread, on a socket it binds itself (so
port 0 picks a free port), for tests and the demo; ``serve`` blocks, for the command line.
Both run uvicorn quietly: no access log unless asked, warnings and errors only.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from pathlib import Path
from types import TracebackType
from typing import cast

import uvicorn
from starlette.types import Scope
from uvicorn.config import LOGGING_CONFIG

from daemon.emulator.app import ServerHooks, create_app, hooks_of
from daemon.emulator.hub import Hub, HubSettings

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 15.0
# Long polls and stalled downloads end at once on stop; this only bounds the unexpected.
_GRACEFUL_SHUTDOWN = 5
_KEEP_ALIVE_SECONDS = 60


class _Server(uvicorn.Server):
    """uvicorn, plus what the app's hooks need: cutting a connection, reaching its socket,
    a stop flag; and a Date header that follows the hub's ``timestamp_skew``."""

    def __init__(self, config: uvicorn.Config, hooks: ServerHooks, hub: Hub) -> None:
        super().__init__(config)
        self._hooks = hooks
        self._hub = hub
        hooks.stopping = False
        hooks.drop = self.drop_connection
        hooks.transport = self.find_transport

    def find_transport(self, scope: Scope) -> asyncio.WriteTransport | None:
        """The socket transport of the connection carrying ``scope``'s request, or None."""
        client = scope.get("client")
        if client is None:
            return None
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if getattr(connection, "client", None) == tuple(client) and transport is not None:
                return cast(asyncio.WriteTransport, transport)
        return None

    def drop_connection(self, scope: Scope) -> bool:
        """Abort the connection that carries ``scope``'s request; False if not found."""
        transport = self.find_transport(scope)
        if transport is None:
            return False
        transport.abort()  # no FIN handshake, no response: as a network failure
        return True

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's once-a-tick chores; the Date header it refreshes gets the skew."""
        should_exit = await super().on_tick(counter)
        skew = self._hub.knobs.variants.timestamp_skew
        if counter % 10 == 0 and skew:  # uvicorn refreshes the date every ten ticks
            date = formatdate(time.time() + skew, usegmt=True).encode()
            headers = self.server_state.default_headers
            self.server_state.default_headers = [
                (name, date if name == b"date" else value) for name, value in headers
            ]
        return should_exit

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._hooks.stopping = True  # ends long polls and stalls instead of waiting them out
        await super().shutdown(sockets=sockets)


def _build(hub: Hub, access_log: bool) -> _Server:
    app = create_app(hub)
    config = uvicorn.Config(
        app,
        # Without a log config uvicorn leaves the process's logging setup alone.
        log_config=LOGGING_CONFIG if access_log else None,
        log_level="info" if access_log else "warning",
        access_log=access_log,
        lifespan="off",
        ws="none",
        server_header=False,
        proxy_headers=False,  # loopback only: no proxy to trust, one middleware less
        # Gateways keep idle connections for a minute or more. uvicorn's 5 s default equals
        # httpx's own keep-alive expiry, so the server could hang up on a connection just
        # as a client reused it ("Server disconnected without sending a response").
        timeout_keep_alive=_KEEP_ALIVE_SECONDS,
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN,
    )
    return _Server(config, hooks_of(app), hub)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted sockets only then, and
    # without it every response waits ~40 ms on Nagle's algorithm.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


def _url(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class EmulatorServer:
    """The emulator served from a background thread; a context manager.

    Give it a ``Hub``, or ``HubSettings`` (or nothing) to have it build one over a
    temporary directory that ``stop`` removes.
    """

    def __init__(
        self,
        hub: Hub | HubSettings | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        access_log: bool = False,
    ) -> None:
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        if isinstance(hub, Hub):
            self.hub = hub
        else:
            self._tempdir = tempfile.TemporaryDirectory(prefix="ldx-emulator-")
            self.hub = Hub(Path(self._tempdir.name), hub)
        self.host = host
        self._port = port
        self._access_log = access_log
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:43211`` (no trailing slash)."""
        if self._url is None:
            raise RuntimeError("the emulator is not running; call start() first")
        return self._url

    def start(self) -> EmulatorServer:
        """Bind, start serving in a background thread and wait until it answers."""
        if self._server is not None:
            raise RuntimeError("the emulator is already running")
        sock = _bind(self.host, self._port)
        server = _build(self.hub, self._access_log)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="ldx-hub-emulator", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                thread.join(_STOP_TIMEOUT)
                sock.close()
                raise RuntimeError("the emulator failed to start")
            time.sleep(0.005)
        self._server, self._thread, self._url = server, thread, _url(self.host, sock)
        return self

    def stop(self) -> None:
        """Shut down cleanly (idempotent) and remove a temporary data directory."""
        server, thread = self._server, self._thread
        self._server = self._thread = self._url = None
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(_STOP_TIMEOUT)
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def serve(
    hub: Hub,
    host: str = "127.0.0.1",
    port: int = 8787,
    *,
    on_ready: Callable[[str], None] | None = None,
    access_log: bool = False,
) -> None:
    """Serve ``hub`` in the foreground until interrupted (Ctrl-C stops it cleanly).

    ``on_ready`` gets the base URL once the port is bound, before serving starts.
    """
    sock = _bind(host, port)
    try:
        server = _build(hub, access_log)
        if on_ready is not None:
            on_ready(_url(host, sock))
        server.run(sockets=[sock])
    finally:
        sock.close()
