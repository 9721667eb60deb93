"""Tests for the emulator's output documents (daemon.emulator.documents)."""

from __future__ import annotations

import io
import os
import posixpath
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from xml.etree import ElementTree as ET

import docx
import openpyxl
import pptx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.emulator.documents import MAX_FIELD_CHARS, MAX_SLIDES, render_document

FORMATS = ("docx", "xlsx", "pptx")
HOSTILE_NAMES = {
    "markup": ("a&b<c>\"d'.pdf", "a&b<c>\"d'.pdf"),
    "japanese": ("請求書_2024年3月.pdf", "請求書_2024年3月.pdf"),
    "control": ("scan\x01\x00\x1f.pdf", "scan.pdf"),
    "surrogate": ("scan\udcff.pdf", "scan.pdf"),
    "line-breaks": ("two\nlines\t.pdf", "two lines .pdf"),
    "nonchars": ("a\ufffe\uffffb.pdf", "ab.pdf"),
}
_CT_NS = "{http://schemas.openxmlformats.org/package/2006/content-types}"
_REL_NS = "{http://schemas.openxmlformats.org/package/2006/relationships}"


def render(output_format: str, **overrides: object) -> bytes:
    """Render with sensible defaults, overriding any keyword."""
    arguments: dict[str, object] = {
        "source_name": "scan.pdf",
        "engine": "ki/ocr",
        "language": "jpn",
        "pages": 3,
        "input_format": "pdf",
    }
    arguments.update(overrides)
    return render_document(output_format, **arguments)  # type: ignore[arg-type]


def docx_text(data: bytes) -> list[str]:
    """The paragraphs of a docx, read with python-docx."""
    return [p.text for p in docx.Document(io.BytesIO(data)).paragraphs]


def xlsx_rows(data: bytes) -> list[tuple[object, ...]]:
    """The rows of the first worksheet of an xlsx, read with openpyxl."""
    workbook = openpyxl.load_workbook(io.BytesIO(data))
    try:
        return list(workbook.active.iter_rows(values_only=True))
    finally:
        workbook.close()


def pptx_slides(data: bytes) -> list[list[str]]:
    """The text of each shape on each slide of a pptx, read with python-pptx."""
    presentation = pptx.Presentation(io.BytesIO(data))
    return [[shape.text_frame.text for shape in slide.shapes] for slide in presentation.slides]


def all_text(output_format: str, data: bytes) -> str:
    """Every piece of text a reader library finds in the document, joined by newlines."""
    if output_format == "docx":
        return "\n".join(docx_text(data))
    if output_format == "xlsx":
        return "\n".join(str(v) for row in xlsx_rows(data) for v in row if v is not None)
    return "\n".join(text for slide in pptx_slides(data) for text in slide)


def check_package_structure(data: bytes) -> None:
    """Assert every part is well-formed XML, has a content type, and every link resolves."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = set(archive.namelist())
        parts = {name: archive.read(name) for name in names}
    for name, body in parts.items():
        ET.fromstring(body)  # raises on malformed XML
        assert body.startswith(b"<?xml"), name
    types = ET.fromstring(parts["[Content_Types].xml"])
    overrides = {e.get("PartName") for e in types.iter(f"{_CT_NS}Override")}
    defaults = {e.get("Extension") for e in types.iter(f"{_CT_NS}Default")}
    assert overrides <= {"/" + n for n in names}, "override for a part that is not there"
    for name in names - {"[Content_Types].xml"}:
        if not name.endswith(".rels"):
            assert "/" + name in overrides, f"{name} has no content type override"
        assert name.rsplit(".", 1)[1] in defaults
    for rels_name in (n for n in names if n.endswith(".rels")):
        base = posixpath.dirname(posixpath.dirname(rels_name))
        ids = []
        for rel in ET.fromstring(parts[rels_name]).iter(f"{_REL_NS}Relationship"):
            ids.append(rel.get("Id"))
            target = posixpath.normpath(posixpath.join(base, rel.get("Target", "")))
            assert target in names, f"{rels_name} points at missing {target}"
        assert len(ids) == len(set(ids)), f"duplicate relationship ids in {rels_name}"


def test_docx_opens_and_names_the_conversion() -> None:
    """A docx opens in python-docx and names source, format, pages, engine and language."""
    paragraphs = docx_text(render("docx"))
    assert (
        "Converted by the LDX hub emulator from scan.pdf (pdf, 3 pages) "
        "with engine ki/ocr, language jpn." in paragraphs
    )
    assert paragraphs[-3:] == ["Page 1 of 3", "Page 2 of 3", "Page 3 of 3"]


def test_xlsx_opens_and_names_the_conversion() -> None:
    """An xlsx opens in openpyxl with the summary, a field table and one row per page."""
    rows = xlsx_rows(render("xlsx", pages=2))
    assert rows[0][0] == (
        "Converted by the LDX hub emulator from scan.pdf (pdf, 2 pages) "
        "with engine ki/ocr, language jpn."
    )
    table = {row[0]: row[1] for row in rows[1:6]}
    assert table == {
        "Source": "scan.pdf",
        "Engine": "ki/ocr",
        "Language": "jpn",
        "Input format": "pdf",
        "Pages": 2,
    }
    assert [row[0] for row in rows[6:]] == ["Page 1 of 2", "Page 2 of 2"]


def test_pptx_opens_and_names_the_conversion() -> None:
    """A pptx opens in python-pptx; each slide is titled 'Page N of M' and names the job."""
    slides = pptx_slides(render("pptx", source_name="scan.tiff", input_format="tiff", pages=1))
    assert len(slides) == 1
    title, body = slides[0]
    assert title == "Page 1 of 1"
    assert body.splitlines() == [
        "Converted by the LDX hub emulator from scan.tiff (tiff, 1 page) "
        "with engine ki/ocr, language jpn.",
        "Source: scan.tiff",
        "Engine: ki/ocr",
        "Language: jpn",
        "Input format: tiff",
    ]


def test_pptx_uses_one_master_layout_and_16_9_size() -> None:
    """The pptx has one slide master with one layout that every slide uses, at 16:9."""
    presentation = pptx.Presentation(io.BytesIO(render("pptx")))
    assert len(presentation.slide_masters) == 1
    assert len(presentation.slide_layouts) == 1
    assert all(s.slide_layout == presentation.slide_layouts[0] for s in presentation.slides)
    assert (presentation.slide_width, presentation.slide_height) == (12192000, 6858000)


@pytest.mark.parametrize("pages", [1, 2, 7, MAX_SLIDES])
def test_pptx_has_one_slide_per_page(pages: int) -> None:
    """A pptx has exactly one slide per page, titled in page order."""
    slides = pptx_slides(render("pptx", pages=pages))
    assert [slide[0] for slide in slides] == [f"Page {n} of {pages}" for n in range(1, pages + 1)]


def test_pptx_caps_slides_and_says_so() -> None:
    """Past MAX_SLIDES pages the pptx stops at MAX_SLIDES slides and the last one says why."""
    slides = pptx_slides(render("pptx", pages=MAX_SLIDES + 30))
    assert len(slides) == MAX_SLIDES
    assert f"Pages {MAX_SLIDES + 1} to {MAX_SLIDES + 30} are not listed" in slides[-1][1]


@pytest.mark.parametrize("output_format", FORMATS)
def test_documents_name_pages_in_singular_for_one_page(output_format: str) -> None:
    """A one-page source is described as '1 page', not '1 pages'."""
    text = all_text(output_format, render(output_format, pages=1))
    assert "(pdf, 1 page)" in text
    assert "Page 1 of 1" in text


@pytest.mark.parametrize("output_format", FORMATS)
@pytest.mark.parametrize("case", sorted(HOSTILE_NAMES))
def test_hostile_source_names_give_valid_documents(output_format: str, case: str) -> None:
    """Markup, non-ASCII and control characters in the name give a valid, readable document."""
    raw, shown = HOSTILE_NAMES[case]
    data = render(output_format, source_name=raw)
    check_package_structure(data)
    assert f"from {shown} (pdf, 3 pages)" in all_text(output_format, data)


@pytest.mark.parametrize("output_format", FORMATS)
def test_hostile_engine_and_language_are_escaped(output_format: str) -> None:
    """Engine, language and input format are escaped just like the source name."""
    data = render(output_format, engine="<e&>", language="'ja\"", input_format="p<d>f")
    check_package_structure(data)
    assert "(p<d>f, 3 pages) with engine <e&>, language 'ja\"." in all_text(output_format, data)


def test_xlsx_keeps_escape_lookalikes_literal() -> None:
    """A name containing '_x0041_' reads back literally, not as SpreadsheetML's escape for 'A'."""
    rows = xlsx_rows(render("xlsx", source_name="scan_x0041_.pdf"))
    assert rows[1] == ("Source", "scan_x0041_.pdf")


@pytest.mark.parametrize("output_format", FORMATS)
def test_long_names_are_capped(output_format: str) -> None:
    """A huge source name is cut to MAX_FIELD_CHARS so every cell and run stays in bounds."""
    data = render(output_format, source_name="x" * 100_000)
    text = all_text(output_format, data)
    assert "x" * (MAX_FIELD_CHARS - 3) + "..." in text
    assert "x" * MAX_FIELD_CHARS not in text


@pytest.mark.parametrize("output_format", FORMATS)
def test_package_structure_is_complete(output_format: str) -> None:
    """Every part is well-formed, has a content type, and every relationship target exists."""
    check_package_structure(render(output_format, pages=4))


def test_pptx_has_every_part_powerpoint_needs() -> None:
    """The pptx holds the presentation, master, layout, theme, props and one slide per page."""
    with zipfile.ZipFile(io.BytesIO(render("pptx", pages=2))) as archive:
        names = set(archive.namelist())
        presentation = archive.read("ppt/presentation.xml").decode()
    assert {
        "[Content_Types].xml",
        "_rels/.rels",
        "docProps/core.xml",
        "docProps/app.xml",
        "ppt/presentation.xml",
        "ppt/_rels/presentation.xml.rels",
        "ppt/slideMasters/slideMaster1.xml",
        "ppt/slideMasters/_rels/slideMaster1.xml.rels",
        "ppt/slideLayouts/slideLayout1.xml",
        "ppt/slideLayouts/_rels/slideLayout1.xml.rels",
        "ppt/theme/theme1.xml",
        "ppt/slides/slide1.xml",
        "ppt/slides/_rels/slide1.xml.rels",
        "ppt/slides/slide2.xml",
        "ppt/slides/_rels/slide2.xml.rels",
    } <= names
    for element in ("sldMasterIdLst", "sldIdLst", "sldSz", "notesSz"):
        assert f"<p:{element}" in presentation


@pytest.mark.parametrize("output_format", FORMATS)
def test_render_is_deterministic(output_format: str) -> None:
    """The same inputs give the same bytes; a different input gives different bytes."""
    first = render(output_format, source_name="scan.pdf")
    assert render(output_format, source_name="scan.pdf") == first
    assert render(output_format, source_name="other.pdf") != first


@pytest.mark.parametrize("output_format", FORMATS)
def test_zip_members_have_fixed_timestamps(output_format: str) -> None:
    """Every member is deflated and dated 1980-01-01, and [Content_Types].xml comes first."""
    with zipfile.ZipFile(io.BytesIO(render(output_format))) as archive:
        infos = archive.infolist()
    assert infos[0].filename == "[Content_Types].xml"
    assert {info.date_time for info in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {info.compress_type for info in infos} == {zipfile.ZIP_DEFLATED}


def test_unknown_output_format_is_refused() -> None:
    """An output format other than docx, xlsx or pptx raises ValueError."""
    with pytest.raises(ValueError, match="unknown output format 'pdf'"):
        render("pdf")


def test_zero_pages_is_refused() -> None:
    """A page count below one raises ValueError."""
    with pytest.raises(ValueError, match="at least one page"):
        render("docx", pages=0)


@pytest.mark.parametrize("output_format", FORMATS)
@settings(max_examples=25, deadline=None)
@given(name=st.text(max_size=40))
def test_any_text_gives_a_readable_document(output_format: str, name: str) -> None:
    """Any Unicode text as the source name gives a package whose parts all parse."""
    check_package_structure(render(output_format, source_name=name))


# --- LibreOffice, when it is installed ------------------------------------------------------

_SOFFICE = shutil.which("soffice")
_PDF_PAGE = re.compile(rb"/Type\s*/Page\b(?!s)")


@pytest.fixture(scope="module")
def soffice_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away LibreOffice user profile shared by this module's conversions."""
    return tmp_path_factory.mktemp("soffice-profile")


@pytest.mark.slow
# CI installs LibreOffice (.ci/run), so there a missing soffice fails instead of skipping.
@pytest.mark.skipif(
    _SOFFICE is None and not os.environ.get("CI"), reason="LibreOffice (soffice) is not installed"
)
@pytest.mark.parametrize("output_format", FORMATS)
def test_libreoffice_converts_to_pdf(
    output_format: str, soffice_profile: Path, tmp_path: Path
) -> None:
    """LibreOffice opens each format headlessly and exports a PDF (one page per slide)."""
    source = tmp_path / f"emulated.{output_format}"
    source.write_bytes(render(output_format, source_name="a&b<c>\"d'.pdf", pages=3))
    subprocess.run(
        [
            str(_SOFFICE),
            f"-env:UserInstallation={soffice_profile.as_uri()}",
            "--headless",
            "--convert-to",
            "pdf",
            "--outdir",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=100,
    )
    pdf = (tmp_path / "emulated.pdf").read_bytes()
    assert pdf.startswith(b"%PDF-")
    if output_format == "pptx":
        assert len(_PDF_PAGE.findall(pdf)) == 3
