"""Inputs: open files in the inbox safely, read their type and hash them.

Every open walks the relative path one component at a time from a descriptor of the
inbox, with ``O_NOFOLLOW``, so neither a symlinked file nor a symlinked folder can lead
outside the inbox; ``O_NONBLOCK`` keeps a FIFO named like a scan from blocking the
daemon. Every check is made on the opened descriptor, never on the path: it must be a
regular file, and one with a single link unless ``allow_hardlinks`` (a hard link may
be a file from outside the inbox under an innocent name). Paths come in their stored
form (``daemon.fs``) and are turned back into the bytes on disk here.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import pwd
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import HardLinked, InputChanged, InputGone, InputUnreadable
from daemon.formats import (
    SNIFF_BYTES,
    InputFormat,
    completeness,
    count_pages,
    describe,
    looks_unwritten,
    sniff,
)
from daemon.fs import fs_path
from daemon.inbox.stability import Signature

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
HASH_CHUNK = 1024 * 1024
UNWRITTEN = "it holds only zero bytes at its start: its space was reserved, its content not written"


def hard_link_message(rel_path: str, links: int) -> str:
    """Why a file with several hard links is refused."""
    return (
        f"{rel_path} has {links} hard links; a hard link can show a file from outside the "
        "inbox under an innocent name, so it is not read (set allow_hardlinks = true to "
        "accept files with several links)"
    )


def unreadable_message(reason: str) -> str:
    """What a person does about an input the daemon may not read."""
    return (
        f"{reason}; give the daemon's user read access to it (for example chmod g+r with "
        "the daemon's user in the file's group, or chmod o+r), or drop it again with "
        "permissions that let the daemon read it"
    )


def signature_of(st: os.stat_result) -> Signature:
    """The stability signature of a stat result."""
    return Signature(size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino)


def check_unchanged(fd: int, expected: Signature, rel_path: str) -> None:
    """Raise ``InputChanged`` unless the open input still has the job's signature."""
    if signature_of(os.fstat(fd)) != expected:
        raise InputChanged(
            f"{rel_path} changed after it was taken; the new version will be converted"
        )


@contextmanager
def open_input(inbox: Path, rel_path: str, *, allow_hardlinks: bool = False) -> Iterator[int]:
    """Yield a read-only descriptor of ``inbox/rel_path``, never following a symlink.

    ``rel_path`` is the stored form; raises ``InputGone`` when it is not a regular file
    reachable without links, ``InputUnreadable`` (an ``InputGone``) when the daemon may
    not read it, ``HardLinked`` when it has several links and they are not allowed.
    """
    parts = fs_path(rel_path).split("/")
    fd = _walk_dirs(inbox, parts[:-1], rel_path)
    try:
        try:
            file_fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            raise InputGone(f"{rel_path} is no longer in the inbox") from None
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise InputUnreadable(_unreadable_reason(rel_path, exc)) from None
            raise InputGone(f"{rel_path} cannot be opened safely: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        st = os.fstat(file_fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputGone(f"{rel_path} is not a regular file; only regular files are read")
        if st.st_nlink > 1 and not allow_hardlinks:
            raise HardLinked(hard_link_message(rel_path, st.st_nlink))
        yield file_fd
    finally:
        os.close(file_fd)


def _unreadable_reason(rel_path: str, exc: OSError) -> str:
    """Why ``rel_path`` cannot be opened, naming the user the daemon runs as."""
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid without a name (containers)
        user = f"uid {os.geteuid()}"
    return f"{rel_path} cannot be read by user {user} ({exc.strerror})"


def open_folder(root: Path, parts: list[str]) -> int:
    """A descriptor of ``root/parts...``, entered one component at a time without links."""
    return _walk_dirs(root, parts, "/".join(parts))


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


@dataclass(frozen=True)
class Inspection:
    """What an input's descriptor says: signature, links, type and completeness."""

    signature: Signature
    links: int
    input_format: InputFormat | None = None
    described: str = ""
    problem: str | None = None  # why it does not look completely written yet
    pages: int | None = None  # what the hub will bill (counted once complete; None: unknown)


def inspect_open(fd: int, *, read_content: bool = True) -> Inspection:
    """Inspect an open input; reads a few bytes only (head, tail, a TIFF's tables)."""
    st = os.fstat(fd)
    signature = signature_of(st)
    if not read_content or st.st_size == 0:
        return Inspection(signature, st.st_nlink, described="an empty file")
    head = read_head(fd)
    fmt, described = sniff(head), describe(head)
    if fmt is None:
        problem = UNWRITTEN if looks_unwritten(head) else None
        return Inspection(signature, st.st_nlink, None, described, problem)
    problem = completeness(fmt, st.st_size, lambda offset, n: os.pread(fd, n, offset))
    pages = None if problem else count_pages(fmt, st.st_size, lambda at, n: os.pread(fd, n, at))
    return Inspection(signature, st.st_nlink, fmt, described, problem, pages)


def inspect_input(inbox: Path, rel_path: str, *, allow_hardlinks: bool) -> Inspection:
    """Open ``rel_path`` safely and inspect it; a refused hard link is not read at all."""
    with open_input(inbox, rel_path, allow_hardlinks=True) as fd:
        links = os.fstat(fd).st_nlink
        return inspect_open(fd, read_content=allow_hardlinks or links == 1)


def sha256_of(fd: int) -> str:
    """SHA-256 of the whole file, read in chunks (memory stays flat)."""
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, HASH_CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


class HashingReader(io.RawIOBase):
    """A read-only stream over a descriptor that hashes what it hands out.

    An upload reads the input through it; afterwards ``hexdigest`` is the SHA-256 of the
    bytes actually sent (None unless they were read from the start to the end in order),
    so a change of content during the upload is noticed even when size and mtime stay.
    The descriptor is borrowed, never closed here.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._pos = 0
        self._digest = hashlib.sha256()
        self._in_order = True

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._pos + offset
        else:
            target = os.fstat(self._fd).st_size + offset
        if target == 0:  # a fresh read (httpx seeks to 0 before each attempt)
            self._digest, self._in_order = hashlib.sha256(), True
        elif target != self._pos:
            self._in_order = False
        self._pos = target
        return target

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        data = os.pread(self._fd, len(buffer), self._pos)
        buffer[: len(data)] = data
        self._digest.update(data)
        self._pos += len(data)
        return len(data)

    def hexdigest(self) -> str | None:
        """SHA-256 of what was read, when it was read in order to the end of the file."""
        if not self._in_order or self._pos != os.fstat(self._fd).st_size:
            return None
        return self._digest.hexdigest()
