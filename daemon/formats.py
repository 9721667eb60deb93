"""Input formats: recognise PDF, TIFF, JPEG, PNG and BMP by their magic bytes.

Pure functions over the first bytes of a file, shared by intake (what may be sent)
and the emulator (what the hub accepts). The name's extension is never trusted.

``completeness`` says whether a file of a known format looks completely written, from
its trailer or its header's sizes (PDF ``%%EOF`` near the end, the JPEG end-of-image
marker, the PNG ``IEND`` chunk, a TIFF's page directories and strips, a BMP's declared
sizes). It reads through a callable, so it stays pure and reads a few bytes only.

``count_pages`` says how many pages the hub will bill for a file, read the same way and
bounded: a PDF's page objects and page-tree counts in its first ``PDF_SCAN_BYTES`` (and
its tail), a TIFF's page directories, one page for an image.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Callable

SNIFF_BYTES = 64
TAIL_BYTES = 1024


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


MIME_TYPES = {
    InputFormat.PDF: "application/pdf",
    InputFormat.TIFF: "image/tiff",
    InputFormat.JPEG: "image/jpeg",
    InputFormat.PNG: "image/png",
    InputFormat.BMP: "image/bmp",
}
"""The media type an upload of each format carries."""

EXTENSIONS = {
    InputFormat.PDF: ".pdf",
    InputFormat.TIFF: ".tif",
    InputFormat.JPEG: ".jpg",
    InputFormat.PNG: ".png",
    InputFormat.BMP: ".bmp",
}
"""The extension an upload of each format carries, whatever the file's own name says."""


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


Reader = Callable[[int, int], bytes]  # (offset, length) -> at most length bytes


def looks_unwritten(head: bytes) -> bool:
    """Whether the file starts with zero bytes only: preallocated, content not written yet."""
    return bool(head) and not head.strip(b"\x00")


def completeness(fmt: InputFormat, size: int, read: Reader) -> str | None:
    """None when a file of ``fmt`` looks completely written, else what is missing."""
    return _CHECKS[fmt](size, read)


def _tail(size: int, read: Reader, length: int = TAIL_BYTES) -> bytes:
    start = max(0, size - length)
    return read(start, size - start)


def _pdf(size: int, read: Reader) -> str | None:
    if b"%%EOF" in _tail(size, read):
        return None
    return f"incomplete PDF: no %%EOF marker in its last {TAIL_BYTES} bytes"


def _jpeg(size: int, read: Reader) -> str | None:
    # Some writers pad after the end-of-image marker, so look near the end.
    if b"\xff\xd9" in _tail(size, read):
        return None
    return "incomplete JPEG: no end-of-image marker (FF D9) at its end"


def _png(size: int, read: Reader) -> str | None:
    # The IEND chunk, with its fixed CRC; some writers pad after it.
    if b"IEND\xaeB`\x82" in _tail(size, read, 64):
        return None
    return "incomplete PNG: no IEND chunk at its end"


def _bmp(size: int, read: Reader) -> str | None:
    header = read(0, 54)
    if len(header) < 30:
        return "incomplete BMP: the header is cut short"
    declared, pixels_at, dib_size = struct.unpack("<I4xII", header[2:18])
    if declared > size:
        return f"incomplete BMP: the header declares {declared} bytes but the file has {size}"
    needed = pixels_at + _bmp_pixel_bytes(header, dib_size)
    if needed > size:
        return f"incomplete BMP: its pixels need {needed} bytes but the file has {size}"
    return None


def _bmp_pixel_bytes(header: bytes, dib_size: int) -> int:
    if dib_size < 40 or len(header) < 38:
        return 0
    width, height, _planes, bits, compression, image_size = struct.unpack("<iiHHII", header[18:38])
    if compression in (0, 3, 6):  # uncompressed (BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS)
        return int(((abs(width) * bits + 31) // 32) * 4 * abs(height))
    return int(image_size)


_TIFF_TYPE_SIZES = {3: 2, 4: 4}  # SHORT, LONG: the types offsets and counts come in
_TIFF_ALL_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_TIFF_DATA_TAGS = ((273, 279), (324, 325))  # (StripOffsets, StripByteCounts), tiles
_TIFF_MAX_PAGES = 10_000
_TIFF_MAX_VALUES = 1 << 20  # strips per page we are willing to read the table of


def _tiff(size: int, read: Reader) -> str | None:
    header = read(0, 8)
    if len(header) < 8:
        return "incomplete TIFF: the header is cut short"
    order = "<" if header[:2] == b"II" else ">"
    (offset,) = struct.unpack(order + "I", header[4:8])
    pages: set[int] = set()
    while offset:
        page = len(pages) + 1
        if offset in pages or len(pages) >= _TIFF_MAX_PAGES:
            return None  # a loop: broken, not incomplete; the hub will say so
        pages.add(offset)
        problem, offset = _tiff_page(order, offset, size, read)
        if problem:
            return f"incomplete TIFF: page {page} {problem}"
    return None if pages else "incomplete TIFF: it has no pages yet"


def _tiff_page(order: str, offset: int, size: int, read: Reader) -> tuple[str | None, int]:
    """(problem, next page offset) of the page directory at ``offset``."""
    count_bytes = read(offset, 2)
    if offset < 8 or len(count_bytes) < 2:
        return "points past the end of the file", 0
    (entries,) = struct.unpack(order + "H", count_bytes)
    if entries == 0:
        return "has an empty directory (not written yet)", 0
    table = read(offset + 2, 12 * entries + 4)
    if len(table) < 12 * entries + 4:
        return "has its directory cut short", 0
    (next_offset,) = struct.unpack(order + "I", table[12 * entries :])
    return _tiff_page_data(order, table, entries, size, read), next_offset


def _tiff_page_data(order: str, table: bytes, entries: int, size: int, read: Reader) -> str | None:
    """What of a page's values and image data lies past the end of the file, if any."""
    tags: dict[int, tuple[int, int, bytes]] = {}
    for i in range(entries):
        tag, kind, count = struct.unpack(order + "HHI", table[12 * i : 12 * i + 8])
        raw = table[12 * i + 8 : 12 * i + 12]
        tags[tag] = (kind, count, raw)
        if _tiff_value_end(order, kind, count, raw) > size:
            return f"has the value of tag {tag} past the end of the file"
    for offsets_tag, counts_tag in _TIFF_DATA_TAGS:
        if offsets_tag in tags and counts_tag in tags:
            starts = _tiff_values(order, tags[offsets_tag], size, read)
            lengths = _tiff_values(order, tags[counts_tag], size, read)
            if starts is None or lengths is None:
                return "has its data table past the end of the file"
            end = max((s + n for s, n in zip(starts, lengths, strict=False)), default=0)
            if end > size:
                return f"needs {end} bytes but the file has {size}"
    return None


def _tiff_value_end(order: str, kind: int, count: int, raw: bytes) -> int:
    """Where an entry's value ends when it is stored out of line (0 when inline)."""
    total = _TIFF_ALL_SIZES.get(kind, 1) * count
    if total <= 4:
        return 0
    (at,) = struct.unpack(order + "I", raw)
    return int(at) + total


def _tiff_values(
    order: str, entry: tuple[int, int, bytes], size: int, read: Reader
) -> list[int] | None:
    """The SHORT or LONG values of a directory entry; None when they lie past the end."""
    kind, count, raw = entry
    width = _TIFF_TYPE_SIZES.get(kind)
    if width is None or count > _TIFF_MAX_VALUES:
        return []  # nothing we can check cheaply
    code = "H" if width == 2 else "I"
    total = width * count
    if total <= 4:
        return list(struct.unpack(order + code * count, raw[:total]))
    (at,) = struct.unpack(order + "I", raw)
    if at + total > size:
        return None
    data = read(at, total)
    if len(data) < total:
        return None
    return list(struct.unpack(f"{order}{count}{code}", data))


_CHECKS: dict[InputFormat, Callable[[int, Reader], str | None]] = {
    InputFormat.PDF: _pdf,
    InputFormat.TIFF: _tiff,
    InputFormat.JPEG: _jpeg,
    InputFormat.PNG: _png,
    InputFormat.BMP: _bmp,
}


# -- page counts (what the hub bills) ---------------------------------------------------

PDF_SCAN_BYTES = 64 * 1024 * 1024  # read no more of a PDF to count its pages
_PDF_CHUNK = 1024 * 1024
_PDF_WINDOW = 512  # where a page tree's /Count may lie around its /Type /Pages
_PDF_LEAF = re.compile(rb"/Type\s*/Page\b")
_PDF_TREE = re.compile(rb"/Type\s*/Pages\b")
_PDF_COUNT = re.compile(rb"/Count\s+(\d{1,9})\b")


def count_pages(
    fmt: InputFormat, size: int, read: Reader, *, scan_bytes: int = PDF_SCAN_BYTES
) -> int | None:
    """Pages the hub will bill for a complete file of ``fmt`` (None: unknown)."""
    if fmt is InputFormat.PDF:
        return _pdf_pages(size, read, scan_bytes)
    if fmt is InputFormat.TIFF:
        return _tiff_pages(read)
    return 1


def _pdf_pages(size: int, read: Reader, scan_bytes: int) -> int | None:
    """The larger of the page objects and the page tree's largest /Count, scanned in
    chunks over the first ``scan_bytes`` and the last chunk (pages compressed into
    object streams show neither: None)."""
    leaves, tree, done, base, carry = 0, 0, 0, 0, b""
    end = min(size, scan_bytes)
    while True:
        chunk = read(base + len(carry), min(_PDF_CHUNK, end - base - len(carry)))
        buffer = carry + chunk
        # Matches starting in the last bytes wait for the next chunk, which may extend them.
        cutoff = base + len(buffer) - (2 * _PDF_WINDOW if chunk else 0)
        leaves += sum(1 for m in _PDF_LEAF.finditer(buffer) if done <= base + m.start() < cutoff)
        tree = max(tree, _pdf_tree_count(buffer, base, done, cutoff))
        if not chunk:
            break
        done = max(done, cutoff)
        keep = max(0, done - base - _PDF_WINDOW)
        base, carry = base + keep, buffer[keep:]
    if size > end:  # the root of the page tree is often written last
        start = max(end, size - _PDF_CHUNK)
        tree = max(tree, _pdf_tree_count(read(start, size - start), start, start, size))
    return max(leaves, tree) or None


def _pdf_tree_count(buffer: bytes, base: int, done: int, cutoff: int) -> int:
    """The largest /Count beside a /Type /Pages that starts in [done, cutoff)."""
    largest = 0
    for match in _PDF_TREE.finditer(buffer):
        if not done <= base + match.start() < cutoff:
            continue
        near = buffer[max(0, match.start() - _PDF_WINDOW) : match.end() + _PDF_WINDOW]
        for count in _PDF_COUNT.finditer(near):
            largest = max(largest, int(count.group(1)))
    return largest


def _tiff_pages(read: Reader) -> int | None:
    """The number of page directories (None when one is unreadable or they loop)."""
    header = read(0, 8)
    if len(header) < 8:
        return None
    order = "<" if header[:2] == b"II" else ">"
    (offset,) = struct.unpack(order + "I", header[4:8])
    seen: set[int] = set()
    while offset:
        if offset < 8 or offset in seen or len(seen) >= _TIFF_MAX_PAGES:
            return None
        seen.add(offset)
        count_bytes = read(offset, 2)
        if len(count_bytes) < 2:
            return None
        (entries,) = struct.unpack(order + "H", count_bytes)
        link = read(offset + 2 + 12 * entries, 4)
        if len(link) < 4:
            return None
        (offset,) = struct.unpack(order + "I", link)
    return len(seen) or None
