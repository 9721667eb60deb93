"""The emulator's ASGI middleware: hostile ids kept in one path segment, and cut
connections.

A route raises ``DropConnection`` to have its connection cut without any response; under
a server the hooks cut the socket, in process the client sees the error it would get.
"""

from __future__ import annotations

from urllib.parse import unquote

import anyio
import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

from daemon.emulator.handling import SEGMENT_SLASH
from daemon.emulator.streams import ServerHooks


class DropConnection(Exception):
    """Raised by a route to have its connection cut without any response."""


class GatewayMiddleware:
    """Keeps a "%2F" inside a path segment in its segment, and cuts connections.

    uvicorn decodes the whole path, so an id holding "/" (``hostile_ids``), sent
    percent-encoded as it must be, would split into several segments and match no route.
    ``DropConnection`` raised by a route becomes a connection cut.
    """

    def __init__(self, app: ASGIApp, hooks: ServerHooks) -> None:
        self.app = app
        self.hooks = hooks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path")
        if scope["type"] == "http" and raw and b"%2f" in raw.lower():
            segments = raw.decode("ascii", "replace").split("/")
            path = "/".join(unquote(part).replace("/", SEGMENT_SLASH) for part in segments)
            scope = {**scope, "path": path}
        try:
            await self.app(scope, receive, send)
        except DropConnection:
            if self.hooks.drop is not None and self.hooks.drop(scope):
                await anyio.sleep(0)  # let the server notice the loss before we return
                return
            # In process there is no socket to cut: raise what the client would see.
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a response."
            ) from None
