"""Outbox: publish outputs atomically, write error files, and handle finished inputs.

An output is downloaded to a hidden temporary name in its final folder, checked,
flushed to disk, renamed into place and the folder flushed, so no reader ever sees a
partial file under a final name. Error files sit beside where the output would be.
Neither is ever written through a link below the outbox (``permissions.make_dirs``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from datetime import UTC, datetime
from pathlib import Path

from daemon.advice import advice_for
from daemon.errors import RetryLater, UnsafeOutputPath
from daemon.fs import fs_path
from daemon.inbox.stability import Signature
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


def delete_input(inbox: Path, rel_input: str, expected: Signature) -> bool:
    """Delete the input if it is still the version that was converted."""
    path = inbox / fs_path(rel_input)  # the stored path may be escaped (daemon.fs)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if (st.st_size, st.st_mtime_ns, st.st_ino) != (
        expected.size,
        expected.mtime_ns,
        expected.inode,
    ):
        return False  # a newer version arrived meanwhile: it is a new input, keep it
    path.unlink()
    return True


def archive_input(
    inbox: Path, archive: Path, rel_input: str, expected: Signature | None = None
) -> Path | None:
    """Move the input into the archive, mirroring its path; never overwrite. Only the
    version that was converted moves (``expected``): a newer one is a new input."""
    source = inbox / fs_path(rel_input)  # the stored path may be escaped (daemon.fs)
    try:
        st = source.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None  # replaced by a link or something else: never follow or move it
    if expected is not None and (st.st_size, st.st_mtime_ns, st.st_ino) != (
        expected.size,
        expected.mtime_ns,
        expected.inode,
    ):
        return None
    _make_archive_dirs(archive, (archive / rel_input).parent)
    target = _free_name(archive / rel_input)
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copy2(source, target)  # another filesystem: copy, flush, then remove
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        source.unlink()
    fsync_dir(target.parent)
    return target


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


def _free_name(target: Path) -> Path:
    candidate, n = target, 2
    while os.path.lexists(candidate):  # a link there is taken too: never copy through it
        candidate = target.with_name(f"{target.stem} ({n}){target.suffix}")
        n += 1
    return candidate
