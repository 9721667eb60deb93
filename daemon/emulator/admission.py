"""Admission: the gateway's policies in front of every API route, and the request log.

``Admission.api`` wraps a handler so that each request is counted, then meets latency,
outages, the key check, rate limits, a refused route and drawn faults, in the order the
gateway would (its policies run before the backend), and is logged in the ledger's
events with its answer. ``Admission.public`` wraps the one route that needs no key.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from daemon.emulator.gateway import Access, bearer_key
from daemon.emulator.handling import TRACE_HEADER, Handler, request_path
from daemon.emulator.hub import Hub
from daemon.emulator.middleware import DropConnection
from daemon.emulator.problems import Problems


class Admission:
    """Wraps route handlers in the gateway's policies for one hub."""

    def __init__(self, hub: Hub, problems: Problems) -> None:
        self.hub = hub
        self.problems = problems

    def public(self, method: str, path: str, handler: Handler) -> Route:
        """A route that needs no key: only outages and a refused route stop it."""

        async def endpoint(request: Request) -> Response:
            route = f"{request.method} {path}"
            self.hub.count_request(route)
            mode = self.hub.outage(public=True)
            if mode is not None:
                return self.problems.outage(request, mode)
            refused = self.hub.refusal(route)
            if refused is not None:
                return self.problems.refused(request, route, refused)
            return await handler(request)

        return Route(path, endpoint, methods=[method])

    def api(self, method: str, path: str, handler: Handler) -> Route:
        """An authenticated route: admitted first (``admit``), logged with its answer."""

        async def endpoint(request: Request) -> Response:
            route = f"{request.method} {path}"
            self.hub.count_request(route)
            started = time.monotonic()
            try:
                refusal = await self.admit(request, route)
                response = refusal if refusal is not None else await handler(request)
            except DropConnection:
                self._record_event(request, path, started, "drop")
                raise
            if response.status_code == 429:
                self.hub.count_refused(route)
            self._record_event(request, path, started, response.status_code, response)
            return response

        return Route(path, endpoint, methods=[method])

    async def admit(self, request: Request, route: str) -> Response | None:
        """Apply latency, outages, the key check, rate limits, a refused route and drawn
        faults, in the order the gateway would: its policies run before the backend."""
        latency = self.hub.faults.latency
        if latency > 0:
            await anyio.sleep(latency)
        mode = self.hub.outage()
        if mode is not None:  # the gateway is down: keys are not even looked at
            return self.problems.outage(request, mode)
        authorization = request.headers.get("authorization")
        access = self.hub.check_key(authorization)
        if access is not Access.GRANTED:
            return self.problems.unauthorized(request, access)
        limited = self._limit(request, route, bearer_key(authorization) or "")
        if limited is not None:
            return limited
        refused = self.hub.refusal(route)
        if refused is not None:
            return self.problems.refused(request, route, refused)
        return self._drawn_fault(request)

    def _limit(self, request: Request, route: str, key: str) -> Response | None:
        """The per-key minute limits: /files alone, then every route."""
        wait = self.hub.throttle(key) if route.split(" ", 1)[1].startswith("/files") else None
        if wait is None:
            wait = self.hub.limit_requests(key)
        return None if wait is None else self.problems.rate_limited(request, wait)

    def _drawn_fault(self, request: Request) -> Response | None:
        fault = self.hub.draw_fault(request.headers.get(TRACE_HEADER))
        if fault is None:
            return None
        if fault.kind == "drop":
            raise DropConnection
        if fault.kind == "rate_limit":
            return self.problems.rate_limited(request, fault.retry_after)
        detail = "Emulated transient failure of the gateway or backend; retry later."
        return self.problems.problem(request, fault.status, detail)

    def _record_event(
        self,
        request: Request,
        route: str,
        started: float,
        status: int | str,
        response: Response | None = None,
    ) -> None:
        """Log one request for tests: when, what, for which client job, and the answer."""
        retry_after = response.headers.get("retry-after") if response is not None else None
        self.hub.record_event(
            {
                "at": started,
                # The answer exists from here on: a client sees it no sooner.
                "answered": time.monotonic(),
                "route": f"{request.method} {route}",
                "path": request_path(request),
                "trace": request.headers.get(TRACE_HEADER),
                "status": status,
                "retry_after": _retry_seconds(retry_after),
            }
        )


def _retry_seconds(header: str | None) -> float | None:
    """Seconds a Retry-After header asks for (a number or an HTTP date), or None."""
    if not header:
        return None
    try:
        return float(header)
    except ValueError:
        pass
    try:
        return (parsedate_to_datetime(header) - datetime.now(UTC)).total_seconds()
    except (TypeError, ValueError):
        return None
