"""The lean connection pool (daemon.hub.transport) against real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from daemon.hub.transport import LeanPool, LeanTransport, lean_pool_supported

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def http_server(close_after_reply: bool, delay: float = 0.0) -> AsyncIterator[str]:
    """A bare HTTP/1.1 server on loopback; it may hang up after each reply, unannounced."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                await asyncio.sleep(delay)
                writer.write(RESPONSE)
                await writer.drain()
                if close_after_reply:
                    break
        except (asyncio.IncompleteReadError, ConnectionResetError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


def client(url: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, transport=LeanTransport(limits), timeout=10)


def test_the_lean_pool_is_used_with_httpcore_1_0() -> None:
    """The transport swaps in LeanPool where its internals are known."""
    transport = LeanTransport(httpx.Limits(max_connections=4))
    assert lean_pool_supported()
    assert isinstance(transport._pool, LeanPool)


@pytest.mark.anyio
async def test_many_concurrent_requests_share_a_bounded_pool() -> None:
    """200 requests, 50 at once, over at most 8 connections, all answered."""
    async with http_server(close_after_reply=False, delay=0.002) as url, client(url, 8) as http:
        pool = http._transport._pool  # type: ignore[attr-defined]
        most = 0

        async def one() -> int:
            nonlocal most
            response = await http.get("/")
            most = max(most, len(pool.connections))
            return response.status_code

        statuses = await asyncio.gather(*(one() for _ in range(200)))
        assert statuses == [200] * 200
        assert 1 <= most <= 8
        assert all(c.is_idle() for c in pool.connections)


@pytest.mark.anyio
async def test_a_connection_the_server_closed_is_replaced_not_reused() -> None:
    """The server hangs up after each reply: every next request gets a fresh connection."""
    async with http_server(close_after_reply=True) as url, client(url, 4) as http:
        for _ in range(20):
            response = await http.get("/")
            assert response.text == "ok"
            await asyncio.sleep(0.01)  # let the server's FIN arrive
        pool = http._transport._pool  # type: ignore[attr-defined]
        assert len(pool.connections) <= 1
