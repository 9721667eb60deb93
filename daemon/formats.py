"""Input formats: recognise PDF, TIFF, JPEG, PNG and BMP by their magic bytes.

Pure functions over the first bytes of a file, shared by intake (what may be sent)
and the emulator (what the hub accepts). The name's extension is never trusted.
"""

from __future__ import annotations

import enum

SNIFF_BYTES = 64


class InputFormat(enum.StrEnum):
    """A format RenderOCR accepts, spelled as the hub's engine list spells it."""

    PDF = "pdf"
    TIFF = "tiff"
    JPEG = "jpeg"
    PNG = "png"
    BMP = "bmp"


_MAGIC: tuple[tuple[bytes, InputFormat], ...] = (
    (b"%PDF-", InputFormat.PDF),
    (b"II*\x00", InputFormat.TIFF),
    (b"MM\x00*", InputFormat.TIFF),
    (b"\xff\xd8\xff", InputFormat.JPEG),
    (b"\x89PNG\r\n\x1a\n", InputFormat.PNG),
    (b"BM", InputFormat.BMP),
)

# Descriptions of common non-scan content, so a refusal can say what the file looks like.
_OTHER: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "a ZIP archive or Office document"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF container (WebP, WAV or AVI)"),
    (b"\xd0\xcf\x11\xe0", "a legacy Office document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"7z\xbc\xaf", "a 7-Zip archive"),
    (b"Rar!", "a RAR archive"),
    (b"{\\rtf", "an RTF document"),
    (b"\x00\x00\x00", "an ISO media file (HEIC, MP4) or binary data"),
)


def sniff(head: bytes) -> InputFormat | None:
    """Return the input format whose magic bytes start ``head``, or None."""
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    return None


def describe(head: bytes) -> str:
    """Say in words what ``head`` looks like, for an 'unsupported type' message."""
    fmt = sniff(head)
    if fmt is not None:
        return f"a {fmt.value.upper()} file"
    if not head:
        return "an empty file"
    for magic, words in _OTHER:
        if head.startswith(magic):
            return words
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of an unknown type"
    return "a text file"
