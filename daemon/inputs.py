"""Inputs: open files in the inbox safely, read their type and hash them.

Every open walks the relative path one component at a time from a descriptor of the
inbox, with ``O_NOFOLLOW``, so neither a symlinked file nor a symlinked folder can lead
outside the inbox; the opened descriptor must be a regular file. ``O_NONBLOCK`` keeps a
FIFO named like a scan from blocking the daemon.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from daemon.errors import JobFailed
from daemon.formats import SNIFF_BYTES, InputFormat, describe, sniff
from daemon.stability import Signature

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
HASH_CHUNK = 1024 * 1024


class InputGone(JobFailed):
    """The input vanished or was replaced by something that is not a regular file."""

    code = "input_missing"


def signature_of(st: os.stat_result) -> Signature:
    """The stability signature of a stat result."""
    return Signature(size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino)


@contextmanager
def open_input(inbox: Path, rel_path: str) -> Iterator[int]:
    """Yield a read-only descriptor of ``inbox/rel_path``, never following a symlink."""
    parts = rel_path.split("/")
    fd = _walk_dirs(inbox, parts[:-1], rel_path)
    try:
        try:
            file_fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            raise InputGone(f"{rel_path} is no longer in the inbox") from None
        except OSError as exc:
            raise InputGone(f"{rel_path} cannot be opened safely: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        mode = os.fstat(file_fd).st_mode
        if not stat.S_ISREG(mode):
            raise InputGone(f"{rel_path} is not a regular file; only regular files are read")
        yield file_fd
    finally:
        os.close(file_fd)


def _walk_dirs(inbox: Path, dirs: list[str], rel_path: str) -> int:
    fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for part in dirs:
        try:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            os.close(fd)
            raise InputGone(
                f"{rel_path}: folder {part!r} cannot be entered safely ({exc.strerror})"
            ) from None
        os.close(fd)
        fd = nxt
    return fd


def read_head(fd: int) -> bytes:
    """The first bytes of the file, for type detection."""
    return os.pread(fd, SNIFF_BYTES, 0)


def detect(fd: int) -> tuple[InputFormat | None, str]:
    """(format, description) of an open input."""
    head = read_head(fd)
    return sniff(head), describe(head)


def sha256_of(fd: int) -> str:
    """SHA-256 of the whole file, read in chunks (memory stays flat)."""
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, HASH_CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


MIME_TYPES = {
    InputFormat.PDF: "application/pdf",
    InputFormat.TIFF: "image/tiff",
    InputFormat.JPEG: "image/jpeg",
    InputFormat.PNG: "image/png",
    InputFormat.BMP: "image/bmp",
}
