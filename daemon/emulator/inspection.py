"""Content inspection: what the hub makes of an input before converting it.

Format (by magic bytes), damage and page count, reading the file in bounded pieces so a
big PDF costs no more memory than a small one. The page count is what a job bills.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from daemon.formats import SNIFF_BYTES, InputFormat, describe, sniff


@dataclass(frozen=True)
class Inspection:
    """What the hub makes of an input file before converting it."""

    input_format: InputFormat | None
    pages: int
    problem: tuple[str, str] | None  # (error code, message) when the job must fail


_SCAN_CHUNK = 1024 * 1024
_SCAN_OVERLAP = 64
_PDF_MARKS = re.compile(rb"/Type\s*/Page\b|/ObjStm\b")


def inspect_file(path: Path) -> Inspection:
    """Sniff ``path``, check it is intact and count its pages."""
    with path.open("rb") as stream:
        head = stream.read(SNIFF_BYTES)
        fmt = sniff(head)
        if fmt is None:
            message = (
                "The input is not a PDF, TIFF, JPEG, PNG or BMP file; "
                f"it looks like {describe(head)}."
            )
            return Inspection(None, 0, ("unsupported_format", message))
        pages = _PAGE_COUNTERS[fmt](stream, os.fstat(stream.fileno()).st_size)
    if pages is None:
        message = f"The {fmt.value.upper()} file is damaged or truncated and cannot be read."
        return Inspection(fmt, 0, ("invalid_input", message))
    return Inspection(fmt, pages, None)


def _pdf_pages(stream: IO[bytes], size: int) -> int | None:
    """Count ``/Type /Page`` objects; None when there are none (a broken PDF)."""
    stream.seek(0)
    pages, object_streams, carry = 0, False, b""
    while True:
        chunk = stream.read(_SCAN_CHUNK)
        buffer = carry + chunk
        # Matches starting in the last bytes wait for the next chunk, which may extend them.
        cutoff = len(buffer) - _SCAN_OVERLAP if chunk else len(buffer)
        for match in _PDF_MARKS.finditer(buffer):
            if match.start() >= cutoff:
                break
            if match.group().endswith(b"ObjStm"):
                object_streams = True
            else:
                pages += 1
        if not chunk:
            break
        carry = buffer[max(cutoff, 0) :]
    if pages:
        return pages
    # PDF 1.5 object streams compress page objects out of sight: not broken, count unknown.
    return 1 if object_streams else None


def _tiff_pages(stream: IO[bytes], size: int) -> int | None:
    """Count the IFDs of a TIFF; None when one lies beyond the end of the file."""
    stream.seek(0)
    header = stream.read(8)
    if len(header) < 8:
        return None
    order = "<" if header[:2] == b"II" else ">"
    (offset,) = struct.unpack(order + "I", header[4:8])
    pages, seen = 0, set()
    while offset:
        if offset < 8 or offset in seen or offset + 2 > size:
            return None
        seen.add(offset)
        stream.seek(offset)
        (entries,) = struct.unpack(order + "H", stream.read(2))
        next_field = offset + 2 + 12 * entries
        if next_field + 4 > size:
            return None
        stream.seek(next_field)
        (offset,) = struct.unpack(order + "I", stream.read(4))
        pages += 1
    return pages or None


def _tail(stream: IO[bytes], size: int, length: int) -> bytes:
    stream.seek(max(0, size - length))
    return stream.read(length)


def _jpeg_pages(stream: IO[bytes], size: int) -> int | None:
    # Trailing padding after the end-of-image marker is common, so look near the end.
    return 1 if b"\xff\xd9" in _tail(stream, size, 1024) else None


def _png_pages(stream: IO[bytes], size: int) -> int | None:
    return 1 if b"IEND" in _tail(stream, size, 64) else None


def _bmp_pages(stream: IO[bytes], size: int) -> int | None:
    stream.seek(0)
    header = stream.read(14)
    if len(header) < 14:
        return None
    declared, pixels_at = struct.unpack("<I4xI", header[2:14])
    if size < declared or pixels_at > size:
        return None
    return 1


_PAGE_COUNTERS = {
    InputFormat.PDF: _pdf_pages,
    InputFormat.TIFF: _tiff_pages,
    InputFormat.JPEG: _jpeg_pages,
    InputFormat.PNG: _png_pages,
    InputFormat.BMP: _bmp_pages,
}
