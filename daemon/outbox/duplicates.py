"""Duplicates: the same bytes with the same settings, converted before.

Scanners resend, people drop a file twice, a backup restores a folder: the hub would be
paid again for a conversion it already made. ``on_duplicate`` decides what happens when
an input's SHA-256, engine, language and output format match a completed job:

- ``convert``: convert it again, as if it were new;
- ``reuse`` (default): copy the earlier output to this input's output name, while that
  output still exists, is still the earlier job's own and is a valid package; else
  convert;
- ``skip``: convert nothing and write no output; the job completes with no output of its
  own (``explain`` names the earlier file and where its output is).

``decide`` is the pure decision; ``copy_output`` is the file work of ``reuse``, done the
same way as a download: a hidden temporary file in the destination folder, checked,
flushed and renamed into place.
"""

from __future__ import annotations

import enum
import os
import shutil
import stat
from pathlib import Path

from daemon import fs
from daemon.errors import OoxmlProblem, OutputRefused
from daemon.outbox import publish as outbox
from daemon.outbox.permissions import OutputPermissions, make_dirs, open_output
from daemon.outbox.verify import verify_package

COPY_CHUNK = 1024 * 1024


class Action(enum.Enum):
    """What to do with an input whose content was converted before."""

    CONVERT = "convert"
    REUSE = "reuse"
    SKIP = "skip"


def decide(policy: str, converted_before: bool, output_current: bool) -> Action:
    """The action for an input, from the policy and what the table knows.

    ``converted_before``: a completed job has the same content and settings;
    ``output_current``: that job's output file is still there and still its own.
    """
    if policy == "convert" or not converted_before:
        return Action.CONVERT
    if policy == "skip":
        return Action.SKIP
    return Action.REUSE if output_current else Action.CONVERT


def copy_output(
    outbox_root: Path,
    source: str,
    target: str,
    output_format: str,
    *,
    job_id: int,
    perms: OutputPermissions | None = None,
    instance: str | None = None,
) -> bool:
    """Copy the output ``source`` to ``target`` (both relative to the outbox) atomically.

    False when the source is gone or is not a valid package of ``output_format`` (then
    the caller converts instead). The source is opened without following links; a link
    in the target's folder chain raises ``UnsafeOutputPath`` (see ``make_dirs``).
    """
    final = outbox_root / target
    # First, even when source is target: an "existing" output seen through a link below
    # the outbox is not ours to count as published.
    make_dirs(outbox_root, final.parent, perms)
    if source == target:
        return _valid(final, output_format)
    fd = _open_earlier(outbox_root, source)
    if fd is None:
        return False
    tmp = outbox.temp_path_for(final, job_id, instance)
    try:
        with os.fdopen(fd, "rb") as src, open_output(tmp) as dst:
            shutil.copyfileobj(src, dst, COPY_CHUNK)
    except BaseException:
        outbox.discard(tmp)
        raise
    if not _valid(tmp, output_format):
        outbox.discard(tmp)
        return False
    outbox.publish(tmp, final, perms)
    return True


def _open_earlier(root: Path, rel: str) -> int | None:
    """A descriptor of an earlier output, a regular file with one link reached without
    links below the outbox; None when there is no such file (then the input converts)."""
    try:
        with fs.parent_of(root, fs.fs_path(rel)) as (dir_fd, name):
            fd = fs.open_at(dir_fd, name)
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        return None
    return fd


def _valid(path: Path, output_format: str) -> bool:
    try:
        verify_package(path, output_format)
    except (OoxmlProblem, OutputRefused, OSError):
        return False
    return True
