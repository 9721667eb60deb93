"""Answer bodies decoded in bounded pieces: gzip, deflate (with or without its header),
identity, and the encodings the daemon never asked for."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator

import pytest

from daemon.errors import HubUnavailable
from daemon.hub.bodies import Inflater, decoded, encodings

PIECE = 64 * 1024


async def arriving(body: bytes) -> AsyncIterator[bytes]:
    """``body`` as a socket delivers it: in reads of 64 KiB."""
    for start in range(0, len(body), 65536):
        yield body[start : start + 65536]


def body_of(body: bytes, encoding: str | None, piece: int = PIECE) -> tuple[bytes, int]:
    """The decoded body and the largest piece it came in."""

    async def read() -> list[bytes]:
        return [chunk async for chunk in decoded(arriving(body), encoding or "", "GET /x", piece)]

    pieces = asyncio.run(read())
    return b"".join(pieces), max((len(p) for p in pieces), default=0)


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        (None, lambda d: d),
        ("identity", lambda d: d),
        ("gzip", gzip.compress),
        ("GZIP", gzip.compress),
        ("x-gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", raw_deflate),
    ],
)
def test_every_encoding_the_daemon_asks_for_decodes_to_the_body(
    encoding: str | None, encode: object
) -> None:
    """gzip, deflate with or without zlib's header, and identity all give the body back."""
    data = bytes(range(256)) * 4000 + b"tail"
    assert callable(encode)
    assert body_of(encode(data), encoding)[0] == data


def test_a_bomb_inflates_in_pieces_no_larger_than_asked() -> None:
    """64 MB of zeros sent as 64 KB of gzip never comes out more than one piece at a time."""
    bomb = gzip.compress(bytes(64 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 100 * 1024
    inflater = Inflater("gzip", "GET /x")
    sizes = [len(piece) for piece in inflater.feed(bomb, PIECE)]
    assert max(sizes) <= PIECE
    assert sum(sizes) + len(inflater.finish()) == 64 * 1024 * 1024


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, gzip", "compress"])
def test_an_encoding_never_asked_for_is_a_bad_answer(encoding: str) -> None:
    """A body in an encoding the daemon did not accept is refused as a bad answer."""
    with pytest.raises(HubUnavailable) as caught:
        body_of(b"whatever", encoding)
    assert caught.value.code == "bad_response"
    assert "does not ask for" in caught.value.message


def test_a_body_that_does_not_inflate_is_a_bad_answer() -> None:
    """A gzip header over garbage is a bad answer, not a crash."""
    with pytest.raises(HubUnavailable) as caught:
        body_of(b"\x1f\x8b\x08\x00garbage that is no deflate stream", "gzip")
    assert caught.value.code == "bad_response"


def test_encodings_are_listed_in_order_without_identity() -> None:
    """Content-Encoding is read as an ordered list; identity and blanks drop out."""
    assert encodings("identity, GZIP ,") == ["gzip"]
    assert encodings("") == []
