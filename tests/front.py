"""A hostile front for the emulator: a reverse proxy on loopback that passes requests on,
but can answer one route its own way (a 404 or a redirect where the key is rechecked, an
error body full of terminal escapes), as a misconfigured gateway or a man in the middle.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class Front:
    """A reverse proxy in front of ``upstream``; ``recheck`` (a status) answers GET /files,
    and ``answers`` maps "METHOD /path" to the (status, JSON body) it answers instead."""

    def __init__(self, upstream: str) -> None:
        self.upstream = httpx.Client(base_url=upstream, timeout=60)
        self.recheck: int | None = None
        self.rechecks = 0
        self.answers: dict[str, tuple[int, bytes]] = {}
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                front.relay(self)

            def do_POST(self) -> None:
                front.relay(self)

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def relay(self, request: BaseHTTPRequestHandler) -> None:
        body = _body(request)
        if request.command == "GET" and request.path == "/files" and self.recheck is not None:
            self.rechecks += 1
            self.answer(request, self.recheck, {"Location": "/login"}, b"<html>moved</html>")
            return
        own = self.answers.get(f"{request.command} {request.path}")
        if own is not None:
            self.answer(request, own[0], {"Content-Type": "application/json"}, own[1])
            return
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        reply = self.upstream.request(request.command, request.path, headers=headers, content=body)
        kept = {k: v for k, v in reply.headers.items() if k.lower() not in _HOP_HEADERS}
        kept.pop("content-encoding", None)  # httpx decoded the body already
        self.answer(request, reply.status_code, kept, reply.content)

    @staticmethod
    def answer(
        request: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes
    ) -> None:
        request.send_response(status)
        for name, value in headers.items():
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def __enter__(self) -> Front:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.upstream.close()


def _body(request: BaseHTTPRequestHandler) -> bytes:
    if request.headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while size := int(request.rfile.readline().split(b";")[0], 16):
            parts.append(request.rfile.read(size))
            request.rfile.readline()
        request.rfile.readline()
        return b"".join(parts)
    return request.rfile.read(int(request.headers.get("content-length") or 0))
