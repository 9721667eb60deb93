"""Layout: where an input's output and error file go in the outbox (pure functions).

``inbox/a/b/scan.pdf`` becomes ``outbox/a/b/scan.docx``. When two inputs of one folder
would map to the same output (``scan.pdf`` and ``scan.png``), the first to enter the
queue keeps ``scan.docx`` and the later one gets its own extension kept,
``scan.png.docx``; should that be taken too, `` (2)``, `` (3)``... are appended. A new
version of the same input path reuses its own earlier output name. The claim is
recorded in the state table, so the rule is deterministic and one input's output never
overwrites another's.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count
from pathlib import PurePosixPath

from daemon.formats import EXTENSIONS, InputFormat

NAME_MAX_BYTES = 255
ERROR_SUFFIX = ".error.txt"
TEMP_MARKER = ".ldx-part-"
UPLOAD_MARKER = ".ldx-"
UPLOAD_TAG_HEX = 16  # 64 bits of the content hash


def output_candidates(rel_input: str, output_format: str) -> Iterator[str]:
    """Output paths for ``rel_input``, in order of preference (endless)."""
    path = PurePosixPath(rel_input)
    parent = path.parent
    yield _join(parent, path.stem, f".{output_format}")
    yield _join(parent, path.name, f".{output_format}")
    for n in count(2):
        yield _join(parent, f"{path.name} ({n})", f".{output_format}")


def error_file_for(rel_input: str) -> str:
    """The error file that explains why ``rel_input`` failed, relative to the outbox."""
    path = PurePosixPath(rel_input)
    return _join(path.parent, path.name, ERROR_SUFFIX)


def _join(parent: PurePosixPath, stem: str, suffix: str) -> str:
    name = fit_name(stem, suffix)
    return str(parent / name) if str(parent) != "." else name


def fit_name(stem: str, suffix: str, limit: int = NAME_MAX_BYTES) -> str:
    """``stem + suffix``, the stem shortened so the name fits ``limit`` bytes."""
    budget = limit - len(suffix.encode("utf-8", "surrogateescape"))
    raw = stem.encode("utf-8", "surrogateescape")
    if len(raw) <= budget:
        return stem + suffix
    cut = raw[: max(budget, 1)].decode("utf-8", "ignore")
    return cut + suffix


def upload_name(rel_input: str, sha256: str, fmt: InputFormat | None = None) -> str:
    """The name an input is uploaded under: its own, tagged with its content hash, with
    the extension of the type its content has (``scan.ldx-1f3a...c9d2.png`` for a PNG
    named ``scan.jpg`` or ``scan``), so a hub that goes by extension is not misled.

    After a crash between an upload and its record, the upload is found again by this
    name and the size: two inputs of one name and size in different folders (fixed-size
    TIFFs from two scanners) never take each other's upload, and one of the same content
    would hold the same bytes.
    """
    path = PurePosixPath(rel_input)
    extension = EXTENSIONS[fmt] if fmt is not None else path.suffix
    tag = f"{UPLOAD_MARKER}{sha256[:UPLOAD_TAG_HEX]}{extension}"
    return fit_name(path.name[: len(path.name) - len(path.suffix)], tag)


def temp_name(final_name: str, job_id: int, instance: str | None = None) -> str:
    """A hidden temporary name beside ``final_name``; never taken for a final output.

    With ``instance``, the name says whose it is (``.scan.docx.ldx-part-node1-42``): in
    a shared outbox an instance removes its own leftovers, never another's work.
    """
    owner = f"{instance}-" if instance else ""
    return fit_name(f".{final_name}", f"{TEMP_MARKER}{owner}{job_id}")
