"""Output permissions: the mode and group of every output, whatever the process umask.

``output_mode`` and ``output_group`` are applied to a temporary file before it is renamed
into place (``fchmod``/``fchown`` on the open descriptor, never on a path), so an output
is never visible with other permissions. Folders the daemon creates in the outbox get
the same read bits plus the matching search bits (0640 gives 0750) and keep the setgid
bit a shared outbox passes down.
"""

from __future__ import annotations

import contextlib
import grp
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import ConfigError

DEFAULT_MODE = 0o640


def parse_mode(value: object) -> int:
    """A file mode from ``0o640``, ``416``, ``"0640"``, ``"640"`` or ``"0o640"``."""
    if isinstance(value, bool):
        raise ValueError('a file mode is a number such as 0o640 or the string "0640"')
    if isinstance(value, int):
        mode = value
    elif isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        try:
            mode = int(text, 8)
        except ValueError:
            raise ValueError(f'not an octal file mode: {value!r} (try "0640")') from None
    else:
        raise ValueError(f"not a file mode: {value!r}")
    if not 0 <= mode <= 0o777:
        raise ValueError(f"file mode {mode:#o} is out of range (0 to 0o777, no special bits)")
    if not mode & stat.S_IRUSR:
        raise ValueError(f"file mode {mode:#o} would hide outputs from the daemon itself")
    return mode


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


def make_dirs(root: Path, folder: Path, perms: OutputPermissions | None) -> None:
    """Create ``folder`` (under ``root``) and give each folder created its mode and group."""
    if perms is None:
        folder.mkdir(parents=True, exist_ok=True)
        return
    current = root
    for part in folder.relative_to(root).parts:
        current = current / part
        try:
            current.mkdir()
        except FileExistsError:
            continue
        fd = os.open(current, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            perms.apply_fd(fd, directory=True)
        finally:
            os.close(fd)


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
