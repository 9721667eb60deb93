"""The admin routes under ``/_emulator``: the ledger, the knobs, the clock and the keys.

No key needed, never faulted, not counted in the ledger: tests and operators steer the
emulator through them (``app.py`` lists their bodies).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from daemon.emulator.handling import json_body, json_object
from daemon.emulator.hub import Hub
from daemon.emulator.knobs import Knobs
from daemon.emulator.models import iso
from daemon.emulator.refusals import InvalidRequest


class AdminRoutes:
    """Handlers of /_emulator over one hub."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def ledger(self, request: Request) -> Response:
        """``GET /_emulator/ledger``: a copy of the ledger."""
        return JSONResponse(self.hub.ledger())

    async def faults(self, request: Request) -> Response:
        """``GET``: every knob; ``POST``: change some (400 names a bad one)."""
        if request.method == "GET":
            return JSONResponse(self.hub.knobs.to_json())
        body = json_object(await json_body(request))
        try:
            knobs: Knobs = self.hub.update_knobs(body)
        except ValueError as exc:
            raise InvalidRequest("invalid_request", str(exc)) from None
        return JSONResponse(knobs.to_json())

    async def clock(self, request: Request) -> Response:
        """``POST /_emulator/clock``: move the hub clock forward."""
        advance = json_object(await json_body(request)).get("advance", 0)
        if not isinstance(advance, int | float) or isinstance(advance, bool) or advance < 0:
            raise InvalidRequest("invalid_request", "'advance' must be a number of seconds >= 0.")
        self.hub.clock.advance(advance)
        return JSONResponse({"now": iso(self.hub.clock.now()), "offset": self.hub.clock.offset})

    async def keys(self, request: Request) -> Response:
        """``POST /_emulator/keys``: replace the valid and/or revoked keys."""
        body = json_object(await json_body(request))
        lists: dict[str, list[str] | None] = {}
        for name in ("api_keys", "revoked"):
            value = body.get(name)
            if value is not None and not (
                isinstance(value, list) and all(isinstance(key, str) for key in value)
            ):
                raise InvalidRequest("invalid_request", f"'{name}' must be a list of strings.")
            lists[name] = value
        return JSONResponse(self.hub.set_keys(lists["api_keys"], lists["revoked"]))

    async def reset_ledger(self, request: Request) -> Response:
        """``POST /_emulator/reset-ledger``: forget the ledger; return it empty."""
        self.hub.reset_ledger()
        return JSONResponse(self.hub.ledger())
