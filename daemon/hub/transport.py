"""HTTP transport: httpx over an httpcore connection pool whose bookkeeping stays linear.

httpcore 1.0's pool re-examines every pooled connection each time a request starts or
ends: it lists all connections once per idle one (quadratic) and polls the socket of
every idle connection to see whether the server closed it. With the few dozen
keep-alive connections the daemon holds at full concurrency, that bookkeeping cost
about as much CPU as the requests themselves (encode/httpcore#1035, still open).

``LeanPool`` keeps httpcore's connections and protocol code and replaces only that
pass: one walk over the connections; an idle connection handed to a waiting request is
reserved for it (never handed out twice); an idle socket is polled when it is about to
be reused, and all of them at most once a second. It relies on httpcore 1.0 internals,
so other versions get httpcore's own pool (``lean_pool_supported``).
"""

from __future__ import annotations

import time
from typing import Any

import httpcore
import httpx
from httpcore import AsyncConnectionInterface

SWEEP_SECONDS = 1.0  # how often every idle socket is polled for a server-side close


def lean_pool_supported() -> bool:
    """Whether the installed httpcore has the internals ``LeanPool`` builds on."""
    return httpcore.__version__.startswith("1.0.")


class LeanPool(httpcore.AsyncConnectionPool):
    """httpcore's pool with a linear, reserving assignment pass."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._next_sweep = 0.0

    def _assign_requests_to_connections(self) -> list[AsyncConnectionInterface]:
        """Drop closed connections, hand free ones to waiting requests; return those to
        close (httpcore closes them outside its lock)."""
        closing: list[AsyncConnectionInterface] = []
        free = self._free_connections(closing)
        for pool_request in self._requests:
            if not pool_request.is_queued():
                continue
            connection = self._connection_for(pool_request.request.url.origin, free, closing)
            if connection is None:
                break  # the pool is full: the rest wait for a release
            pool_request.assign_to_connection(connection)
        return closing

    def _free_connections(
        self, closing: list[AsyncConnectionInterface]
    ) -> list[AsyncConnectionInterface]:
        """Keep the live connections; return the idle ones no request holds, oldest first."""
        reserved = {id(r.connection) for r in self._requests if r.connection is not None}
        now = time.monotonic()
        sweep = now >= self._next_sweep
        if sweep:
            self._next_sweep = now + SWEEP_SECONDS
        live, free = [], []
        for connection in self._connections:
            if connection.is_closed():
                continue
            if id(connection) not in reserved and connection.is_idle():
                if sweep and connection.has_expired():
                    closing.append(connection)
                    continue
                free.append(connection)
            live.append(connection)
        while len(free) > self._max_keepalive_connections:
            surplus = free.pop(0)
            live.remove(surplus)
            closing.append(surplus)
        self._connections = live
        return free

    def _connection_for(
        self,
        origin: httpcore.Origin,
        free: list[AsyncConnectionInterface],
        closing: list[AsyncConnectionInterface],
    ) -> AsyncConnectionInterface | None:
        """A free connection to ``origin`` (its socket checked), a new one, or None."""
        for connection in [c for c in free if c.can_handle_request(origin)]:
            free.remove(connection)
            if connection.has_expired():  # the server closed it meanwhile
                self._connections.remove(connection)
                closing.append(connection)
            elif connection.is_available():
                return connection
        if len(self._connections) >= self._max_connections:
            if not free:
                return None
            victim = free.pop(0)  # an idle connection to another origin makes room
            self._connections.remove(victim)
            closing.append(victim)
        connection = self.create_connection(origin)
        self._connections.append(connection)
        return connection


class LeanTransport(httpx.AsyncHTTPTransport):
    """``httpx.AsyncHTTPTransport`` over a ``LeanPool`` (or httpcore's, when unsupported)."""

    def __init__(self, limits: httpx.Limits) -> None:
        super().__init__(limits=limits)
        if lean_pool_supported():
            self._pool = LeanPool(
                ssl_context=httpx.create_ssl_context(),
                max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_keepalive_connections,
                keepalive_expiry=limits.keepalive_expiry,
            )
