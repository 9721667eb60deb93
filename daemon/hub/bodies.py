"""The hub's answer bodies, decoded in pieces of bounded size whatever they inflate to.

httpx inflates each piece read from the socket whole: 64 KiB of gzip may become 64 MB,
and a few such answers at once a few hundred MB before any cap counted on decoded bytes
can act. Here a body is inflated at most ``piece`` bytes at a time, so that cap bounds
the memory too. The daemon asks for gzip and deflate only (``ACCEPT_ENCODING``); a body
in any other encoding, or one that does not inflate, is a bad answer.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Iterator

import httpx

from daemon.errors import HubUnavailable

PIECE = 256 * 1024
ACCEPT_ENCODING = "gzip, deflate"
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def encodings(response: httpx.Response) -> list[str]:
    """The content codings applied to ``response``'s body, in order (identity left out)."""
    value = response.headers.get("content-encoding", "")
    named = (coding.strip().lower() for coding in value.split(","))
    return [coding for coding in named if coding not in ("", "identity")]


class Inflater:
    """One gzip or deflate stream, inflated at most ``piece`` bytes per step."""

    def __init__(self, coding: str, route: str) -> None:
        self.coding = coding
        self.route = route
        self._inflater = zlib.decompressobj(_WBITS[coding])
        self._started = False

    def feed(self, data: bytes, piece: int = PIECE) -> Iterator[bytes]:
        """The bytes ``data`` inflates to, in pieces of at most ``piece`` bytes."""
        while data:
            try:
                out = self._inflater.decompress(data, piece)
            except zlib.error:
                if self.coding == "deflate" and not self._started:
                    # Raw deflate without zlib's header: servers send both, httpx reads both.
                    self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                    self._started = True
                    continue
                raise self._bad() from None
            self._started = True
            if out:
                yield out
            data = self._inflater.unconsumed_tail

    def finish(self) -> bytes:
        """What the stream still holds at its end (at most zlib's window)."""
        try:
            return self._inflater.flush()
        except zlib.error:
            raise self._bad() from None

    def _bad(self) -> HubUnavailable:
        return HubUnavailable(
            f"{self.route}: the hub's {self.coding} answer does not inflate", code="bad_response"
        )


async def decoded(response: httpx.Response, route: str, piece: int = PIECE) -> AsyncIterator[bytes]:
    """``response``'s body as sent before its encoding, in pieces of at most ``piece``."""
    codings = encodings(response)
    if not codings:
        async for raw in response.aiter_raw(piece):
            yield raw
        return
    if len(codings) > 1 or codings[0] not in _WBITS:
        raise HubUnavailable(
            f"{route}: the hub's answer is encoded as {', '.join(codings)}, "
            f"which the daemon does not ask for ({ACCEPT_ENCODING})",
            code="bad_response",
        )
    inflater = Inflater(codings[0], route)
    async for raw in response.aiter_raw(piece):
        for out in inflater.feed(raw, piece):
            yield out
    tail = inflater.finish()
    if tail:
        yield tail
