"""The OOXML check is bounded: size, ratio, members, depth and XML size (#35, Major 5)."""

from __future__ import annotations

import io
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from daemon.emulator import bombs
from daemon.emulator.documents import render_document
from daemon.errors import OutputRefused
from daemon.outbox import verify
from daemon.outbox.verify import MAX_DEPTH, MAX_MEMBERS, verify_package

MiB = 1024 * 1024
_WORD_NS = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"


def rendered() -> bytes:
    """A valid docx from the emulator."""
    return render_document(
        "docx", source_name="scan.pdf", engine="ki/ocr", language="jpn", pages=1, input_format="pdf"
    )


def rewritten(tmp_path: Path, extra: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    """The rendered docx with members replaced or added, written to a file."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(rendered())) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            body = extra.pop(info.filename, None)
            if body is None:
                target.writestr(info, source.read(info))
            else:
                target.writestr(info.filename, body, compress_type=method)
        for name, body in extra.items():
            target.writestr(name, body, compress_type=method)
    path = tmp_path / "out.docx"
    path.write_bytes(out.getvalue())
    return path


def deep_document(depth: int) -> bytes:
    """A main part whose body nests ``depth`` elements."""
    head = f'<w:document xmlns:w="{_WORD_NS}"><w:body>'.encode()
    return head + b"<n>" * depth + b"</n>" * depth + b"</w:body></w:document>"


def refused(path: Path) -> str:
    """The message of the OutputRefused the check raises for ``path``."""
    with pytest.raises(OutputRefused) as caught:
        verify_package(path, "docx")
    return caught.value.message


def test_a_zeros_bomb_is_refused_unread_in_little_memory(tmp_path: Path) -> None:
    """4 GiB of zeros in a 4 MiB package: refused from the directory, nothing inflated."""
    path = tmp_path / "bomb.docx"
    bombs.write_zip(path, bombs.zeros_bomb(rendered(), 4 * 1024 * MiB))
    assert path.stat().st_size < 8 * MiB
    tracemalloc.start()
    started = time.monotonic()
    try:
        message = refused(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "unpacks to 4096 MiB, more than 512 MiB" in message
    assert time.monotonic() - started < 2.0
    assert peak < 16 * MiB


def test_a_deep_xml_bomb_is_refused_in_little_memory(tmp_path: Path) -> None:
    """Ten million nested elements (a small package): refused, memory stays flat."""
    path = tmp_path / "bomb.docx"
    bombs.write_zip(path, bombs.deep_xml_bomb(rendered(), "docx", 10_000_000))
    tracemalloc.start()
    try:
        message = refused(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "a ZIP bomb" in message or "nests XML elements" in message
    assert peak < 16 * MiB


def test_nesting_is_capped_even_when_nothing_compresses(tmp_path: Path) -> None:
    """A stored (uncompressed) main part nesting past the cap stops the parser there."""
    path = rewritten(
        tmp_path, {"word/document.xml": deep_document(MAX_DEPTH + 10)}, zipfile.ZIP_STORED
    )
    assert f"more than {MAX_DEPTH} deep in part word/document.xml" in refused(path)
    fine = rewritten(tmp_path, {"word/document.xml": deep_document(MAX_DEPTH - 10)})
    verify_package(fine, "docx")


def test_too_many_members_are_refused(tmp_path: Path) -> None:
    """More than MAX_MEMBERS files in a package: refused before any is read."""
    extra = {f"customXml/item{n}.xml": b"<a/>" for n in range(MAX_MEMBERS + 1)}
    path = rewritten(tmp_path, extra, zipfile.ZIP_STORED)
    assert f"more than {MAX_MEMBERS}" in refused(path)


def test_a_member_compressed_too_well_is_refused_but_a_small_one_is_not(tmp_path: Path) -> None:
    """Beyond the 1 MiB floor a 200:1 ratio is a bomb; a small blank member is fine."""
    assert "more than 200:1" in refused(rewritten(tmp_path, {"customXml/z.bin": bytes(4 * MiB)}))
    verify_package(rewritten(tmp_path, {"customXml/z.bin": bytes(MiB // 2)}), "docx")


def test_an_xml_part_is_read_up_to_its_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An XML part larger than MAX_XML_BYTES stops being read there (cap lowered to 4 KiB)."""
    monkeypatch.setattr(verify, "MAX_XML_BYTES", 4096)
    words = b"".join(b"<w:p><w:r><w:t>%d</w:t></w:r></w:p>" % n for n in range(2000))
    head = f'<w:document xmlns:w="{_WORD_NS}"><w:body>'.encode()
    path = rewritten(tmp_path, {"word/document.xml": head + words + b"</w:body></w:document>"})
    assert "has an XML part word/document.xml larger than" in refused(path)


def test_a_valid_package_passes(tmp_path: Path) -> None:
    """The limits leave an ordinary output alone."""
    verify_package(rewritten(tmp_path, {}), "docx")
