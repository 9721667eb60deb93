"""Outbox: publish outputs atomically, write error files, and handle finished inputs.

An output is downloaded to a hidden temporary name in its final folder, checked,
flushed to disk, renamed into place and the folder flushed, so no reader ever sees a
partial file under a final name. Error files sit beside where the output would be.
Neither is ever written through a link below the outbox (``permissions.make_dirs``).

A converted input is deleted or archived through the same descriptor walk from the
inbox root as it was opened (``daemon.fs``), and only the version that was converted
(size, mtime, inode): a folder swapped for a link, or a newer file under the same name,
is left alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from daemon import fs
from daemon.advice import advice_for
from daemon.errors import RetryLater, UnsafeOutputPath
from daemon.fs import fs_path
from daemon.logs import get_logger
from daemon.outbox.layout import error_file_for, temp_name
from daemon.outbox.permissions import OutputPermissions, check_dirs, make_dirs, open_output

log = get_logger(component="outbox")


def temp_path_for(final: Path, job_id: int, instance: str | None = None) -> Path:
    """The temporary download path of ``final`` for one job (of one instance)."""
    return final.parent / temp_name(final.name, job_id, instance)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries, so a rename in it survives power loss."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path, perms: OutputPermissions | None = None) -> None:
    """Give ``tmp`` its mode and group, flush it, rename it to ``final``, flush the folder."""
    fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)  # a link swapped in is not published
    try:
        if perms is not None:
            perms.apply_fd(fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def discard(tmp: Path) -> None:
    """Remove a temporary file if it is there."""
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()


def error_text(
    rel_input: str,
    code: str,
    message: str,
    when: float,
    job_id: int,
    *,
    auto_retry_at: float | None = None,
) -> str:
    """What a person reads in an error file: the reason, what it means, what to do, and
    the next step: the automatic retry that is coming (``auto_retry_at``), ``retry``, or
    a corrected file where retrying the same file cannot help."""
    advice = advice_for(code)
    lines = [
        f"ldx-hotfolder could not convert {rel_input}",
        "",
        f"Reason: {message}",
        f"Code:   {code}",
        f"When:   {_utc(when)}",
        f"Job:    {job_id}",
        "",
        f"What it means: {advice.meaning}",
        f"What to do:    {advice.action}",
        "",
        "The input was left where it is.",
    ]
    if auto_retry_at is not None:
        lines += [
            f"The daemon tries it again by itself at {_utc(auto_retry_at)} (auto_retry_after);",
            "nothing to do unless that fails too. To try at once, run",
            f"  ldx-hotfolder retry {job_id}",
        ]
    elif advice.retry_helps:
        lines += [
            "Once the cause is fixed, run",
            f"  ldx-hotfolder retry {job_id}",
            "or drop a corrected file under the same name.",
        ]
    else:
        lines.append(
            "Retrying the same file cannot help: drop a corrected file under the same name."
        )
    return "\n".join(lines) + "\n"


def _utc(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def write_error_file(
    outbox: Path, rel_input: str, content: str, perms: OutputPermissions | None = None
) -> Path | None:
    """Write (atomically) the error file of ``rel_input``; return its path.

    None when its folder chain is unsafe (a link below the outbox): the error file must
    not be written through the very link the job may have failed for, so it is logged.
    """
    final = outbox / error_file_for(rel_input)
    tmp = final.parent / temp_name(final.name, os.getpid())
    try:
        make_dirs(outbox, final.parent, perms)
        with open_output(tmp) as out:
            out.write(content.encode("utf-8", errors="surrogateescape"))
    except UnsafeOutputPath as exc:
        log.error("error file not written", path=rel_input, reason=exc.message)
        return None
    except BaseException:
        discard(tmp)
        raise
    publish(tmp, final, perms)
    return final


def remove_error_file(outbox: Path, rel_input: str) -> None:
    """Remove the error file of ``rel_input`` once it converted after all."""
    final = outbox / error_file_for(rel_input)
    if not check_dirs(outbox, final.parent):
        return  # through a link it would remove a file outside the outbox
    with contextlib.suppress(FileNotFoundError):
        final.unlink()


_NOT_REACHABLE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})


def delete_input(inbox: Path, rel_input: str, expected: fs.Version) -> bool:
    """Delete the input if it is still the version that was converted (``expected``).

    The input is reached as it was opened, by descriptor from the inbox without links;
    the name is first moved aside in its folder and checked there, so a newer file
    that takes the name at that moment is put back, never deleted.
    """
    try:
        with fs.parent_of(inbox, fs_path(rel_input)) as (parent, name):
            taken = _converted_version(parent, name, expected, rel_input)
            if taken is None:
                return False
            if not fs.remove_version(parent, name, taken, temp_name(name, os.getpid())):
                log.warning(_SWAPPED, path=rel_input)
                return False
            fs.fsync_fd(parent)
            return True
    except OSError as exc:
        if exc.errno not in _NOT_REACHABLE:
            raise
        _not_reachable(rel_input, exc)
        return False


def archive_input(inbox: Path, archive: Path, rel_input: str, expected: fs.Version) -> Path | None:
    """Move the input into the archive, mirroring its path; never overwrite. Only the
    version that was converted moves (``expected``): a newer one is a new input.

    Both sides are reached by descriptor without links (the inbox from its root, the
    archive below ``archive``); across filesystems the opened version is copied,
    flushed, and only then removed from its folder.
    """
    try:
        with fs.parent_of(inbox, fs_path(rel_input)) as (parent, name):
            taken = _converted_version(parent, name, expected, rel_input)
            if taken is None:
                return None
            return _archive_taken(archive, rel_input, (parent, name), taken)
    except OSError as exc:
        if exc.errno not in _NOT_REACHABLE:
            raise
        _not_reachable(rel_input, exc)
        return None


_SWAPPED = "another file took the input's name while it was handled; that file is kept"


def _converted_version(
    parent: int, name: str, expected: fs.Version, rel_input: str
) -> os.stat_result | None:
    """The input's ``lstat`` when it is the regular file that was converted, else None."""
    st = fs.lstat_at(parent, name)
    if not stat.S_ISREG(st.st_mode):
        log.warning(
            "the input was replaced by a link or a special file; left alone", path=rel_input
        )
        return None
    if not fs.is_version(st, expected):
        log.info(
            "the input changed since it was converted; the new version is kept", path=rel_input
        )
        return None
    return st


def _not_reachable(rel_input: str, exc: OSError) -> None:
    if exc.errno == errno.ENOENT:
        return  # gone already (a person moved it): nothing to do
    log.warning(
        "the input cannot be reached without following a link; left alone",
        path=rel_input,
        component=str(exc.filename),
    )


def _archive_taken(
    archive: Path, rel_input: str, source: tuple[int, str], taken: os.stat_result
) -> Path | None:
    """Move the checked input ``source`` (folder descriptor, name) into the archive."""
    target = archive / rel_input
    _make_archive_dirs(archive, target.parent)
    parts = list(PurePosixPath(rel_input).parent.parts) if "/" in rel_input else []
    try:
        with fs.folder(archive, parts) as folder:
            name = _free_name(folder, target.name)
            moved = _move_or_copy(source, (folder, name), taken)
            if not moved:
                log.warning(_SWAPPED, path=rel_input)
                return None
            fs.fsync_fd(folder)
            fs.fsync_fd(source[0])
    except OSError as exc:
        if exc.errno not in _NOT_REACHABLE:
            raise
        raise RetryLater(
            f"the archive folder {target.parent} cannot be entered without following a link "
            f"({exc.strerror})",
            code=UnsafeOutputPath.code,
        ) from None
    return target.with_name(name)


def _move_or_copy(source: tuple[int, str], target: tuple[int, str], taken: os.stat_result) -> bool:
    """Rename the input into the archive; across filesystems, copy it instead."""
    try:
        return fs.move_version(*source, *target, taken)
    except OSError as exc:
        if not fs.is_cross_device(exc):
            raise
    return _copy_across(source, target, taken)


def _copy_across(source: tuple[int, str], target: tuple[int, str], taken: os.stat_result) -> bool:
    """Copy the opened version into the archive (under a temporary name, flushed, then
    renamed), and remove it from the inbox relative to its verified folder."""
    parent, name = source
    folder, final = target
    tmp = temp_name(final, os.getpid())
    with fs.opened(parent, name) as src:
        if not fs.is_version(os.fstat(src), _version_of(taken)):
            return False
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        with fs.opened(folder, tmp, flags) as dst:
            try:
                fs.copy_fd(src, dst)
                fs.keep_times(dst, taken)
                fs.fsync_fd(dst)
            except BaseException:
                os.unlink(tmp, dir_fd=folder)
                raise
        if not fs.is_version(os.fstat(src), _version_of(taken)):  # written to meanwhile
            os.unlink(tmp, dir_fd=folder)
            return False
    os.rename(tmp, final, src_dir_fd=folder, dst_dir_fd=folder)
    fs.fsync_fd(folder)
    # The archived copy is the converted version; should a newer file have taken the
    # input's name meanwhile, it stays in the inbox as a new input.
    fs.remove_version(parent, name, taken, temp_name(name, os.getpid()))
    return True


@dataclass(frozen=True)
class _Taken:
    size: int
    mtime_ns: int
    inode: int


def _version_of(st: os.stat_result) -> _Taken:
    return _Taken(st.st_size, st.st_mtime_ns, st.st_ino)


def _make_archive_dirs(archive: Path, folder: Path) -> None:
    """The archive folder chain, with no link below the archive root (as in the outbox).

    A refusal is retried rather than failing the job: the output is already published,
    and a failed job would be converted (and paid for) again on retry.
    """
    archive.mkdir(parents=True, exist_ok=True)  # the root may be gone: made again, as before
    try:
        make_dirs(archive, folder, None)
    except UnsafeOutputPath as exc:
        raise RetryLater(exc.message, code=exc.code) from None


def _free_name(folder: int, name: str) -> str:
    """``name``, or ``name (2)``... : the first that nothing (a link neither) takes."""
    path = PurePosixPath(name)
    candidate, n = name, 2
    while fs.exists_at(folder, candidate):
        candidate = f"{path.stem} ({n}){path.suffix}"
        n += 1
    return candidate
