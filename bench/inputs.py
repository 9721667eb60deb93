"""Bench inputs: unique, valid scans of about a given size, and ways to drop them.

Every input differs (pseudo-random pixels or a random PDF comment), so ``on_duplicate``
never short-cuts a conversion. Formats rotate through PDF, TIFF, JPEG, PNG and BMP. A
corpus is made once per bench invocation and copied (never hard-linked: the daemon
refuses files with several links) into each run's staging folder; a drop renames the
staged files into the inbox, which is atomic per file and as fast as a scanner can be.
"""

from __future__ import annotations

import io
import os
import random
import shutil
from pathlib import Path

from PIL import Image

from tests.scans import make_pdf

FORMATS = ("pdf", "tiff", "jpeg", "png", "bmp")
SUFFIX = {"pdf": ".pdf", "tiff": ".tif", "jpeg": ".jpg", "png": ".png", "bmp": ".bmp"}


def make_input(fmt: str, seed: int, size: int = 100_000) -> bytes:
    """A valid ``fmt`` file of roughly ``size`` bytes, unique per seed."""
    rng = random.Random(seed)
    if fmt == "pdf":
        return make_pdf(1, marker=rng.randbytes(max(16, size // 2 - 400)).hex())
    side = max(8, int((size * (4.0 if fmt == "jpeg" else 1.0)) ** 0.5))
    image = Image.frombytes("L", (side, side), rng.randbytes(side * side))
    buffer = io.BytesIO()
    options = {"png": {"compress_level": 0}, "jpeg": {"quality": 45}}.get(fmt, {})
    image.save(buffer, {"tiff": "TIFF", "jpeg": "JPEG", "png": "PNG", "bmp": "BMP"}[fmt], **options)
    return buffer.getvalue()


def rel_name(index: int, folders: int = 8) -> str:
    """Where input ``index`` goes, relative to the inbox (a few folders, like scanners)."""
    fmt = FORMATS[index % len(FORMATS)]
    return f"scanner-{index % folders}/scan-{index:06d}{SUFFIX[fmt]}"


def make_corpus(root: Path, count: int, size: int = 100_000, seed: int = 1) -> list[str]:
    """Write ``count`` inputs under ``root`` (reused when already there); their paths."""
    names = [rel_name(i) for i in range(count)]
    marker = root / f".complete-{count}-{size}-{seed}"
    if marker.exists():
        return names
    for index, rel in enumerate(names):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = FORMATS[index % len(FORMATS)]
        path.write_bytes(make_input(fmt, seed * 1_000_000 + index, size))
    marker.touch()
    return names


def stage(corpus: Path, names: list[str], staging: Path) -> None:
    """Copy the corpus into ``staging`` (same filesystem as the inbox)."""
    for rel in names:
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(corpus / rel, target)


def make_folders(inbox: Path, names: list[str]) -> None:
    """Create the inbox folders the inputs go to (before the daemon starts watching)."""
    for folder in {str(Path(rel).parent) for rel in names}:
        (inbox / folder).mkdir(parents=True, exist_ok=True)


def drop(staging: Path, names: list[str], inbox: Path) -> None:
    """Move the staged inputs into the inbox, one rename each."""
    for rel in names:
        os.rename(staging / rel, inbox / rel)


def write_big_pdf(path: Path, size: int, seed: int = 7) -> None:
    """A valid one-page PDF of ``size`` bytes, written in pieces (flat memory).

    The bulk is comment lines of random hex, before the objects, so the cross-reference
    offsets stay right and a page counter still finds the one page.
    """
    rng = random.Random(seed)
    tail = make_pdf(1, marker="big")
    head, _, rest = tail.partition(b"\n%big\n")
    line = 64 * 1024
    with path.open("wb") as out:
        out.write(head + b"\n")
        padding = max(0, size - len(tail) - 1)
        while padding > 0:
            piece = min(line, padding)
            out.write(b"%" + rng.randbytes(piece).hex().encode()[: piece - 2] + b"\n")
            padding -= piece
        out.write(b"%big\n")
        offset = out.tell()
    # make_pdf's offsets assume the objects start right after its header; rebuild them.
    _append_objects(path, offset, rest)


def _append_objects(path: Path, offset: int, objects_and_xref: bytes) -> None:
    body, _, _ = objects_and_xref.partition(b"xref\n")
    starts = []
    position = 0
    while True:
        found = body.find(b" 0 obj\n", position)
        if found < 0:
            break
        line_start = body.rfind(b"\n", 0, found) + 1
        starts.append(offset + line_start)
        position = found + 1
    xref = offset + len(body)
    table = [f"xref\n0 {len(starts) + 1}\n0000000000 65535 f \n".encode()]
    table += [f"{start:010d} 00000 n \n".encode() for start in starts]
    trailer = f"trailer\n<< /Size {len(starts) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
    with path.open("ab") as out:
        out.write(body)
        out.write(b"".join(table) + trailer.encode())
