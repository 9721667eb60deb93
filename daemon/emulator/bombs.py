"""Payloads that are small on the wire and huge when inflated, built without holding them.

The hostile-hub knobs need gzip bodies that inflate to a gibibyte and OOXML packages with a
member of gibibytes of zeros or an element chain ten million deep. Compressing that much
per answer would take seconds, so a payload is described as ``Run``s (a short pattern
repeated ``count`` times) and deflated by compressing one ~1 MiB unit of each pattern
once, ending it with a full flush (which byte-aligns the output and forgets the history),
and repeating those compressed bytes: concatenated full-flushed pieces form one valid
deflate stream. CRC-32s come from ``crc32_combine`` instead of a pass over the data, so a
4 GiB member costs milliseconds. ZIPs are written by hand because ``zipfile`` can only
store data it compresses itself; members over 4 GiB get ZIP64 extra fields.
"""

from __future__ import annotations

import functools
import io
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

_UNIT_BYTES = 1024 * 1024
_FINAL_BLOCK = b"\x03\x00"  # an empty final fixed-Huffman block: ends the deflate stream
_ZIP_TIME, _ZIP_DATE = 0, (0 << 9) | (1 << 5) | 1  # 1980-01-01 00:00, as documents.py writes
_ZIP32_MAX = 0xFFFFFFFF
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, no mtime

BOMB_PART = "customXml/ldx-bomb.bin"
"""The member of zeros that a "zeros" output bomb adds to a package."""

MAIN_PARTS = {
    "docx": "word/document.xml",
    "xlsx": "xl/workbook.xml",
    "pptx": "ppt/presentation.xml",
}
"""The part each package's root relationship names: every reader parses it first."""


@dataclass(frozen=True)
class Run:
    """``pattern`` repeated ``count`` times: a stretch of a payload."""

    pattern: bytes
    count: int = 1

    @property
    def size(self) -> int:
        """Uncompressed bytes."""
        return len(self.pattern) * self.count


# -- CRC-32 of data never held ---------------------------------------------------------------


def _gf2_times(matrix: Sequence[int], vector: int) -> int:
    total, row = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[row]
        vector >>= 1
        row += 1
    return total


def _gf2_square(matrix: Sequence[int]) -> list[int]:
    return [_gf2_times(matrix, matrix[n]) for n in range(32)]


@functools.cache
def _zero_operators() -> tuple[tuple[int, ...], ...]:
    """Operator ``k`` advances a CRC over 2**k zero bytes (zlib's crc32_combine, tabled)."""
    one_bit = [0xEDB88320] + [1 << n for n in range(31)]
    operator = _gf2_square(_gf2_square(_gf2_square(one_bit)))  # 8 bits: one byte
    operators = [tuple(operator)]
    for _ in range(63):
        operator = _gf2_square(operator)
        operators.append(tuple(operator))
    return tuple(operators)


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32 of A + B from crc(A), crc(B) and len(B)."""
    operators = _zero_operators()
    power = 0
    while length2:
        if length2 & 1:
            crc1 = _gf2_times(operators[power], crc1)
        length2 >>= 1
        power += 1
    return crc1 ^ crc2


@functools.lru_cache(maxsize=256)
def _repeated_crc(crc: int, length: int, times: int) -> int:
    """CRC-32 of a block (``crc``, ``length`` bytes) repeated ``times`` times, by doubling."""
    total = 0
    square, square_length = crc, length
    while times:
        if times & 1:
            total = crc32_combine(total, square, square_length)
        square = crc32_combine(square, square, square_length)
        square_length *= 2
        times >>= 1
    return total


def _unit_count(pattern: bytes) -> int:
    return max(1, _UNIT_BYTES // max(1, len(pattern)))


@functools.lru_cache(maxsize=64)
def _unit(pattern: bytes, count: int) -> tuple[bytes, int]:
    """``pattern * count`` deflated from a fresh state and full-flushed, and its CRC."""
    data = pattern * count
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -15)
    return squeeze.compress(data) + squeeze.flush(zlib.Z_FULL_FLUSH), zlib.crc32(data)


@dataclass(frozen=True)
class _Piece:
    """A compressed unit of a run, its CRC and plain length, and how often it repeats."""

    compressed: bytes
    crc: int
    length: int
    times: int


def _split(run: Run) -> list[_Piece]:
    """A run as pieces: its full units, then what is left over."""
    per_unit = _unit_count(run.pattern)
    full, rest = divmod(run.count, per_unit)
    pieces: list[_Piece] = []
    for count, times in ((per_unit, full), (rest, 1)):
        if count and times:
            compressed, crc = _unit(run.pattern, count)
            pieces.append(_Piece(compressed, crc, len(run.pattern) * count, times))
    return pieces


def runs_crc(runs: Iterable[Run]) -> int:
    """CRC-32 of the concatenated runs."""
    total = 0
    for run in runs:
        for piece in _split(run):
            repeated = _repeated_crc(piece.crc, piece.length, piece.times)
            total = crc32_combine(total, repeated, piece.length * piece.times)
    return total


def deflate_size(runs: Iterable[Run]) -> int:
    """Bytes of the raw deflate stream of the runs."""
    pieces = [piece for run in runs for piece in _split(run)]
    return len(_FINAL_BLOCK) + sum(len(piece.compressed) * piece.times for piece in pieces)


def deflate_chunks(runs: Iterable[Run]) -> Iterator[bytes]:
    """The raw deflate stream of the runs, in pieces of at most about a mebibyte."""
    for run in runs:
        for piece in _split(run):
            batch = max(1, _UNIT_BYTES // len(piece.compressed))
            for done in range(0, piece.times, batch):
                yield piece.compressed * min(batch, piece.times - done)
    yield _FINAL_BLOCK


def plain_chunks(runs: Iterable[Run]) -> Iterator[bytes]:
    """The runs uncompressed, in pieces of at most about a mebibyte."""
    for run in runs:
        per_chunk = _unit_count(run.pattern)
        block = run.pattern * min(per_chunk, run.count)
        for done in range(0, run.count, per_chunk):
            left = min(per_chunk, run.count - done)
            yield block if left == per_chunk else run.pattern * left


# -- gzip ------------------------------------------------------------------------------------


def gzip_size(runs: Sequence[Run]) -> int:
    """Bytes of ``gzip_chunks(runs)``: header, deflate stream, CRC and length."""
    return len(_GZIP_HEADER) + deflate_size(runs) + 8


def gzip_chunks(runs: Sequence[Run]) -> Iterator[bytes]:
    """A gzip member holding the runs, generated on the fly."""
    yield _GZIP_HEADER
    yield from deflate_chunks(runs)
    total = sum(run.size for run in runs)
    yield struct.pack("<II", runs_crc(runs), total & _ZIP32_MAX)


def gzip_bomb(size: int) -> list[Run]:
    """``size`` zero bytes: about a thousandth of that once gzipped."""
    return [Run(b"\0", size)]


# -- ZIP -------------------------------------------------------------------------------------


def _zip64_extra(sizes: tuple[int, int], offset: int | None) -> bytes:
    values = [*sizes] + ([offset] if offset is not None else [])
    return struct.pack("<HH", 1, 8 * len(values)) + struct.pack(f"<{len(values)}Q", *values)


def _local_header(name: bytes, crc: int, sizes: tuple[int, int]) -> bytes:
    """A local file header; sizes over 4 GiB go to a ZIP64 extra field."""
    big = max(sizes) >= _ZIP32_MAX
    extra = _zip64_extra(sizes, None) if big else b""
    stored = (_ZIP32_MAX, _ZIP32_MAX) if big else (sizes[1], sizes[0])
    return (
        struct.pack(
            "<IHHHHHIIIHH",
            0x04034B50,
            45 if big else 20,
            0,
            zipfile.ZIP_DEFLATED,
            _ZIP_TIME,
            _ZIP_DATE,
            crc,
            *stored,
            len(name),
            len(extra),
        )
        + name
        + extra
    )


def _central_header(name: bytes, crc: int, sizes: tuple[int, int], offset: int) -> bytes:
    big = max(sizes) >= _ZIP32_MAX
    extra = _zip64_extra(sizes, None) if big else b""
    stored = (_ZIP32_MAX, _ZIP32_MAX) if big else (sizes[1], sizes[0])
    version = 45 if big else 20
    return (
        struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            version,
            version,
            0,
            zipfile.ZIP_DEFLATED,
            _ZIP_TIME,
            _ZIP_DATE,
            crc,
            *stored,
            len(name),
            len(extra),
            0,
            0,
            0,
            0,
            offset,
        )
        + name
        + extra
    )


def write_zip(path: Path, members: Sequence[tuple[str, Sequence[Run]]]) -> int:
    """Write a ZIP of deflated members given as runs; return its size.

    The file is written as it is generated; its sizes are the true ones (``uncompressed``
    and ``compressed`` from the runs), with ZIP64 fields where a member passes 4 GiB.
    """
    central: list[bytes] = []
    with path.open("wb") as out:
        for name, runs in members:
            encoded = name.encode("utf-8")
            crc = runs_crc(runs)
            sizes = (sum(run.size for run in runs), deflate_size(runs))  # (plain, packed)
            offset = out.tell()
            out.write(_local_header(encoded, crc, sizes))
            for chunk in deflate_chunks(runs):
                out.write(chunk)
            central.append(_central_header(encoded, crc, sizes, offset))
        start = out.tell()
        directory = b"".join(central)
        out.write(directory)
        count = len(central)
        out.write(
            struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(directory), start, 0)
        )
        return out.tell()


# -- OOXML bombs -----------------------------------------------------------------------------


def _members(document: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(document)) as package:
        return [(info.filename, package.read(info)) for info in package.infolist()]


def zeros_bomb(document: bytes, size: int) -> list[tuple[str, Sequence[Run]]]:
    """The package plus a member of ``size`` zero bytes, declared in [Content_Types].xml."""
    bin_type = b'<Default Extension="bin" ContentType="application/octet-stream"/>'
    members: list[tuple[str, Sequence[Run]]] = []
    for name, data in _members(document):
        declared = data.replace(b"<Default ", bin_type + b"<Default ", 1)
        members.append((name, [Run(declared if name == "[Content_Types].xml" else data)]))
    members.append((BOMB_PART, [Run(b"\0", size)]))
    return members


def deep_xml_bomb(
    document: bytes, output_format: str, depth: int
) -> list[tuple[str, Sequence[Run]]]:
    """The package with ``depth`` nested elements just inside its main part's root."""
    main = MAIN_PARTS[output_format]
    members: list[tuple[str, Sequence[Run]]] = []
    for name, data in _members(document):
        if name != main:
            members.append((name, [Run(data)]))
            continue
        root = data.index(b"<", data.index(b"?>") + 2)
        inside = data.index(b">", root) + 1
        chain = [Run(b"<n>", depth), Run(b"</n>", depth)]
        members.append((name, [Run(data[:inside]), *chain, Run(data[inside:])]))
    return members
