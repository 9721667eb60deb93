"""Names: a reversible, printable form of inbox paths (pure functions).

POSIX names are bytes. Python hands undecodable bytes over as lone surrogates
(PEP 383), which a database cannot store and a log or an SMB client cannot show; names
may also hold control characters or bidirectional overrides that forge log lines or
hide an extension. Such a path is *stored* percent-escaped, like a URL: every ``%``,
every byte that is not valid UTF-8 and every control or bidi character becomes ``%XX``
(``a\\nb\\xff.pdf`` is stored as ``a%0Ab%FF.pdf``). An ordinary name is stored as it is,
and so is one with a ``%`` that is not followed by two hex digits (``100% done.pdf``).

The mapping is reversible (``fs_path(stored_path(p)) == p`` for every path), the stored
form is valid, printable UTF-8, and since every output and error-file name derives from
the stored form, no output name carries an undecodable byte or a control character.

Safe access below a root (the descriptor kernel that inbox, outbox and archive share):
a path below a root is never handed to the kernel whole. Its folders are entered one
component at a time from a descriptor of the root with ``O_NOFOLLOW`` (``walk``), so
neither a link nor a folder swapped for a link during the walk leads outside; files are
opened, looked at, renamed and removed relative to the descriptor of their folder
(``open_at``, ``lstat_at``, ``move_version``, ``remove_version``). Only the root itself
may be a link (the administrator's choice). An operation on a file the daemon opened
acts on that very version (device, inode): a file swapped in under the same name is
put back, never moved or removed in its place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

_HEX_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_UNSAFE_CHARS = frozenset(
    [chr(c) for c in range(0x20)]
    + [chr(0x7F)]
    + [chr(c) for c in range(0x80, 0xA0)]
    + [chr(c) for c in range(0x202A, 0x202F)]  # LRE, RLE, PDF, LRO, RLO
    + [chr(c) for c in range(0x2066, 0x206A)]  # LRI, RLI, FSI, PDI
)


def _needs_escaping(path: str) -> bool:
    if _HEX_ESCAPE.search(path):
        return True
    return any(ch in _UNSAFE_CHARS or "\udc80" <= ch <= "\udcff" for ch in path)


def stored_path(fs_rel: str) -> str:
    """The stored form of a relative path as the filesystem gave it (``surrogateescape``)."""
    if not _needs_escaping(fs_rel):
        return fs_rel
    out: list[str] = []
    for ch in fs_rel:
        if ch == "%" or ch in _UNSAFE_CHARS:
            out.extend(f"%{byte:02X}" for byte in ch.encode("utf-8"))
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"%{ord(ch) - 0xDC00:02X}")
        else:
            out.append(ch)
    return "".join(out)


def fs_path(stored: str) -> str:
    """The filesystem form (``surrogateescape`` str) of a stored relative path."""
    if "%" not in stored or not _HEX_ESCAPE.search(stored):
        return stored
    raw = bytearray()
    pos = 0
    for match in _HEX_ESCAPE.finditer(stored):
        raw += stored[pos : match.start()].encode("utf-8", "surrogateescape")
        raw.append(int(match.group()[1:], 16))
        pos = match.end()
    raw += stored[pos:].encode("utf-8", "surrogateescape")
    return os.fsdecode(bytes(raw))


def is_escaped(stored: str) -> bool:
    """Whether ``stored`` differs from the name on disk."""
    return fs_path(stored) != stored


# -- safe access below a root ---------------------------------------------------------

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
PATH_MAX = 4096  # bytes of a path the kernel takes whole, its final NUL included
NAME_MAX = 255  # bytes of one path component
COPY_CHUNK = 1024 * 1024
T = TypeVar("T")


class Version(Protocol):
    """A file version as the daemon took it (``inbox.stability.Signature`` is one)."""

    @property
    def size(self) -> int: ...

    @property
    def mtime_ns(self) -> int: ...

    @property
    def inode(self) -> int: ...


def is_version(st: os.stat_result, expected: Version) -> bool:
    """Whether ``st`` describes the version ``expected`` (size, mtime, inode)."""
    return (st.st_size, st.st_mtime_ns, st.st_ino) == (
        expected.size,
        expected.mtime_ns,
        expected.inode,
    )


def path_bytes(path: str | Path) -> int:
    """Bytes the kernel sees of ``path`` (``surrogateescape`` names included)."""
    return len(os.fsencode(path))


def too_long(path: str | Path) -> str | None:
    """Why the kernel would refuse ``path`` as a whole (ENAMETOOLONG), or None."""
    size = path_bytes(path)
    if size >= PATH_MAX:
        return f"{size} bytes long, more than the system's limit of {PATH_MAX - 1}"
    for part in os.fsencode(path).split(b"/"):
        if len(part) > NAME_MAX:
            return f"a name in it is {len(part)} bytes long, more than the limit of {NAME_MAX}"
    return None


def open_root(root: Path) -> int:
    """A descriptor of the root folder (which may itself be a link)."""
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def walk(root: Path, parts: Sequence[str]) -> int:
    """A descriptor of ``root/parts...``, each component entered with ``O_NOFOLLOW``.

    Raises ``OSError`` (``filename`` is the component that failed: ELOOP or ENOTDIR
    for a link, ENOENT when missing) and leaves no descriptor open.
    """
    fd = open_root(root)
    for part in parts:
        try:
            nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            os.close(fd)
            raise OSError(exc.errno, exc.strerror, part) from None
        os.close(fd)
        fd = nxt
    return fd


def split(fs_rel: str) -> tuple[list[str], str]:
    """(folders, name) of a relative path as the filesystem spells it."""
    parts = [part for part in fs_rel.split("/") if part]
    if not parts:
        raise ValueError("an empty relative path names no file")
    return parts[:-1], parts[-1]


@contextlib.contextmanager
def folder(root: Path, parts: Sequence[str]) -> Iterator[int]:
    """``walk`` as a context: the descriptor is closed at the end."""
    fd = walk(root, parts)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def parent_of(root: Path, fs_rel: str) -> Iterator[tuple[int, str]]:
    """(descriptor of the folder, name) of ``root/fs_rel``, the folders walked safely."""
    parts, name = split(fs_rel)
    with folder(root, parts) as fd:
        yield fd, name


def open_at(dir_fd: int, name: str, flags: int = FILE_FLAGS) -> int:
    """Open ``name`` in an open folder, never through a link (a FIFO never blocks)."""
    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


@contextlib.contextmanager
def opened(dir_fd: int, name: str, flags: int = FILE_FLAGS) -> Iterator[int]:
    """``open_at`` as a context: the descriptor is closed at the end."""
    fd = open_at(dir_fd, name, flags)
    try:
        yield fd
    finally:
        os.close(fd)


def lstat_at(dir_fd: int, name: str) -> os.stat_result:
    """``lstat`` of ``name`` in an open folder."""
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def exists_at(dir_fd: int, name: str) -> bool:
    """Whether anything (a link too) has ``name`` in an open folder."""
    try:
        lstat_at(dir_fd, name)
    except FileNotFoundError:
        return False
    return True


def lstat_below(root: Path, fs_rel: str) -> os.stat_result:
    """``lstat`` of ``root/fs_rel``, its folders walked safely (OSError otherwise)."""
    with parent_of(root, fs_rel) as (fd, name):
        return lstat_at(fd, name)


def lstat_many(
    root: Path, fs_rels: Iterable[str], keep: Callable[[os.stat_result], T]
) -> list[T | None]:
    """``keep(lstat_below(...))`` of many paths, each folder walked once; None where the
    lstat fails. ``keep`` makes each result small at once (a large inbox: no list of
    full stat results)."""
    by_folder: dict[tuple[str, ...], list[tuple[int, str]]] = {}
    count = 0
    for index, fs_rel in enumerate(fs_rels):
        count += 1
        parts = [part for part in fs_rel.split("/") if part]
        by_folder.setdefault(tuple(parts[:-1]), []).append((index, parts[-1] if parts else ""))
    found: list[T | None] = [None] * count
    for folder_parts, names in by_folder.items():
        try:
            fd = walk(root, folder_parts)
        except OSError:
            continue
        try:
            for index, name in names:
                with contextlib.suppress(OSError, ValueError):
                    found[index] = keep(lstat_at(fd, name))
        finally:
            os.close(fd)
    return found


def fsync_fd(fd: int) -> None:
    """Flush a file or a folder (a folder: its entries, so a rename survives power loss)."""
    os.fsync(fd)


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def move_version(src_fd: int, name: str, dst_fd: int, target: str, taken: os.stat_result) -> bool:
    """Rename ``name`` (in ``src_fd``) to ``target`` (in ``dst_fd``) if it is still the
    file ``taken`` describes; False when another file had taken its name meanwhile (that
    file is put back). OSError EXDEV when the folders lie on different filesystems."""
    os.rename(name, target, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
    if _same(lstat_at(dst_fd, target), taken):
        return True
    put_back(dst_fd, target, src_fd, name)
    return False


def put_back(src_fd: int, name: str, dst_fd: int, target: str) -> None:
    """Move ``name`` back to ``target`` without replacing anything there (a hard link,
    then the old name removed); where that cannot be, it stays where it is."""
    try:
        os.link(name, target, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
    except OSError:
        return  # a newer file took the name, or no hard links here: leave it, lose nothing
    os.unlink(name, dir_fd=src_fd)


def remove_version(dir_fd: int, name: str, taken: os.stat_result, hidden: str) -> bool:
    """Remove ``name`` if it is still the file ``taken`` describes: it is first renamed
    to ``hidden`` in the same folder and checked there, so a file swapped in under the
    name is put back rather than removed. False when it was not the same file."""
    if not move_version(dir_fd, name, dir_fd, hidden, taken):
        return False
    os.unlink(hidden, dir_fd=dir_fd)
    return True


def copy_fd(source: int, target: int) -> int:
    """Copy the whole of open file ``source`` into ``target``; return the bytes copied."""
    offset = 0
    while chunk := os.pread(source, COPY_CHUNK, offset):
        view = memoryview(chunk)
        while view:
            view = view[os.write(target, view) :]
        offset += len(chunk)
    return offset


def keep_times(fd: int, st: os.stat_result) -> None:
    """Give an open copy the permission bits and times of the original."""
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def is_cross_device(exc: OSError) -> bool:
    """Whether a rename failed only because the folders lie on different filesystems."""
    return exc.errno == errno.EXDEV
