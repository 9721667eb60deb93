"""The hub's answer bodies, decoded in pieces of bounded size whatever they inflate to.

httpx inflates each piece read from the socket whole: 64 KiB of gzip may become 64 MB,
and a few such answers at once a few hundred MB before any cap counted on decoded bytes
can act. Here a body is inflated at most ``piece`` bytes at a time, so that cap bounds
the memory too. The daemon asks for gzip and deflate only (``ACCEPT_ENCODING``); a body
in any other encoding, or one that does not inflate, is a bad answer.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterable, AsyncIterator, Iterator

from daemon.errors import HubUnavailable

PIECE = 256 * 1024
ACCEPT_ENCODING = "gzip, deflate"
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def encodings(content_encoding: str) -> list[str]:
    """The codings a Content-Encoding header names, in order (identity left out)."""
    named = (coding.strip().lower() for coding in content_encoding.split(","))
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


async def decoded(
    raw: AsyncIterable[bytes], content_encoding: str, route: str, piece: int = PIECE
) -> AsyncIterator[bytes]:
    """The body read as ``raw`` pieces with that Content-Encoding, as sent before its
    encoding, in pieces of at most ``piece`` bytes."""
    codings = encodings(content_encoding)
    if not codings:
        async for chunk in raw:
            yield chunk
        return
    if len(codings) > 1 or codings[0] not in _WBITS:
        raise HubUnavailable(
            f"{route}: the hub's answer is encoded as {', '.join(codings)}, "
            f"which the daemon does not ask for ({ACCEPT_ENCODING})",
            code="bad_response",
        )
    inflater = Inflater(codings[0], route)
    async for chunk in raw:
        for out in inflater.feed(chunk, piece):
            yield out
    tail = inflater.finish()
    if tail:
        yield tail
