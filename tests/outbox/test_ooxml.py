"""Tests for the daemon's OOXML package check (daemon.outbox.verify)."""

from __future__ import annotations

import contextlib
import io
import random
import tracemalloc
import zipfile
from collections.abc import Mapping
from pathlib import Path

import docx
import openpyxl
import pptx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.emulator.documents import render_document
from daemon.errors import OoxmlProblem, OutputRefused
from daemon.outbox.verify import MAIN_CONTENT_TYPES, _unpacked, verify_package

FORMATS = ("docx", "xlsx", "pptx")
MAIN_PARTS = {
    "docx": "word/document.xml",
    "xlsx": "xl/workbook.xml",
    "pptx": "ppt/presentation.xml",
}
_WORD_NS = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"


def rendered(output_format: str) -> bytes:
    """A package from the emulator, as a known-good starting point."""
    return render_document(
        output_format,
        source_name="scan.pdf",
        engine="ki/ocr",
        language="jpn",
        pages=2,
        input_format="pdf",
    )


def rewrite(
    data: bytes,
    *,
    drop: tuple[str, ...] = (),
    replace: Mapping[str, bytes] | None = None,
) -> bytes:
    """Copy a ZIP, leaving out ``drop`` and swapping in (or adding) ``replace`` members."""
    replace = dict(replace or {})
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            if info.filename in drop:
                continue
            body = replace.pop(info.filename, None)
            target.writestr(info, source.read(info) if body is None else body)
        for name, body in replace.items():
            target.writestr(name, body)
    return out.getvalue()


def saved(tmp_path: Path, data: bytes, name: str = "result.bin") -> Path:
    """Write ``data`` to a file under ``tmp_path`` and return its path."""
    path = tmp_path / name
    path.write_bytes(data)
    return path


def problem(path: Path, expected_format: str) -> str:
    """The OoxmlProblem message verify_package raises for ``path``."""
    with pytest.raises(OoxmlProblem) as caught:
        verify_package(path, expected_format)
    return str(caught.value)


@pytest.mark.parametrize("output_format", FORMATS)
def test_accepts_each_rendered_format(output_format: str, tmp_path: Path) -> None:
    """A docx, xlsx or pptx from the emulator passes as its own format."""
    verify_package(saved(tmp_path, rendered(output_format)), output_format)


@pytest.mark.parametrize("output_format", FORMATS)
def test_accepts_packages_written_by_office_libraries(output_format: str, tmp_path: Path) -> None:
    """Packages saved by python-docx, openpyxl and python-pptx (Office-made templates) pass."""
    path = tmp_path / f"library.{output_format}"
    if output_format == "docx":
        docx.Document().save(str(path))
    elif output_format == "xlsx":
        openpyxl.Workbook().save(str(path))
    else:
        pptx.Presentation().save(str(path))
    verify_package(path, output_format)


def test_rejects_truncated_file(tmp_path: Path) -> None:
    """A package cut short (no central directory) is reported as a truncated ZIP."""
    data = rendered("docx")
    message = problem(saved(tmp_path, data[: len(data) // 2]), "docx")
    assert message == "truncated or damaged ZIP archive (no central directory)"


def test_rejects_non_zip(tmp_path: Path) -> None:
    """A file that is no ZIP at all (here a PDF) is reported as such."""
    path = saved(tmp_path, b"%PDF-1.7\n" + b"\x00" * 2048)
    assert problem(path, "docx") == "not a ZIP archive"


def test_rejects_empty_file(tmp_path: Path) -> None:
    """An empty file is not a ZIP archive."""
    assert problem(saved(tmp_path, b""), "xlsx") == "not a ZIP archive"


def test_rejects_missing_file(tmp_path: Path) -> None:
    """A path that cannot be read is reported, not raised as a bare OSError."""
    assert problem(tmp_path / "absent.docx", "docx").startswith("cannot read the file")


@pytest.mark.parametrize(
    ("actual", "expected"),
    [("docx", "pptx"), ("xlsx", "docx"), ("pptx", "xlsx")],
)
def test_rejects_package_of_another_format(actual: str, expected: str, tmp_path: Path) -> None:
    """A valid package of the wrong format names both formats."""
    path = saved(tmp_path, rendered(actual))
    assert problem(path, expected) == f"is a {actual} package, expected {expected}"


def test_rejects_macro_enabled_variant(tmp_path: Path) -> None:
    """A docm (macro-enabled) is not accepted where a docx is expected."""
    data = rendered("docx")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        types = archive.read("[Content_Types].xml")
    types = types.replace(
        MAIN_CONTENT_TYPES["docx"].encode(),
        b"application/vnd.ms-word.document.macroEnabled.main+xml",
    )
    path = saved(tmp_path, rewrite(data, replace={"[Content_Types].xml": types}))
    assert problem(path, "docx") == "is a docm package, expected docx"


def test_rejects_zip_without_content_types(tmp_path: Path) -> None:
    """A ZIP lacking [Content_Types].xml is reported as missing that part."""
    path = saved(tmp_path, rewrite(rendered("xlsx"), drop=("[Content_Types].xml",)))
    assert problem(path, "xlsx") == "missing part [Content_Types].xml"


def test_rejects_plain_zip(tmp_path: Path) -> None:
    """An ordinary ZIP of unrelated files is no OOXML package."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("readme.txt", "hello")
    assert problem(saved(tmp_path, out.getvalue()), "docx") == "missing part [Content_Types].xml"


@pytest.mark.parametrize("output_format", FORMATS)
def test_rejects_missing_main_part(output_format: str, tmp_path: Path) -> None:
    """A package whose main part is gone names the missing part."""
    main = MAIN_PARTS[output_format]
    path = saved(tmp_path, rewrite(rendered(output_format), drop=(main,)))
    assert problem(path, output_format) == f"missing part {main}"


def test_rejects_missing_root_relationships(tmp_path: Path) -> None:
    """A package without _rels/.rels cannot name its main part."""
    path = saved(tmp_path, rewrite(rendered("pptx"), drop=("_rels/.rels",)))
    assert problem(path, "pptx") == "missing part _rels/.rels"


def test_rejects_relationships_without_main_document(tmp_path: Path) -> None:
    """_rels/.rels with no officeDocument relationship is reported."""
    rels = (
        b'<?xml version="1.0"?><Relationships xmlns='
        b'"http://schemas.openxmlformats.org/package/2006/relationships"/>'
    )
    path = saved(tmp_path, rewrite(rendered("docx"), replace={"_rels/.rels": rels}))
    assert problem(path, "docx") == "_rels/.rels names no main document (officeDocument)"


def test_rejects_undeclared_main_part_type(tmp_path: Path) -> None:
    """A main part with no content type in [Content_Types].xml is reported."""
    types = (
        b'<?xml version="1.0"?>'
        b'<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        b'<Default Extension="rels" '
        b'ContentType="application/vnd.openxmlformats-package.relationships+xml"/></Types>'
    )
    data = rewrite(rendered("docx"), replace={"[Content_Types].xml": types})
    message = problem(saved(tmp_path, data), "docx")
    assert message == "[Content_Types].xml declares no content type for word/document.xml"


def test_follows_office_document_relationship(tmp_path: Path) -> None:
    """The main part is found through _rels/.rels, even at an unusual, %-encoded path."""
    data = rendered("docx")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        document = archive.read("word/document.xml")
        rels = archive.read("_rels/.rels")
        types = archive.read("[Content_Types].xml")
    moved = rewrite(
        data,
        drop=("word/document.xml",),
        replace={
            "_rels/.rels": rels.replace(b'Target="word/document.xml"', b'Target="/main%20doc.xml"'),
            "[Content_Types].xml": types.replace(b"/word/document.xml", b"/main doc.xml"),
            "main doc.xml": document,
        },
    )
    verify_package(saved(tmp_path, moved), "docx")


def test_rejects_corrupted_member(tmp_path: Path) -> None:
    """A member whose compressed bytes were damaged fails the ZIP check."""
    data = bytearray(rendered("docx"))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        info = archive.getinfo("word/document.xml")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for offset in range(start + 5, start + 25):
        data[offset] ^= 0xFF
    message = problem(saved(tmp_path, bytes(data)), "docx")
    assert message.startswith("damaged ZIP archive")


def test_rejects_bad_crc(tmp_path: Path) -> None:
    """A stored member whose bytes changed after zipping fails its CRC check."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(rendered("pptx"))) as source, zipfile.ZipFile(out, "w") as zf:
        for info in source.infolist():
            zf.writestr(info, source.read(info))
        zf.writestr("ppt/media/image1.bin", b"0123456789" * 10, zipfile.ZIP_STORED)
    data = out.getvalue()
    at = data.index(b"0123456789")
    damaged = data[:at] + b"X" + data[at + 1 :]
    message = problem(saved(tmp_path, damaged), "pptx")
    assert (
        message == "damaged ZIP archive: member ppt/media/image1.bin fails its CRC or header check"
    )


_SAMPLE = rendered("xlsx")


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_SAMPLE) - 1), st.integers(1, 255))
def test_unpacking_in_memory_agrees_with_zipfile(offset: int, flip: int) -> None:
    """Whatever byte is damaged, the in-memory unpacking accepts only what zipfile reads
    without error, with the same bytes, and leaves everything else to zipfile."""
    data = bytearray(_SAMPLE)
    data[offset] ^= flip
    try:
        archive = zipfile.ZipFile(io.BytesIO(bytes(data)))
    except (zipfile.BadZipFile, NotImplementedError):
        return  # the central directory itself is damaged: nothing is unpacked
    unpacked = _unpacked(archive, bytes(data))
    if unpacked is None:
        return
    assert archive.testzip() is None
    assert unpacked == {info.filename: archive.read(info) for info in archive.infolist()}


def test_every_damaged_byte_is_a_problem_or_harmless(tmp_path: Path) -> None:
    """Damaging any one byte of a package either leaves it valid or makes the check
    name a problem (or a limit it breaks, for a size field made huge): no other exception
    escapes it (a bad version field once did)."""
    path = tmp_path / "result.docx"
    original = rendered("docx")
    for offset in range(len(original)):
        data = bytearray(original)
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))
        with contextlib.suppress(OoxmlProblem, OutputRefused):
            verify_package(path, "docx")


def test_unsupported_zip_version_is_a_problem(tmp_path: Path) -> None:
    """A central directory entry that asks for a newer ZIP version is reported, not raised
    as the library's NotImplementedError."""
    data = bytearray(rendered("docx"))
    directory = data.index(b"PK\x01\x02")
    data[directory + 6] = 84  # "version needed to extract": 8.4
    message = problem(saved(tmp_path, bytes(data)), "docx")
    assert message.startswith("unsupported or damaged ZIP archive")


def test_unpacks_small_packages_in_memory() -> None:
    """A rendered package is unpacked from memory, not through zipfile's readers."""
    with zipfile.ZipFile(io.BytesIO(_SAMPLE)) as archive:
        unpacked = _unpacked(archive, _SAMPLE)
        assert unpacked == {info.filename: archive.read(info) for info in archive.infolist()}


def test_leaves_a_zip_bomb_to_zipfile() -> None:
    """A package whose members would unpack to more than 16 MiB is not unpacked in memory."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.bin", bytes(17 * 1024 * 1024))
    with zipfile.ZipFile(io.BytesIO(out.getvalue())) as archive:
        assert _unpacked(archive, out.getvalue()) is None


def test_rejects_malformed_main_part(tmp_path: Path) -> None:
    """A main part that is not well-formed XML is reported with its name."""
    broken = f'<w:document xmlns:w="{_WORD_NS}"><w:body>'.encode()
    data = rewrite(rendered("docx"), replace={"word/document.xml": broken})
    message = problem(saved(tmp_path, data), "docx")
    assert message.startswith("part word/document.xml is not well-formed XML")


def test_rejects_main_part_with_wrong_root(tmp_path: Path) -> None:
    """A main part whose root element is not the format's (here <foo>) is reported."""
    data = rewrite(rendered("xlsx"), replace={"xl/workbook.xml": b"<foo/>"})
    message = problem(saved(tmp_path, data), "xlsx")
    assert message == "part xl/workbook.xml starts with <foo>, expected <workbook>"


def test_rejects_dtd_and_entity_bombs(tmp_path: Path) -> None:
    """A DTD (and so any entity-expansion bomb) in a part is refused before expanding."""
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE Types [<!ENTITY a "aaaaaaaaaa">'
        b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><Types>&b;</Types>'
    )
    data = rewrite(rendered("docx"), replace={"[Content_Types].xml": bomb})
    message = problem(saved(tmp_path, data), "docx")
    assert message == "part [Content_Types].xml contains a DTD, which OOXML packages must not"


def test_unknown_expected_format_is_a_caller_error(tmp_path: Path) -> None:
    """Asking for a format other than docx, xlsx or pptx raises ValueError."""
    with pytest.raises(ValueError, match="unknown format 'odt'"):
        verify_package(saved(tmp_path, rendered("docx")), "odt")


def test_problem_is_an_exception() -> None:
    """OoxmlProblem is an Exception whose str() is the message."""
    assert issubclass(OoxmlProblem, Exception)
    assert str(OoxmlProblem("not a ZIP archive")) == "not a ZIP archive"


def test_memory_stays_flat_for_big_packages(tmp_path: Path) -> None:
    """A package with a 32 MiB main part and a 64 MiB media file is checked in little memory."""
    path = tmp_path / "big.docx"
    template = rendered("docx")
    with zipfile.ZipFile(io.BytesIO(template)) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            if info.filename != "word/document.xml":
                target.writestr(info, source.read(info))
        with target.open("word/document.xml", "w", force_zip64=True) as stream:
            stream.write(f'<w:document xmlns:w="{_WORD_NS}"><w:body>'.encode())
            # Text that compresses as real text does (well under the 200:1 a bomb shows).
            words = random.Random(7)
            written = 0
            while written < 32 << 20:
                text = " ".join(f"{words.randrange(10**6):x}" for _ in range(4096))
                paragraph = f"<w:p><w:r><w:t>{text}</w:t></w:r></w:p>".encode()
                stream.write(paragraph)
                written += len(paragraph)
            stream.write(b"</w:body></w:document>")
        zinfo = zipfile.ZipInfo("word/media/big.bin")
        zinfo.compress_type = zipfile.ZIP_DEFLATED
        with target.open(zinfo, "w", force_zip64=True) as stream:
            block = random.Random(1).randbytes(1 << 20)  # an image: hardly compressible
            for _ in range(64):
                stream.write(block)
    tracemalloc.start()
    try:
        verify_package(path, "docx")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
