"""The emulator's error answers, in the style of whoever would answer in the real stack.

The gateway (auth, rate limits, injected faults, outages, refused routes, size limits,
unknown routes) sends Zuplo's problem+json; the backend (validation, unknown ids) sends
``{"code", "message", "request_id"}`` unless the ``error_body`` knob says otherwise.
``Problems`` builds both, and maps hub refusals and routing errors to them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import cast

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from daemon.emulator import shapes
from daemon.emulator.gateway import Access
from daemon.emulator.handling import request_path
from daemon.emulator.hub import Hub
from daemon.emulator.middleware import DropConnection
from daemon.emulator.refusals import Expired, HubError, MissingInput, NotFound, PayloadTooLarge


class Problems:
    """Error answers of one hub: they read its knobs (echo, skew, body style, statuses)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    # -- the gateway's problem+json -----------------------------------------------------

    def problem(
        self, request: Request, status: int, detail: str, headers: Mapping[str, str] | None = None
    ) -> Response:
        """A Zuplo-style RFC 7807 problem+json response."""
        moment = self.hub.clock.now() + timedelta(seconds=self.hub.knobs.variants.timestamp_skew)
        detail = self.echo(request, detail)
        return shapes.problem(status, detail, request_path(request), moment, headers)

    def echo(self, request: Request, text: str) -> str:
        """``text``, plus the request's Authorization header when ``echo_auth`` is on."""
        authorization = request.headers.get("authorization")
        if authorization is None or not self.hub.knobs.variants.echo_auth:
            return text
        return f"{text} (Authorization: {authorization})"

    def outage(self, request: Request, mode: str) -> Response:
        """An outage: the connection cut, a 503 problem, or a proxy's 502 HTML page."""
        if mode == "drop":
            raise DropConnection
        if mode == "html502":
            detail = "The upstream server is unreachable."
            return shapes.html_page(502, self.echo(request, detail))
        return self.problem(request, 503, "The service is temporarily unavailable.")

    def refused(self, request: Request, route: str, status: int) -> Response:
        """A route the key's plan does not cover (402 or 403, ``refuse_route``)."""
        # A plan or credit check is a gateway policy (Zuplo monetization): problem+json.
        # The n8n README's "Credit limit exceeded" is the closest known wording.
        if status == 402:
            detail = "Credit limit exceeded: the monthly credit allowance of this key is used up."
        else:
            detail = f"Your plan does not include {route}."
        return self.problem(request, status, detail)

    def unauthorized(self, request: Request, access: Access) -> Response:
        """401 for a missing, malformed or unknown key; 403 for a revoked one."""
        if access is Access.REVOKED:
            return self.problem(request, 403, "The API key has been revoked.")
        detail = {
            Access.MISSING: "No Authorization header was sent; use 'Bearer <API key>'.",
            Access.MALFORMED: "The Authorization header must be 'Bearer <API key>'.",
        }.get(access, "The API key is not valid.")
        return self.problem(request, 401, detail)

    def rate_limited(self, request: Request, seconds: float) -> Response:
        """429 problem+json; Retry-After in seconds, as an HTTP date or absent.

        An HTTP date is the wall clock plus ``timestamp_skew`` (as a gateway's Date
        header), rounded up so that a client that waits until then waits long enough.
        """
        shown = str(int(seconds)) if seconds == int(seconds) else f"{seconds:g}"
        detail = f"Rate limit exceeded; retry after {shown} seconds."
        knobs = self.hub.knobs
        style = knobs.faults.retry_after_format
        headers: dict[str, str] = {}
        if style == "seconds":
            headers["Retry-After"] = shown
        elif style == "http_date":
            skew = knobs.variants.timestamp_skew
            when = datetime.fromtimestamp(math.ceil(time.time() + skew + seconds), UTC)
            headers["Retry-After"] = format_datetime(when, usegmt=True)
        return self.problem(request, 429, detail, headers)

    # -- the backend's errors -----------------------------------------------------------

    def backend_error(
        self,
        request: Request,
        status: int,
        error: HubError,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """The backend's own error style (JobError's), or the one ``error_body`` picks."""
        style = self.hub.knobs.variants.error_body
        message = self.echo(request, error.message)
        if style == "problem":
            return self.problem(request, status, error.message, headers)
        return shapes.backend_error(style, status, error.code, message, headers)

    def not_found_status(self, error: HubError) -> int:
        """404 for an unknown id, ``expired_status`` for an expired one, else 400."""
        if isinstance(error, Expired):
            return self.hub.knobs.storage.expired_status
        return 404 if isinstance(error, NotFound) else 400

    # -- exception handlers -------------------------------------------------------------

    async def on_hub_error(self, request: Request, exc: Exception) -> Response:
        """Map a hub refusal to its HTTP answer."""
        error = cast(HubError, exc)
        if isinstance(error, PayloadTooLarge):  # the gateway enforces body sizes
            return self.problem(request, 413, error.message)
        if isinstance(error, MissingInput):
            variants = self.hub.knobs.variants
            error = MissingInput(variants.missing_input_code, error.message)
            return self.backend_error(request, variants.missing_input_status, error)
        return self.backend_error(request, self.not_found_status(error), error)

    async def on_http_error(self, request: Request, exc: Exception) -> Response:
        """Routing errors (unknown route, wrong method) as the gateway's problem+json."""
        error = cast(HTTPException, exc)
        detail = error.detail
        if error.status_code == 404:
            detail = f"No route matches {request.method} {request_path(request)}."
        return self.problem(request, error.status_code, detail, error.headers)
