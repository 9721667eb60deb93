"""Output documents of an emulated conversion: minimal, valid docx, xlsx and pptx packages.

The LDX hub emulator answers a conversion job with one of these documents. Each names the
source file, engine, language, input format and page count, and lists "Page N of M" per
page. They are built by hand from string templates and written with ``zipfile`` (no
third-party library, no lxml) so that thousands can be rendered quickly in benchmarks, and
they are byte-for-byte deterministic: fixed ZIP timestamps and a fixed member order.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

OUTPUT_FORMATS = ("docx", "xlsx", "pptx")

MAX_SLIDES = 50
"""A pptx gets one slide per page, up to this many; the last one says what was left out."""

MAX_LISTED_PAGES = 10_000
"""A docx or xlsx lists at most this many "Page N of M" lines, so a wild count stays cheap."""

MAX_FIELD_CHARS = 1_000
"""Longer user-supplied strings are cut to this length (Excel cells hold 32,767 chars)."""

APPLICATION = "LDX hub emulator"

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_CREATED = "2024-01-01T00:00:00Z"

# Characters XML 1.0 allows: tab, LF, CR, and the ranges below (no surrogates, no FFFE/FFFF).
_ILLEGAL_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_LINE_BREAKS = str.maketrans("\t\n\r", "   ")
# SpreadsheetML reads "_xHHHH_" as an escaped character; "_x005F_" keeps the "_" literal.
_XLSX_ESCAPE_LOOKALIKE = re.compile("_(?=x[0-9A-Fa-f]{4}_)")

_XML_HEAD = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
_NS_REL = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_NS_PKG_REL = "http://schemas.openxmlformats.org/package/2006/relationships"
_NS_W = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
_NS_S = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_NS_A = "http://schemas.openxmlformats.org/drawingml/2006/main"
_NS_P = "http://schemas.openxmlformats.org/presentationml/2006/main"
_NS_PML = f'xmlns:a="{_NS_A}" xmlns:r="{_NS_REL}" xmlns:p="{_NS_P}"'

_CT_OFFICE = "application/vnd.openxmlformats-officedocument."
_CT_CORE = "application/vnd.openxmlformats-package.core-properties+xml"
_CT_APP = _CT_OFFICE + "extended-properties+xml"
_REL_CORE = _NS_PKG_REL + "/metadata/core-properties"

Part = tuple[str, str]
"""A package part: its name inside the ZIP and its XML text."""


# --- the conversion being described -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Conversion:
    """What the document says, with every string already cleaned (but not yet escaped)."""

    source_name: str
    engine: str
    language: str
    input_format: str
    pages: int

    @property
    def summary(self) -> str:
        """The one sentence that names the source, format, page count, engine and language."""
        unit = "page" if self.pages == 1 else "pages"
        return (
            f"Converted by the LDX hub emulator from {self.source_name} "
            f"({self.input_format}, {self.pages} {unit}) "
            f"with engine {self.engine}, language {self.language}."
        )

    def page_line(self, number: int) -> str:
        """The line that stands for one page of the source."""
        return f"Page {number} of {self.pages}"

    def listed_pages(self, limit: int) -> range:
        """The page numbers that get their own line, slide or row."""
        return range(1, min(self.pages, limit) + 1)

    def omitted_note(self, limit: int) -> str | None:
        """Say which pages were left out when there are more than ``limit``, else None."""
        if self.pages <= limit:
            return None
        return f"Pages {limit + 1} to {self.pages} are not listed (at most {limit} are)."


def clean_text(text: str) -> str:
    """Drop characters XML 1.0 forbids, flatten line breaks and cap the length."""
    text = _ILLEGAL_XML.sub("", text).translate(_LINE_BREAKS)
    if len(text) > MAX_FIELD_CHARS:
        text = text[: MAX_FIELD_CHARS - 3] + "..."
    return text


def _esc(text: str) -> str:
    """Escape text for use in XML content and in attribute values."""
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&apos;")
    )


# --- parts every package has --------------------------------------------------------------


def _content_types(overrides: Iterable[tuple[str, str]]) -> str:
    """[Content_Types].xml: defaults for .rels and .xml plus one override per part."""
    items = "".join(
        f'<Override PartName="/{name}" ContentType="{ctype}"/>' for name, ctype in overrides
    )
    return (
        f"{_XML_HEAD}"
        '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" '
        'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/>'
        f"{items}</Types>"
    )


def _relationships(targets: Iterable[tuple[str, str]]) -> str:
    """A .rels part; ``targets`` are (relationship type, target) pairs, numbered rId1 on."""
    items = "".join(
        f'<Relationship Id="rId{index}" Type="{rtype}" Target="{target}"/>'
        for index, (rtype, target) in enumerate(targets, start=1)
    )
    return f'{_XML_HEAD}<Relationships xmlns="{_NS_PKG_REL}">{items}</Relationships>'


def _package_parts(conversion: _Conversion, main_part: str) -> list[Part]:
    """The root relationships and the core and extended document properties."""
    root_rels = _relationships(
        [
            (f"{_NS_REL}/officeDocument", main_part),
            (_REL_CORE, "docProps/core.xml"),
            (f"{_NS_REL}/extended-properties", "docProps/app.xml"),
        ]
    )
    core = (
        f"{_XML_HEAD}<cp:coreProperties "
        'xmlns:cp="http://schemas.openxmlformats.org/package/2006/metadata/core-properties" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:dcterms="http://purl.org/dc/terms/" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        f"<dc:title>{_esc(conversion.source_name)}</dc:title>"
        f"<dc:description>{_esc(conversion.summary)}</dc:description>"
        f"<dc:creator>{APPLICATION}</dc:creator>"
        f'<dcterms:created xsi:type="dcterms:W3CDTF">{_CREATED}</dcterms:created>'
        f'<dcterms:modified xsi:type="dcterms:W3CDTF">{_CREATED}</dcterms:modified>'
        "</cp:coreProperties>"
    )
    app = (
        f"{_XML_HEAD}<Properties xmlns="
        '"http://schemas.openxmlformats.org/officeDocument/2006/extended-properties">'
        f"<Application>{APPLICATION}</Application></Properties>"
    )
    return [("_rels/.rels", root_rels), ("docProps/core.xml", core), ("docProps/app.xml", app)]


_PROPERTY_TYPES = [("docProps/core.xml", _CT_CORE), ("docProps/app.xml", _CT_APP)]


# --- docx ---------------------------------------------------------------------------------

_DOCX_STYLES = (
    f'{_XML_HEAD}<w:styles xmlns:w="{_NS_W}">'
    "<w:docDefaults><w:rPrDefault><w:rPr>"
    '<w:rFonts w:ascii="Calibri" w:hAnsi="Calibri" w:cs="Calibri"/>'
    '<w:sz w:val="22"/><w:szCs w:val="22"/></w:rPr></w:rPrDefault>'
    '<w:pPrDefault><w:pPr><w:spacing w:after="160" w:line="259" w:lineRule="auto"/>'
    "</w:pPr></w:pPrDefault></w:docDefaults>"
    '<w:style w:type="paragraph" w:default="1" w:styleId="Normal">'
    '<w:name w:val="Normal"/><w:qFormat/></w:style>'
    '<w:style w:type="paragraph" w:styleId="Title"><w:name w:val="Title"/>'
    '<w:basedOn w:val="Normal"/><w:next w:val="Normal"/><w:qFormat/>'
    '<w:rPr><w:b/><w:sz w:val="36"/><w:szCs w:val="36"/></w:rPr></w:style>'
    "</w:styles>"
)

_DOCX_SECTION = (
    '<w:sectPr><w:pgSz w:w="11906" w:h="16838"/>'
    '<w:pgMar w:top="1440" w:right="1440" w:bottom="1440" w:left="1440" '
    'w:header="708" w:footer="708" w:gutter="0"/></w:sectPr>'
)


def _docx_paragraph(text: str, style: str | None = None) -> str:
    """One w:p holding ``text`` in a single run."""
    props = f'<w:pPr><w:pStyle w:val="{style}"/></w:pPr>' if style else ""
    return f'<w:p>{props}<w:r><w:t xml:space="preserve">{_esc(text)}</w:t></w:r></w:p>'


def _docx_parts(conversion: _Conversion) -> list[Part]:
    """word/document.xml with a title, the summary and one paragraph per page."""
    lines = [conversion.summary]
    lines += [conversion.page_line(n) for n in conversion.listed_pages(MAX_LISTED_PAGES)]
    note = conversion.omitted_note(MAX_LISTED_PAGES)
    lines += [note] if note else []
    body = _docx_paragraph(f"Conversion of {conversion.source_name}", "Title")
    body += "".join(_docx_paragraph(line) for line in lines)
    document = (
        f'{_XML_HEAD}<w:document xmlns:w="{_NS_W}" xmlns:r="{_NS_REL}">'
        f"<w:body>{body}{_DOCX_SECTION}</w:body></w:document>"
    )
    document_rels = _relationships([(f"{_NS_REL}/styles", "styles.xml")])
    word = _CT_OFFICE + "wordprocessingml."
    types = _content_types(
        [
            ("word/document.xml", word + "document.main+xml"),
            ("word/styles.xml", word + "styles+xml"),
            *_PROPERTY_TYPES,
        ]
    )
    return [
        ("[Content_Types].xml", types),
        *_package_parts(conversion, "word/document.xml"),
        ("word/document.xml", document),
        ("word/_rels/document.xml.rels", document_rels),
        ("word/styles.xml", _DOCX_STYLES),
    ]


# --- xlsx ---------------------------------------------------------------------------------

_XLSX_STYLES = (
    f'{_XML_HEAD}<styleSheet xmlns="{_NS_S}">'
    '<fonts count="1"><font><sz val="11"/><name val="Calibri"/><family val="2"/></font></fonts>'
    '<fills count="2"><fill><patternFill patternType="none"/></fill>'
    '<fill><patternFill patternType="gray125"/></fill></fills>'
    '<borders count="1"><border><left/><right/><top/><bottom/><diagonal/></border></borders>'
    '<cellStyleXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0"/></cellStyleXfs>'
    '<cellXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0"/></cellXfs>'
    '<cellStyles count="1"><cellStyle name="Normal" xfId="0" builtinId="0"/></cellStyles>'
    "</styleSheet>"
)

_XLSX_WORKBOOK = (
    f'{_XML_HEAD}<workbook xmlns="{_NS_S}" xmlns:r="{_NS_REL}">'
    '<sheets><sheet name="Conversion" sheetId="1" r:id="rId1"/></sheets></workbook>'
)

Cell = str | int
"""A cell value: text goes to the shared strings, a number is written in place."""


def _xlsx_rows(conversion: _Conversion) -> list[tuple[Cell, ...]]:
    """The sheet's rows: the summary, a field/value table, then one row per page."""
    rows: list[tuple[Cell, ...]] = [
        (conversion.summary,),
        ("Source", conversion.source_name),
        ("Engine", conversion.engine),
        ("Language", conversion.language),
        ("Input format", conversion.input_format),
        ("Pages", conversion.pages),
    ]
    rows += [(conversion.page_line(n),) for n in conversion.listed_pages(MAX_LISTED_PAGES)]
    note = conversion.omitted_note(MAX_LISTED_PAGES)
    rows += [(note,)] if note else []
    return rows


def _xlsx_sheet(rows: Sequence[tuple[Cell, ...]], strings: list[str]) -> str:
    """sheet1.xml for ``rows``; appends each text cell's string to ``strings``."""
    out: list[str] = []
    for row_number, row in enumerate(rows, start=1):
        cells = []
        for column, value in zip("AB", row, strict=False):
            ref = f"{column}{row_number}"
            if isinstance(value, int):
                cells.append(f'<c r="{ref}"><v>{value}</v></c>')
            else:
                cells.append(f'<c r="{ref}" t="s"><v>{len(strings)}</v></c>')
                strings.append(value)
        out.append(f'<row r="{row_number}">{"".join(cells)}</row>')
    return (
        f'{_XML_HEAD}<worksheet xmlns="{_NS_S}" xmlns:r="{_NS_REL}">'
        f'<dimension ref="A1:B{len(rows)}"/>'
        '<cols><col min="1" max="1" width="16" customWidth="1"/>'
        '<col min="2" max="2" width="60" customWidth="1"/></cols>'
        f"<sheetData>{''.join(out)}</sheetData></worksheet>"
    )


def _xlsx_shared_strings(strings: Sequence[str]) -> str:
    """sharedStrings.xml, one entry per text cell in order (duplicates are allowed)."""
    items = "".join(
        f'<si><t xml:space="preserve">{_esc(_XLSX_ESCAPE_LOOKALIKE.sub("_x005F_", s))}</t></si>'
        for s in strings
    )
    count = len(strings)
    return f'{_XML_HEAD}<sst xmlns="{_NS_S}" count="{count}" uniqueCount="{count}">{items}</sst>'


def _xlsx_parts(conversion: _Conversion) -> list[Part]:
    """A workbook with one worksheet, shared strings and a minimal style sheet."""
    strings: list[str] = []
    sheet = _xlsx_sheet(_xlsx_rows(conversion), strings)
    workbook_rels = _relationships(
        [
            (f"{_NS_REL}/worksheet", "worksheets/sheet1.xml"),
            (f"{_NS_REL}/styles", "styles.xml"),
            (f"{_NS_REL}/sharedStrings", "sharedStrings.xml"),
        ]
    )
    sml = _CT_OFFICE + "spreadsheetml."
    types = _content_types(
        [
            ("xl/workbook.xml", sml + "sheet.main+xml"),
            ("xl/worksheets/sheet1.xml", sml + "worksheet+xml"),
            ("xl/styles.xml", sml + "styles+xml"),
            ("xl/sharedStrings.xml", sml + "sharedStrings+xml"),
            *_PROPERTY_TYPES,
        ]
    )
    return [
        ("[Content_Types].xml", types),
        *_package_parts(conversion, "xl/workbook.xml"),
        ("xl/workbook.xml", _XLSX_WORKBOOK),
        ("xl/_rels/workbook.xml.rels", workbook_rels),
        ("xl/worksheets/sheet1.xml", sheet),
        ("xl/styles.xml", _XLSX_STYLES),
        ("xl/sharedStrings.xml", _xlsx_shared_strings(strings)),
    ]


# --- pptx ---------------------------------------------------------------------------------

_SLIDE_WIDTH, _SLIDE_HEIGHT = 12192000, 6858000  # 16:9, 13.333 x 7.5 inches
_TITLE_BOX = (838200, 365125, 10515600, 1325563)
_BODY_BOX = (838200, 1825625, 10515600, 4351338)

_GROUP_HEADER = (
    '<p:nvGrpSpPr><p:cNvPr id="1" name=""/><p:cNvGrpSpPr/><p:nvPr/></p:nvGrpSpPr>'
    '<p:grpSpPr><a:xfrm><a:off x="0" y="0"/><a:ext cx="0" cy="0"/>'
    '<a:chOff x="0" y="0"/><a:chExt cx="0" cy="0"/></a:xfrm></p:grpSpPr>'
)
_MASTER_MAPPING = "<p:clrMapOvr><a:masterClrMapping/></p:clrMapOvr>"


def _pptx_xfrm(box: tuple[int, int, int, int]) -> str:
    """A shape position and size in EMU."""
    x, y, cx, cy = box
    return f'<a:xfrm><a:off x="{x}" y="{y}"/><a:ext cx="{cx}" cy="{cy}"/></a:xfrm>'


def _pptx_placeholder(
    shape_id: int, name: str, ph: str, paragraphs: Sequence[str], box: str = ""
) -> str:
    """A placeholder p:sp; ``ph`` is the p:ph attributes, ``box`` an optional a:xfrm."""
    runs = "".join(
        f'<a:p><a:r><a:rPr lang="en-US" dirty="0"/><a:t>{_esc(text)}</a:t></a:r></a:p>'
        for text in paragraphs
    )
    return (
        f'<p:sp><p:nvSpPr><p:cNvPr id="{shape_id}" name="{name}"/>'
        '<p:cNvSpPr><a:spLocks noGrp="1"/></p:cNvSpPr>'
        f"<p:nvPr><p:ph {ph}/></p:nvPr></p:nvSpPr><p:spPr>{box}</p:spPr>"
        f"<p:txBody><a:bodyPr/><a:lstStyle/>{runs or '<a:p/>'}</p:txBody></p:sp>"
    )


def _text_level(size: int, font: str) -> str:
    """A level-1 paragraph style: no bullet, ``size`` hundredths of a point, theme font."""
    return (
        '<a:lvl1pPr marL="0" indent="0"><a:buNone/>'
        f'<a:defRPr sz="{size}"><a:solidFill><a:schemeClr val="tx1"/></a:solidFill>'
        f'<a:latin typeface="+{font}-lt"/><a:ea typeface="+{font}-ea"/>'
        f'<a:cs typeface="+{font}-cs"/></a:defRPr></a:lvl1pPr>'
    )


_PPTX_MASTER = (
    f"{_XML_HEAD}<p:sldMaster {_NS_PML}><p:cSld>"
    '<p:bg><p:bgRef idx="1001"><a:schemeClr val="bg1"/></p:bgRef></p:bg>'
    f"<p:spTree>{_GROUP_HEADER}"
    + _pptx_placeholder(2, "Title Placeholder 1", 'type="title"', [], _pptx_xfrm(_TITLE_BOX))
    + _pptx_placeholder(3, "Text Placeholder 2", 'type="body" idx="1"', [], _pptx_xfrm(_BODY_BOX))
    + "</p:spTree></p:cSld>"
    '<p:clrMap bg1="lt1" tx1="dk1" bg2="lt2" tx2="dk2" accent1="accent1" accent2="accent2" '
    'accent3="accent3" accent4="accent4" accent5="accent5" accent6="accent6" '
    'hlink="hlink" folHlink="folHlink"/>'
    '<p:sldLayoutIdLst><p:sldLayoutId id="2147483649" r:id="rId1"/></p:sldLayoutIdLst>'
    f"<p:txStyles><p:titleStyle>{_text_level(4000, 'mj')}</p:titleStyle>"
    f"<p:bodyStyle>{_text_level(2000, 'mn')}</p:bodyStyle>"
    f"<p:otherStyle>{_text_level(1800, 'mn')}</p:otherStyle></p:txStyles>"
    "</p:sldMaster>"
)

_PPTX_LAYOUT = (
    f'{_XML_HEAD}<p:sldLayout {_NS_PML} type="obj" preserve="1">'
    f'<p:cSld name="Title and Content"><p:spTree>{_GROUP_HEADER}'
    + _pptx_placeholder(2, "Title 1", 'type="title"', [])
    + _pptx_placeholder(3, "Content Placeholder 2", 'idx="1"', [])
    + f"</p:spTree></p:cSld>{_MASTER_MAPPING}</p:sldLayout>"
)


def _scheme_color(name: str, value: str) -> str:
    """One theme colour slot with an sRGB value."""
    return f'<a:{name}><a:srgbClr val="{value}"/></a:{name}>'


_SOLID_PH = '<a:solidFill><a:schemeClr val="phClr"/></a:solidFill>'
_ACCENTS = ("4472C4", "ED7D31", "A5A5A5", "FFC000", "5B9BD5", "70AD47")

_PPTX_THEME = (
    f'{_XML_HEAD}<a:theme xmlns:a="{_NS_A}" name="Office Theme"><a:themeElements>'
    '<a:clrScheme name="Office">'
    '<a:dk1><a:sysClr val="windowText" lastClr="000000"/></a:dk1>'
    '<a:lt1><a:sysClr val="window" lastClr="FFFFFF"/></a:lt1>'
    + _scheme_color("dk2", "44546A")
    + _scheme_color("lt2", "E7E6E6")
    + "".join(_scheme_color(f"accent{i}", rgb) for i, rgb in enumerate(_ACCENTS, start=1))
    + _scheme_color("hlink", "0563C1")
    + _scheme_color("folHlink", "954F72")
    + "</a:clrScheme>"
    '<a:fontScheme name="Office">'
    '<a:majorFont><a:latin typeface="Calibri Light"/><a:ea typeface=""/><a:cs typeface=""/>'
    "</a:majorFont>"
    '<a:minorFont><a:latin typeface="Calibri"/><a:ea typeface=""/><a:cs typeface=""/>'
    "</a:minorFont></a:fontScheme>"
    '<a:fmtScheme name="Office">'
    f"<a:fillStyleLst>{_SOLID_PH * 3}</a:fillStyleLst>"
    "<a:lnStyleLst>"
    + "".join(f'<a:ln w="{w}">{_SOLID_PH}</a:ln>' for w in (6350, 12700, 19050))
    + "</a:lnStyleLst>"
    f"<a:effectStyleLst>{'<a:effectStyle><a:effectLst/></a:effectStyle>' * 3}</a:effectStyleLst>"
    f"<a:bgFillStyleLst>{_SOLID_PH * 3}</a:bgFillStyleLst>"
    "</a:fmtScheme></a:themeElements><a:objectDefaults/><a:extraClrSchemeLst/></a:theme>"
)

_PPTX_PRES_PROPS = f"{_XML_HEAD}<p:presentationPr {_NS_PML}/>"
_PPTX_VIEW_PROPS = (
    f"{_XML_HEAD}<p:viewPr {_NS_PML}>"
    '<p:normalViewPr><p:restoredLeft sz="15620"/><p:restoredTop sz="94660"/></p:normalViewPr>'
    '<p:gridSpacing cx="76200" cy="76200"/></p:viewPr>'
)
_PPTX_TABLE_STYLES = (
    f'{_XML_HEAD}<a:tblStyleLst xmlns:a="{_NS_A}" def="{{5C22544A-7EE6-4342-B048-85BDC9FD1C3A}}"/>'
)


def _pptx_slide(conversion: _Conversion, number: int) -> str:
    """One slide: "Page N of M" as its title, the summary and the details as its body."""
    body = [
        conversion.summary,
        f"Source: {conversion.source_name}",
        f"Engine: {conversion.engine}",
        f"Language: {conversion.language}",
        f"Input format: {conversion.input_format}",
    ]
    note = conversion.omitted_note(MAX_SLIDES) if number == MAX_SLIDES else None
    body += [note] if note else []
    title = _pptx_placeholder(2, "Title 1", 'type="title"', [conversion.page_line(number)])
    content = _pptx_placeholder(3, "Content Placeholder 2", 'idx="1"', body)
    return (
        f"{_XML_HEAD}<p:sld {_NS_PML}><p:cSld><p:spTree>{_GROUP_HEADER}{title}{content}"
        f"</p:spTree></p:cSld>{_MASTER_MAPPING}</p:sld>"
    )


def _pptx_presentation(slide_count: int) -> str:
    """ppt/presentation.xml: the master, the slides (rId2 on) and the slide size."""
    slides = "".join(
        f'<p:sldId id="{255 + n}" r:id="rId{n + 1}"/>' for n in range(1, slide_count + 1)
    )
    return (
        f'{_XML_HEAD}<p:presentation {_NS_PML} saveSubsetFonts="1">'
        '<p:sldMasterIdLst><p:sldMasterId id="2147483648" r:id="rId1"/></p:sldMasterIdLst>'
        f"<p:sldIdLst>{slides}</p:sldIdLst>"
        f'<p:sldSz cx="{_SLIDE_WIDTH}" cy="{_SLIDE_HEIGHT}"/>'
        '<p:notesSz cx="6858000" cy="9144000"/></p:presentation>'
    )


def _pptx_parts(conversion: _Conversion) -> list[Part]:
    """A presentation with one master, one layout, a theme and one slide per page."""
    numbers = conversion.listed_pages(MAX_SLIDES)
    slide_names = [f"ppt/slides/slide{n}.xml" for n in numbers]
    presentation_rels = _relationships(
        [
            (f"{_NS_REL}/slideMaster", "slideMasters/slideMaster1.xml"),
            *((f"{_NS_REL}/slide", name.removeprefix("ppt/")) for name in slide_names),
            (f"{_NS_REL}/presProps", "presProps.xml"),
            (f"{_NS_REL}/viewProps", "viewProps.xml"),
            (f"{_NS_REL}/theme", "theme/theme1.xml"),
            (f"{_NS_REL}/tableStyles", "tableStyles.xml"),
        ]
    )
    layout_rel = _relationships([(f"{_NS_REL}/slideLayout", "../slideLayouts/slideLayout1.xml")])
    pml = _CT_OFFICE + "presentationml."
    types = _content_types(
        [
            ("ppt/presentation.xml", pml + "presentation.main+xml"),
            ("ppt/slideMasters/slideMaster1.xml", pml + "slideMaster+xml"),
            ("ppt/slideLayouts/slideLayout1.xml", pml + "slideLayout+xml"),
            *((name, pml + "slide+xml") for name in slide_names),
            ("ppt/theme/theme1.xml", _CT_OFFICE + "theme+xml"),
            ("ppt/presProps.xml", pml + "presProps+xml"),
            ("ppt/viewProps.xml", pml + "viewProps+xml"),
            ("ppt/tableStyles.xml", pml + "tableStyles+xml"),
            *_PROPERTY_TYPES,
        ]
    )
    master_rels = _relationships(
        [
            (f"{_NS_REL}/slideLayout", "../slideLayouts/slideLayout1.xml"),
            (f"{_NS_REL}/theme", "../theme/theme1.xml"),
        ]
    )
    slides: list[Part] = []
    for number, name in zip(numbers, slide_names, strict=True):
        slides.append((name, _pptx_slide(conversion, number)))
        slides.append((name.replace("slides/", "slides/_rels/") + ".rels", layout_rel))
    return [
        ("[Content_Types].xml", types),
        *_package_parts(conversion, "ppt/presentation.xml"),
        ("ppt/presentation.xml", _pptx_presentation(len(slide_names))),
        ("ppt/_rels/presentation.xml.rels", presentation_rels),
        ("ppt/slideMasters/slideMaster1.xml", _PPTX_MASTER),
        ("ppt/slideMasters/_rels/slideMaster1.xml.rels", master_rels),
        ("ppt/slideLayouts/slideLayout1.xml", _PPTX_LAYOUT),
        (
            "ppt/slideLayouts/_rels/slideLayout1.xml.rels",
            _relationships([(f"{_NS_REL}/slideMaster", "../slideMasters/slideMaster1.xml")]),
        ),
        *slides,
        ("ppt/theme/theme1.xml", _PPTX_THEME),
        ("ppt/presProps.xml", _PPTX_PRES_PROPS),
        ("ppt/viewProps.xml", _PPTX_VIEW_PROPS),
        ("ppt/tableStyles.xml", _PPTX_TABLE_STYLES),
    ]


# --- assembly -----------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[[_Conversion], list[Part]]] = {
    "docx": _docx_parts,
    "xlsx": _xlsx_parts,
    "pptx": _pptx_parts,
}


def _zip(parts: Sequence[Part]) -> bytes:
    """Deflate ``parts`` into a ZIP in the given order, with fixed timestamps."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in parts:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 0  # MS-DOS, as Office writes it, on every platform
            archive.writestr(info, text.encode("utf-8"))
    return buffer.getvalue()


PADDING_PART = "customXml/ldx-padding.bin"
"""The stored part that pads an output to the emulator's ``output_size``."""

_PAD_CHUNK = 1024 * 1024


def write_package(path: Path, document: bytes, size: int = 0) -> int:
    """Write ``document`` to ``path``, padded to at least ``size`` bytes; return the size.

    Padding (for benchmarks of big downloads) is one stored part of zeros, declared in
    ``[Content_Types].xml`` so that the package stays valid; it is written in pieces, so
    a 190 MB output costs no memory.
    """
    if size <= len(document):
        path.write_bytes(document)
        return len(document)
    with zipfile.ZipFile(io.BytesIO(document)) as source, zipfile.ZipFile(path, "w") as out:
        for info in source.infolist():
            data = source.read(info)
            if info.filename == "[Content_Types].xml":
                data = data.replace(b"<Default ", _BIN_DEFAULT + b"<Default ", 1)
            out.writestr(info, data)
        _write_padding(out, size - path.stat().st_size - 256)
    return path.stat().st_size


_BIN_DEFAULT = b'<Default Extension="bin" ContentType="application/octet-stream"/>'


def _write_padding(archive: zipfile.ZipFile, length: int) -> None:
    info = zipfile.ZipInfo(PADDING_PART, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = max(0, length)
    zeros = bytes(_PAD_CHUNK)
    with archive.open(info, "w", force_zip64=True) as part:
        left = max(0, length)
        while left > 0:
            part.write(zeros[: min(left, _PAD_CHUNK)])
            left -= _PAD_CHUNK


def render_document(
    output_format: str,
    *,
    source_name: str,
    engine: str,
    language: str,
    pages: int,
    input_format: str,
) -> bytes:
    """Return a valid docx/xlsx/pptx package describing the emulated conversion."""
    builder = _BUILDERS.get(output_format)
    if builder is None:
        raise ValueError(f"unknown output format {output_format!r}; expected docx, xlsx or pptx")
    if pages < 1:
        raise ValueError(f"a conversion has at least one page, got {pages}")
    conversion = _Conversion(
        source_name=clean_text(source_name),
        engine=clean_text(engine),
        language=clean_text(language),
        input_format=clean_text(input_format),
        pages=pages,
    )
    return _zip(builder(conversion))
