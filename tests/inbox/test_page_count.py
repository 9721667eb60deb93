"""Page counts at intake: what the hub will bill, read in bounded pieces."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from daemon.emulator.hub import inspect_file
from daemon.formats import InputFormat, Reader, count_pages
from tests.scans import make_pdf, make_scan


def reader(data: bytes) -> Reader:
    """Read ``data`` as a file."""
    return lambda offset, length: data[offset : offset + length]


def pdf(pages: int, *, padding: int = 0, count: bool = True, tree_last: bool = False) -> bytes:
    """A PDF of ``pages`` page objects, each followed by ``padding`` comment bytes; its
    page tree with or without /Count, before or after the pages."""
    tree = f"<< /Type /Pages /Kids [] {'/Count ' + str(pages) if count else ''} >>".encode()
    leaf = b"<< /Type /Page /Parent 1 0 R >>\n%" + b"x" * padding + b"\n"
    body = [leaf] * pages
    parts = [*body, tree] if tree_last else [tree, *body]
    return b"%PDF-1.4\n" + b"".join(parts) + b"trailer\n%%EOF\n"


def pages_of(data: bytes, fmt: InputFormat = InputFormat.PDF, **options: int) -> int | None:
    """The count of ``data``."""
    return count_pages(fmt, len(data), reader(data), **options)


@pytest.mark.parametrize("pages", [1, 2, 7])
def test_pages_of_every_format_as_the_emulator_bills_them(pages: int) -> None:
    """PDF pages and TIFF frames as the emulator counts them; one page per other image."""
    assert pages_of(make_pdf(pages)) == pages
    assert pages_of(make_scan("tiff", 1, pages=pages), InputFormat.TIFF) == pages
    for fmt, kind in (("png", InputFormat.PNG), ("jpeg", InputFormat.JPEG)):
        assert pages_of(make_scan(fmt, 2), kind) == 1


def test_pdf_pages_across_chunk_boundaries_count_once() -> None:
    """3000 page objects over several 1 MB chunks count 3000, with or without /Count."""
    # 994 bytes apart (no divisor of a chunk): markers fall across the chunk boundaries.
    big = pdf(3000, padding=960, count=False)
    assert len(big) > 2_900_000
    assert pages_of(big) == 3000
    assert pages_of(pdf(3000, padding=960)) == 3000


def test_a_pdf_larger_than_the_scan_bound_reads_its_tail_for_the_tree() -> None:
    """Past the bound, the page tree written last still gives the count."""
    data = pdf(500, padding=2000, tree_last=True)
    assert pages_of(data, scan_bytes=100_000) == 500
    assert pages_of(pdf(500, padding=2000, count=False), scan_bytes=100_000) < 500  # a floor


def test_pdf_with_compressed_pages_and_broken_tiffs_are_unknown() -> None:
    """Pages hidden in object streams, or TIFF directories that loop or end past the file,
    leave the count unknown (None)."""
    assert (
        pages_of(b"%PDF-1.5\n1 0 obj << /Type /ObjStm /N 3 >> stream\nxx\nendstream\n%%EOF") is None
    )
    looped = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 0) + struct.pack("<I", 8)
    assert pages_of(looped, InputFormat.TIFF) is None
    cut = b"II*\x00" + struct.pack("<I", 64)
    assert pages_of(cut, InputFormat.TIFF) is None


def test_the_count_matches_the_emulator_on_real_files(tmp_path: Path) -> None:
    """The emulator's count and intake's agree on the scans the tests use."""
    folder = tmp_path
    for name, data, fmt in (
        ("a.pdf", make_pdf(4), InputFormat.PDF),
        ("b.tif", make_scan("tiff", 5, pages=3), InputFormat.TIFF),
        ("c.bmp", make_scan("bmp", 6), InputFormat.BMP),
    ):
        (folder / name).write_bytes(data)
        assert pages_of(data, fmt) == inspect_file(folder / name).pages
