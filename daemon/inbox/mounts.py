"""Mounts: which parts of the inbox must be polled because inotify cannot see them.

inotify only reports changes made through the local kernel. On a network filesystem
(NFS, CIFS/SMB), a FUSE filesystem (sshfs, bindfs, rclone...) or a hypervisor's shared
folder (9p, virtiofs, vboxsf; Docker Desktop and WSL2 bind mounts) another machine's
writes arrive unannounced, so those parts of the inbox are polled. The decision is a
pure function of the inbox path, the ``use_polling`` setting and the mount table text
(``/proc/self/mountinfo``, or ``/proc/mounts`` where that is missing).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

UsePolling = Literal["auto"] | bool

NETWORK_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ncpfs",
        "afs",
        "coda",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "ocfs2",
        "gfs2",
        "davfs",
        "fuse",
        "fuseblk",
        "9p",
        "virtiofs",
        "vboxsf",
        "vmhgfs",
        "prl_fs",
        "drvfs",
        "fakeowner",
    }
)
NFS_TYPES = frozenset({"nfs", "nfs4"})
NFS_ACREGMAX_DEFAULT = 60.0  # seconds, nfs(5)
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
MOUNTINFO = Path("/proc/self/mountinfo")
PROC_MOUNTS = Path("/proc/mounts")


@dataclass(frozen=True)
class Mount:
    """One line of the mount table."""

    point: str
    fstype: str
    source: str
    options: tuple[str, ...] = ()  # the mount's own options, then the filesystem's


@dataclass(frozen=True)
class WatchPlan:
    """Which folders inotify watches and which are polled, and why."""

    inotify: tuple[Path, ...]
    polled: tuple[Path, ...]
    reasons: tuple[str, ...] = ()


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \040 \011 \012 \134.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse ``/proc/self/mountinfo`` (proc(5)); malformed lines are skipped."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)
        if len(fields) < dash + 3 or len(fields) < 5:
            continue
        options = fields[5].split(",")
        if len(fields) > dash + 3:
            options += fields[dash + 3].split(",")
        point, source = _unescape(fields[4]), _unescape(fields[dash + 2])
        mounts.append(Mount(point, fields[dash + 1], source, tuple(options)))
    return mounts


def parse_proc_mounts(text: str) -> list[Mount]:
    """Parse ``/proc/mounts`` (fstab format); malformed lines are skipped."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            options = tuple(fields[3].split(",")) if len(fields) > 3 else ()
            mounts.append(Mount(_unescape(fields[1]), fields[2], _unescape(fields[0]), options))
    return mounts


def needs_polling(fstype: str) -> bool:
    """Whether inotify misses changes on a filesystem of this type."""
    base = fstype.lower()
    return base in NETWORK_TYPES or base.startswith("fuse.")


def _inside(path: str, folder: str) -> bool:
    return folder in ("/", path) or path.startswith(folder.rstrip("/") + "/")


def mount_of(path: str, mounts: Sequence[Mount]) -> Mount | None:
    """The mount that holds ``path`` (the deepest point; the latest of equal points)."""
    best: Mount | None = None
    for mount in mounts:
        if _inside(path, mount.point) and (best is None or len(mount.point) >= len(best.point)):
            best = mount
    return best


def watch_plan(
    inbox: Path, mode: UsePolling, mounts: Sequence[Mount], real_inbox: str | None = None
) -> WatchPlan:
    """Decide how to watch ``inbox``; ``real_inbox`` is its symlink-free form."""
    if mode is True:
        return WatchPlan((), (inbox,), ("use_polling = true",))
    if mode is False:
        return WatchPlan((inbox,), ())
    real = real_inbox or str(inbox)
    home = mount_of(real, mounts)
    if home is not None and needs_polling(home.fstype):
        why = f"the inbox is on {home.fstype} ({home.source} at {home.point})"
        return WatchPlan((), (inbox,), (why,))
    polled: list[Path] = []
    reasons: list[str] = []
    for mount in _deepest_last(mounts):
        if mount.point == real or not _inside(mount.point, real):
            continue
        if not needs_polling(mount.fstype) or any(_inside(mount.point, str(p)) for p in polled):
            continue
        polled.append(inbox / os.path.relpath(mount.point, real))
        reasons.append(f"{mount.point} is on {mount.fstype} ({mount.source})")
    return WatchPlan((inbox,), tuple(polled), tuple(reasons))


def attribute_cache_seconds(mount: Mount) -> float:
    """How long the client may show a file's old size and time (nfs(5): acregmax, 60 s
    unless actimeo, acregmax or noac say otherwise); 0 where the kernel knows at once."""
    if mount.fstype.lower() not in NFS_TYPES or "noac" in mount.options:
        return 0.0
    values = dict(option.partition("=")[::2] for option in mount.options)
    for key in ("acregmax", "actimeo"):  # acregmax wins when both are given
        if values.get(key, "").isdigit():
            return float(values[key])
    return NFS_ACREGMAX_DEFAULT


def stale_size_warnings(
    inbox: Path, quiet_period: float, mounts: Sequence[Mount], real_inbox: str | None = None
) -> list[str]:
    """A warning for each NFS mount under (or holding) the inbox whose attribute cache
    outlasts ``quiet_period``: a file still being written there can look finished."""
    warnings = []
    for mount in mounts_at_or_below(real_inbox or str(inbox), mounts):
        cache = attribute_cache_seconds(mount)
        if cache >= quiet_period:
            warnings.append(
                f"{mount.point} is on {mount.fstype}, which may show a file's old size and "
                f"time for up to {cache:g} s; with quiet_period = {quiet_period:g} a file "
                f"still being written there can look finished: set quiet_period above "
                f"{cache:g} s, or mount it with actimeo=N (N below quiet_period) or noac"
            )
    return warnings


def mounts_at_or_below(real: str, mounts: Sequence[Mount]) -> list[Mount]:
    """The mount holding the real path ``real`` and every mount below it."""
    home = mount_of(real, mounts)
    below = [m for m in _deepest_last(mounts) if m.point != real and _inside(m.point, real)]
    return ([home] if home is not None else []) + below


def remote_storage(real_paths: Sequence[str], mounts: Sequence[Mount]) -> list[str]:
    """The mount points of network filesystems at or below any of ``real_paths``."""
    points = {
        mount.point
        for real in real_paths
        for mount in mounts_at_or_below(real, mounts)
        if needs_polling(mount.fstype)
    }
    return sorted(points)


def remote_storage_for(folders: Sequence[Path]) -> list[str]:
    """``remote_storage`` of ``folders`` from this machine's mount table."""
    reals = [os.path.realpath(folder) for folder in folders]
    return remote_storage(reals, read_mount_table())


def _deepest_last(mounts: Sequence[Mount]) -> list[Mount]:
    # The latest mount on a point hides the earlier ones; shallow points come first, so
    # a polled folder covers the mounts below it.
    effective = {mount.point: mount for mount in mounts}
    return sorted(effective.values(), key=lambda m: m.point.count("/"))


def read_mount_table() -> list[Mount]:
    """The mount table of this process (empty when /proc is not there)."""
    try:
        return parse_mountinfo(MOUNTINFO.read_text(encoding="utf-8", errors="surrogateescape"))
    except OSError:
        pass
    try:
        return parse_proc_mounts(PROC_MOUNTS.read_text(encoding="utf-8", errors="surrogateescape"))
    except OSError:
        return []


def stale_size_warnings_for(inbox: Path, quiet_period: float) -> list[str]:
    """``stale_size_warnings`` from this machine's mount table."""
    return stale_size_warnings(inbox, quiet_period, read_mount_table(), os.path.realpath(inbox))


def plan_for(inbox: Path, mode: UsePolling) -> WatchPlan:
    """The watch plan of ``inbox`` from this machine's mount table."""
    if mode is not True and mode is not False:
        return watch_plan(inbox, mode, read_mount_table(), os.path.realpath(inbox))
    return watch_plan(inbox, mode, [])
