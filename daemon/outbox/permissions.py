"""Output permissions: the mode and group of every output, whatever the process umask.

``output_mode`` and ``output_group`` are applied to a temporary file before it is renamed
into place (``fchmod``/``fchown`` on the open descriptor, never on a path), so an output
is never visible with other permissions. Folders the daemon creates in the outbox get
the same read bits plus the matching search bits (0640 gives 0750) and keep the setgid
bit a shared outbox passes down.

Nothing is written through a link below the outbox (or the archive): ``make_dirs``
refuses any component below the root that is not a real folder (looked at with
``lstat``, never followed), and ``open_output`` refuses a link or special file under a
temporary name. The root itself may be a link set up by the administrator.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from daemon.errors import ConfigError, UnsafeOutputPath

DEFAULT_MODE = 0o640
PROCESS_UMASK = 0o027  # never group-writable, never readable by others


def dir_mode_for(mode: int) -> int:
    """The folder mode matching a file mode: search wherever read is allowed, plus owner rwx."""
    return mode | ((mode & 0o444) >> 2) | stat.S_IRWXU


def resolve_group(group: str | None) -> int | None:
    """The gid of ``output_group`` (a name or a number), or None when unset."""
    if group is None or group == "":
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"output_group: there is no group named {group!r}") from None


@dataclass(frozen=True)
class OutputPermissions:
    """Mode and group of outputs and of the outbox folders the daemon creates."""

    mode: int = DEFAULT_MODE
    gid: int | None = None

    @classmethod
    def of(cls, mode: int, group: str | None) -> OutputPermissions:
        """Build from the settings' ``output_mode`` and ``output_group``."""
        return cls(mode=mode, gid=resolve_group(group))

    def apply_fd(self, fd: int, *, directory: bool = False) -> None:
        """Give an open file (or folder) its mode and group."""
        if self.gid is not None:
            os.fchown(fd, -1, self.gid)  # first: a group change may clear setgid bits
        mode = dir_mode_for(self.mode) if directory else self.mode
        if directory:
            mode |= os.fstat(fd).st_mode & stat.S_ISGID
        os.fchmod(fd, mode)


def unsafe_folder_message(path: Path, root: Path) -> str:
    """Why nothing is written through ``path``, and what a person should do about it."""
    what = "a symbolic link" if path.is_symlink() else "not a folder"
    return (
        f"{path} is {what}: files are only written into real folders below {root}, "
        "never through a link, which could lead anywhere; replace it with a folder "
        "(or remove it), then retry"
    )


def make_dirs(root: Path, folder: Path, perms: OutputPermissions | None) -> None:
    """Create ``folder`` below ``root`` one component at a time, never through a link.

    ``root`` itself may be a link the administrator set up; every component below it
    must be a real folder, checked with ``lstat``, or ``UnsafeOutputPath`` is raised.
    Folders created get their mode and group when ``perms`` is given.
    """
    current = root
    for part in folder.relative_to(root).parts:
        current = current / part
        try:
            current.mkdir()
        except FileExistsError:
            # mkdir neither follows nor replaces what is there: look at it unfollowed.
            if not stat.S_ISDIR(current.lstat().st_mode):
                raise UnsafeOutputPath(unsafe_folder_message(current, root)) from None
            continue
        if perms is not None:
            _apply_dir_perms(current, perms)


def unsafe_component(root: Path, folder: Path) -> Path | None:
    """The first existing component of ``folder`` below ``root`` that is not a real
    folder (a link, a file), or None when there is none."""
    current = root
    for part in folder.relative_to(root).parts:
        current = current / part
        try:
            mode = current.lstat().st_mode
        except FileNotFoundError:
            return None  # nothing further down exists, so nothing there can mislead
        if not stat.S_ISDIR(mode):
            return current
    return None


def check_dirs(root: Path, folder: Path) -> bool:
    """Whether every existing component of ``folder`` below ``root`` is a real folder."""
    return unsafe_component(root, folder) is None


def open_output(path: Path) -> BinaryIO:
    """Open a new or stale temporary output for writing, never through a link at ``path``.

    The folders above were checked by ``make_dirs``; ``O_NOFOLLOW`` covers a link put
    under the temporary name itself, ``O_NONBLOCK`` a FIFO there.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    refused = (
        f"{path} is a link or a special file, not a file the daemon wrote: nothing is "
        "written through it; remove it, then retry"
    )
    try:
        fd = os.open(path, flags, 0o666)  # the umask applies, as to any new file
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a link; a FIFO nobody reads
            raise UnsafeOutputPath(refused) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeOutputPath(refused)
    return os.fdopen(fd, "wb")


def _apply_dir_perms(folder: Path, perms: OutputPermissions) -> None:
    """Give a folder just created its mode and group, through a descriptor of it."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        perms.apply_fd(fd, directory=True)
    finally:
        os.close(fd)


def tighten_umask() -> int:
    """Make the process umask at least ``PROCESS_UMASK``; return the umask before.

    Outputs get their configured mode whatever the umask (``apply_fd``); everything else
    the daemon makes (the state folder and database, archive folders, temporary files)
    follows the umask, and a caller's 000 would make it writable by everyone.
    """
    before = os.umask(PROCESS_UMASK)
    os.umask(before | PROCESS_UMASK)
    return before


def check(outbox: Path, perms: OutputPermissions) -> str | None:
    """Try the permissions on a scratch file in the outbox; say what fails, or None."""
    probe = outbox / f".ldx-permission-check-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        return f"cannot create a file in the outbox {outbox}: {exc.strerror}"
    try:
        perms.apply_fd(fd)
    except OSError as exc:
        return (
            f"cannot give outputs group {perms.gid} and mode {perms.mode:#o}: {exc.strerror} "
            "(the daemon's user must belong to output_group; under systemd add it to "
            "SupplementaryGroups= and set PrivateUsers=no)"
        )
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            probe.unlink()
    return None
