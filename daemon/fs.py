"""Names: a reversible, printable form of inbox paths (pure functions).

POSIX names are bytes. Python hands undecodable bytes over as lone surrogates
(PEP 383), which a database cannot store and a log or an SMB client cannot show; names
may also hold control characters or bidirectional overrides that forge log lines or
hide an extension. Such a path is *stored* percent-escaped, like a URL: every ``%``,
every byte that is not valid UTF-8 and every control or bidi character becomes ``%XX``
(``a\\nb\\xff.pdf`` is stored as ``a%0Ab%FF.pdf``). An ordinary name is stored as it is,
and so is one with a ``%`` that is not followed by two hex digits (``100% done.pdf``).

The mapping is reversible (``fs_path(stored_path(p)) == p`` for every path), the stored
form is valid, printable UTF-8, and since every output and error-file name derives from
the stored form, no output name carries an undecodable byte or a control character.
"""

from __future__ import annotations

import os
import re

_HEX_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_UNSAFE_CHARS = frozenset(
    [chr(c) for c in range(0x20)]
    + [chr(0x7F)]
    + [chr(c) for c in range(0x80, 0xA0)]
    + [chr(c) for c in range(0x202A, 0x202F)]  # LRE, RLE, PDF, LRO, RLO
    + [chr(c) for c in range(0x2066, 0x206A)]  # LRI, RLI, FSI, PDI
)


def _needs_escaping(path: str) -> bool:
    if _HEX_ESCAPE.search(path):
        return True
    return any(ch in _UNSAFE_CHARS or "\udc80" <= ch <= "\udcff" for ch in path)


def stored_path(fs_rel: str) -> str:
    """The stored form of a relative path as the filesystem gave it (``surrogateescape``)."""
    if not _needs_escaping(fs_rel):
        return fs_rel
    out: list[str] = []
    for ch in fs_rel:
        if ch == "%" or ch in _UNSAFE_CHARS:
            out.extend(f"%{byte:02X}" for byte in ch.encode("utf-8"))
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"%{ord(ch) - 0xDC00:02X}")
        else:
            out.append(ch)
    return "".join(out)


def fs_path(stored: str) -> str:
    """The filesystem form (``surrogateescape`` str) of a stored relative path."""
    if "%" not in stored or not _HEX_ESCAPE.search(stored):
        return stored
    raw = bytearray()
    pos = 0
    for match in _HEX_ESCAPE.finditer(stored):
        raw += stored[pos : match.start()].encode("utf-8", "surrogateescape")
        raw.append(int(match.group()[1:], 16))
        pos = match.end()
    raw += stored[pos:].encode("utf-8", "surrogateescape")
    return os.fsdecode(bytes(raw))


def is_escaped(stored: str) -> bool:
    """Whether ``stored`` differs from the name on disk."""
    return fs_path(stored) != stored
