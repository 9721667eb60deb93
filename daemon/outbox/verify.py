"""Check that a downloaded result is a valid OOXML package (docx, xlsx, pptx) of the right type.

The daemon runs ``verify_package`` on every file it fetches from the hub before it moves
the file to the outbox. It uses only the standard library and stays memory-flat for big
files: a big ZIP is read member by member in chunks (``testzip``), and the few XML parts
it looks at are parsed incrementally with expat, never read whole; a small package (up
to 1 MiB, as most are) is read once into memory and its members unpacked straight from
those bytes, each once (``_unpacked``). DTDs are refused, as the Open Packaging
Conventions forbid them, which also shuts out entity-expansion bombs.

A hostile (or broken) hub may send a small package that unpacks to gigabytes, or XML
nested millions deep. Before anything is inflated, the central directory's declared
sizes are held to limits (zipfile never inflates a member past its declared size):
``MAX_UNPACKED`` bytes in all, ``MAX_MEMBERS`` members, a compression ratio of
``MAX_RATIO`` per member larger than ``RATIO_FLOOR``; the XML parts are read up to
``MAX_XML_BYTES`` each and parsed to a depth of ``MAX_DEPTH``, where parsing stops. A
package over a limit raises ``OutputRefused``: the same output would break it again,
so the job fails at once rather than downloading it ``max_attempts`` times.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import posixpath
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO
from urllib.parse import unquote
from xml.parsers import expat

from daemon.errors import OoxmlProblem, OutputRefused

_CT_OFFICE = "application/vnd.openxmlformats-officedocument."

MAIN_CONTENT_TYPES: dict[str, str] = {
    "docx": _CT_OFFICE + "wordprocessingml.document.main+xml",
    "xlsx": _CT_OFFICE + "spreadsheetml.sheet.main+xml",
    "pptx": _CT_OFFICE + "presentationml.presentation.main+xml",
}
"""The content type of the main part of each format the daemon can ask for."""

_OTHER_KINDS: dict[str, str] = {
    "application/vnd.ms-word.document.macroEnabled.main+xml": "docm",
    _CT_OFFICE + "wordprocessingml.template.main+xml": "dotx",
    "application/vnd.ms-word.template.macroEnabledTemplate.main+xml": "dotm",
    "application/vnd.ms-excel.sheet.macroEnabled.main+xml": "xlsm",
    "application/vnd.ms-excel.sheet.binary.macroEnabled.main": "xlsb",
    _CT_OFFICE + "spreadsheetml.template.main+xml": "xltx",
    "application/vnd.ms-excel.template.macroEnabled.main+xml": "xltm",
    "application/vnd.ms-powerpoint.presentation.macroEnabled.main+xml": "pptm",
    _CT_OFFICE + "presentationml.slideshow.main+xml": "ppsx",
    _CT_OFFICE + "presentationml.template.main+xml": "potx",
}
_KIND_OF_TYPE = {ctype: kind for kind, ctype in MAIN_CONTENT_TYPES.items()} | _OTHER_KINDS

_ROOT_ELEMENTS = {"docx": "document", "xlsx": "workbook", "pptx": "presentation"}

_OFFICE_DOCUMENT_RELS = frozenset(
    {
        "http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument",
        "http://purl.oclc.org/ooxml/officeDocument/relationships/officeDocument",  # Strict
    }
)
_NS_CONTENT_TYPES = "http://schemas.openxmlformats.org/package/2006/content-types"
_NS_RELATIONSHIPS = "http://schemas.openxmlformats.org/package/2006/relationships"

_CONTENT_TYPES_PART = "[Content_Types].xml"
_ROOT_RELS_PART = "_rels/.rels"
_CHUNK = 64 * 1024
_IN_MEMORY = 1024 * 1024  # a package up to this size is read once, then checked in memory
_ZIP_MAGIC = b"PK\x03\x04"
_SMALL_UNPACKED = 16 * 1024 * 1024  # members of a small package unpacked in memory, at most
_LOCAL_HEADER = struct.Struct("<4s2xH18xHH")  # signature, flags, name and extra lengths
_UNSUPPORTED_FLAGS = 0x1 | 0x20 | 0x40  # encrypted, patched data, strong encryption
_PLAIN = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # the methods unpacked in memory
MiB = 1024 * 1024
MAX_UNPACKED = 512 * MiB  # declared uncompressed bytes of all members together
MAX_MEMBERS = 10_000
MAX_RATIO = 200  # uncompressed : compressed, per member larger than RATIO_FLOOR
RATIO_FLOOR = 1 * MiB  # a small member may compress better (an empty table, a blank image)
MAX_XML_BYTES = 256 * MiB  # bytes of one XML part fed to the parser
MAX_DEPTH = 256  # element nesting of an XML part (Office itself nests a few dozen deep)


# --- streaming XML ------------------------------------------------------------------------

StartHandler = Callable[[str, dict[str, str]], None]


def _refuse_dtd(*_args: object) -> None:
    """Expat handler: OPC forbids DTDs, and refusing them stops entity expansion."""
    raise OoxmlProblem("contains a DTD, which OOXML packages must not")


@dataclass(frozen=True)
class _Package:
    """An opened archive, with its members already unpacked when it is small."""

    archive: zipfile.ZipFile
    unpacked: dict[str, bytes] | None = None

    def open(self, name: str) -> IO[bytes]:
        """Member ``name`` for reading."""
        if self.unpacked is not None:
            return io.BytesIO(self.unpacked[name])
        return self.archive.open(name)


def _parse_part(package: _Package, name: str, on_start: StartHandler) -> None:
    """Stream part ``name`` through expat, calling ``on_start(tag, attributes)`` per element.

    Tags are "namespace-uri local-name" (or the bare local name outside any namespace).
    Parsing stops with ``OutputRefused`` past ``MAX_DEPTH`` or ``MAX_XML_BYTES``.
    """
    parser = expat.ParserCreate(namespace_separator=" ")
    parser.StartDoctypeDeclHandler = _refuse_dtd
    parser.EntityDeclHandler = _refuse_dtd
    depth = _Depth(name, on_start)
    parser.StartElementHandler = depth.start
    parser.EndElementHandler = depth.end
    try:
        with package.open(name) as stream:
            _feed(parser, stream, name)
    except OoxmlProblem as problem:
        raise OoxmlProblem(f"part {name} {problem}") from None
    except expat.ExpatError as error:
        raise OoxmlProblem(f"part {name} is not well-formed XML: {error}") from None


@dataclass
class _Depth:
    """Expat handlers that count element nesting and stop the parser past ``MAX_DEPTH``."""

    part: str
    on_start: StartHandler
    level: int = 0

    def start(self, tag: str, attributes: dict[str, str]) -> None:
        self.level += 1
        if self.level > MAX_DEPTH:  # raising in a handler stops expat at once
            raise OutputRefused(
                f"the hub's output nests XML elements more than {MAX_DEPTH} deep in part "
                f"{self.part} (an XML bomb); it was removed"
            )
        self.on_start(tag, attributes)

    def end(self, _tag: str) -> None:
        self.level -= 1


def _feed(parser: expat.XMLParserType, stream: IO[bytes], name: str) -> None:
    """Feed ``stream`` to ``parser`` in chunks (at most ``MAX_XML_BYTES``), then close
    the document."""
    fed = 0
    while chunk := stream.read(_CHUNK):
        fed += len(chunk)
        if fed > MAX_XML_BYTES:
            raise OutputRefused(
                f"the hub's output has an XML part {name} larger than "
                f"{MAX_XML_BYTES // MiB} MiB; it was removed"
            )
        parser.Parse(chunk, False)
    parser.Parse(b"", True)


def check_limits(infos: list[zipfile.ZipInfo]) -> None:
    """Raise ``OutputRefused`` when the declared members break a limit (pure: nothing
    is inflated): too many, too large together, or one compressed suspiciously well."""
    if len(infos) > MAX_MEMBERS:
        raise OutputRefused(
            f"the hub's output holds {len(infos)} files, more than {MAX_MEMBERS}; it was removed"
        )
    total = sum(info.file_size for info in infos)
    if total > MAX_UNPACKED:
        raise OutputRefused(
            f"the hub's output unpacks to {total / MiB:.0f} MiB, more than "
            f"{MAX_UNPACKED // MiB} MiB (a ZIP bomb?); it was removed"
        )
    for info in infos:
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_FLOOR and ratio > MAX_RATIO:
            raise OutputRefused(
                f"the hub's output has a member {info.filename} compressed {ratio:.0f}:1, "
                f"more than {MAX_RATIO}:1 (a ZIP bomb?); it was removed"
            )


# --- the package's parts ------------------------------------------------------------------


@dataclass
class _ContentTypes:
    """[Content_Types].xml: content types by extension and by part name (both lowercased)."""

    defaults: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)

    def on_start(self, tag: str, attributes: dict[str, str]) -> None:
        """Expat handler: record each Default and Override entry."""
        if tag == f"{_NS_CONTENT_TYPES} Default":
            extension = attributes.get("Extension", "").lower()
            self.defaults[extension] = attributes.get("ContentType", "")
        elif tag == f"{_NS_CONTENT_TYPES} Override":
            part = attributes.get("PartName", "").lower()
            self.overrides[part] = attributes.get("ContentType", "")

    def type_of(self, part: str) -> str | None:
        """The content type the package declares for ``part`` (a name without leading /)."""
        override = self.overrides.get("/" + part.lower())
        if override is not None:
            return override
        extension = posixpath.splitext(part)[1].lstrip(".").lower()
        return self.defaults.get(extension)


@dataclass
class _RootRelationships:
    """_rels/.rels: the targets of the officeDocument relationships, in order."""

    main_targets: list[str] = field(default_factory=list)
    external: bool = False

    def on_start(self, tag: str, attributes: dict[str, str]) -> None:
        """Expat handler: record each officeDocument relationship."""
        if tag != f"{_NS_RELATIONSHIPS} Relationship":
            return
        if attributes.get("Type") not in _OFFICE_DOCUMENT_RELS:
            return
        if attributes.get("TargetMode") == "External":
            self.external = True
        else:
            self.main_targets.append(attributes.get("Target", ""))


def _resolve_target(target: str) -> str:
    """A root relationship target as a ZIP member name: decoded, normalised, no leading /."""
    path = posixpath.normpath("/" + unquote(target).lstrip("/"))
    return path.lstrip("/")


class _Members:
    """The ZIP's member names, looked up case-insensitively as OPC part names are."""

    def __init__(self, archive: zipfile.ZipFile) -> None:
        self._by_lower = {name.lower(): name for name in archive.namelist()}

    def find(self, part: str) -> str | None:
        """The member that holds ``part``, or None."""
        return self._by_lower.get(part.lower())

    def require(self, part: str) -> str:
        """The member that holds ``part``; raise if the package lacks it."""
        member = self.find(part)
        if member is None:
            raise OoxmlProblem(f"missing part {part}")
        return member


# --- the checks ---------------------------------------------------------------------------


@contextlib.contextmanager
def _readable(path: pathlib.Path) -> Iterator[IO[bytes]]:
    """``path`` open for reading; a small one read at once into memory, since zipfile
    seeks and reads in small pieces (dozens of system calls for one package)."""
    try:
        with path.open("rb") as handle:
            if os.fstat(handle.fileno()).st_size > _IN_MEMORY:
                yield handle
                return
            data = handle.read()
    except OSError as error:
        raise OoxmlProblem(f"cannot read the file: {error.strerror or error}") from None
    yield io.BytesIO(data)


def _open_archive(source: IO[bytes]) -> zipfile.ZipFile:
    """Open ``source`` as a ZIP, naming the problem if it is no ZIP or a damaged one."""
    head = source.read(len(_ZIP_MAGIC))
    source.seek(0)
    try:
        return zipfile.ZipFile(source)
    except OSError as error:
        raise OoxmlProblem(f"cannot read the file: {error.strerror or error}") from None
    except NotImplementedError as error:  # a damaged version field reads as a newer ZIP
        raise OoxmlProblem(f"unsupported or damaged ZIP archive: {error}") from None
    except (zipfile.BadZipFile, ValueError, EOFError) as error:
        source.seek(0)
        if zipfile.is_zipfile(source):
            raise OoxmlProblem(f"damaged ZIP archive: {error}") from None
    if head == _ZIP_MAGIC:
        raise OoxmlProblem("truncated or damaged ZIP archive (no central directory)")
    raise OoxmlProblem("not a ZIP archive")


def _check_crcs(archive: zipfile.ZipFile) -> None:
    """Read every member in chunks so that damaged or undecodable data is caught now."""
    try:
        bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as error:
        # ValueError: a damaged member offset makes zipfile seek before the start
        raise OoxmlProblem(f"damaged ZIP archive: {error}") from None
    except NotImplementedError as error:  # e.g. Deflate64 or bzip2 variants zipfile lacks
        raise OoxmlProblem(f"unsupported ZIP compression: {error}") from None
    except RuntimeError as error:  # encrypted members
        raise OoxmlProblem(f"unreadable ZIP member: {error}") from None
    if bad is not None:
        raise OoxmlProblem(f"damaged ZIP archive: member {bad} fails its CRC or header check")


def _unpacked(archive: zipfile.ZipFile, data: bytes) -> dict[str, bytes] | None:
    """Every member of a small package, inflated and CRC-checked straight from ``data``;
    None when anything is unusual, and zipfile's own reader then checks the package and
    names the problem. zipfile builds a reader object per member read, which costs
    several times the inflating of the few KB most outputs hold."""
    infos = archive.infolist()
    if sum(info.file_size for info in infos) > _SMALL_UNPACKED:
        return None  # a ZIP bomb, or just big: streamed by zipfile instead
    unpacked = {}
    for info in infos:
        body = _member(data, info)
        if body is None:
            return None
        unpacked[info.filename] = body
    return unpacked


def _member(data: bytes, info: zipfile.ZipInfo) -> bytes | None:
    """One member's bytes, checked as zipfile checks them (local header, name, size, CRC),
    or None when it is anything but a plain stored or deflated member that checks out."""
    raw = _stored_bytes(data, info)
    if raw is None:
        return None
    body = raw
    if info.compress_type == zipfile.ZIP_DEFLATED:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            body = inflater.decompress(raw, info.file_size + 1)  # never more than declared
        except zlib.error:
            return None
    if len(body) != info.file_size or zlib.crc32(body) != info.CRC:
        return None
    return body


def _stored_bytes(data: bytes, info: zipfile.ZipInfo) -> bytes | None:
    """A member's bytes as stored, after its local header, which must agree with the
    central directory; None for anything unusual."""
    if info.flag_bits & _UNSUPPORTED_FLAGS or info.compress_type not in _PLAIN:
        return None
    start = info.header_offset + _LOCAL_HEADER.size
    if info.header_offset < 0 or start > len(data):
        return None
    magic, _flags, name_length, extra_length = _LOCAL_HEADER.unpack_from(data, info.header_offset)
    name = data[start : start + name_length]
    if magic != _ZIP_MAGIC or name != _encoded_name(info):
        return None
    start += name_length + extra_length
    raw = data[start : start + info.compress_size]
    return raw if len(raw) == info.compress_size else None


def _encoded_name(info: zipfile.ZipInfo) -> bytes | None:
    """The member name as the local header should hold it (as zipfile encodes it)."""
    try:
        return info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
    except UnicodeEncodeError:
        return None


def _main_part(package: _Package, members: _Members) -> str:
    """The main part's name, as _rels/.rels names it through the officeDocument relationship."""
    relationships = _RootRelationships()
    _parse_part(package, members.require(_ROOT_RELS_PART), relationships.on_start)
    if relationships.external:
        raise OoxmlProblem(f"{_ROOT_RELS_PART} points the main document outside the package")
    if not relationships.main_targets:
        raise OoxmlProblem(f"{_ROOT_RELS_PART} names no main document (officeDocument)")
    if len(relationships.main_targets) > 1:
        raise OoxmlProblem(f"{_ROOT_RELS_PART} names more than one main document")
    return _resolve_target(relationships.main_targets[0])


def _check_main_type(content_types: _ContentTypes, main_part: str, expected: str) -> None:
    """Raise unless [Content_Types].xml gives the main part the expected format's type."""
    declared = content_types.type_of(main_part)
    if declared == MAIN_CONTENT_TYPES[expected]:
        return
    if declared is None:
        raise OoxmlProblem(f"{_CONTENT_TYPES_PART} declares no content type for {main_part}")
    kind = _KIND_OF_TYPE.get(declared)
    if kind is not None:
        raise OoxmlProblem(f"is a {kind} package, expected {expected}")
    raise OoxmlProblem(f"main part {main_part} has content type {declared}, expected {expected}")


def _check_root_element(package: _Package, member: str, expected: str) -> None:
    """Parse the main part fully (streamed) and check its root element's name."""
    roots: list[str] = []

    def on_start(tag: str, _attributes: dict[str, str]) -> None:
        if not roots:
            roots.append(tag.rpartition(" ")[2])

    _parse_part(package, member, on_start)
    wanted = _ROOT_ELEMENTS[expected]
    if roots != [wanted]:
        found = roots[0] if roots else "nothing"
        raise OoxmlProblem(f"part {member} starts with <{found}>, expected <{wanted}>")


def _verify_archive(package: _Package, expected: str) -> None:
    """Run the package-level checks on an opened, CRC-checked archive."""
    members = _Members(package.archive)
    content_types = _ContentTypes()
    _parse_part(package, members.require(_CONTENT_TYPES_PART), content_types.on_start)
    main_part = _main_part(package, members)
    member = members.require(main_part)
    _check_main_type(content_types, main_part, expected)
    _check_root_element(package, member, expected)


def verify_package(path: pathlib.Path, expected_format: str) -> None:
    """Raise OoxmlProblem unless path is a readable OOXML package of expected_format;
    OutputRefused when it breaks a limit (a bomb)."""
    if expected_format not in MAIN_CONTENT_TYPES:
        raise ValueError(f"unknown format {expected_format!r}; expected docx, xlsx or pptx")
    with _readable(path) as source, _open_archive(source) as archive:
        check_limits(archive.infolist())
        # _readable hands a small package over in memory: unpack it from there
        in_memory = source.getvalue() if isinstance(source, io.BytesIO) else None
        package = _Package(archive, None if in_memory is None else _unpacked(archive, in_memory))
        if package.unpacked is None:
            _check_crcs(archive)
        _verify_archive(package, expected_format)
