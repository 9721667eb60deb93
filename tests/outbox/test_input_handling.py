"""Deleting and archiving a converted input: only that version, never through a link (#35).

Real folders, real links and a real second filesystem (``/dev/shm``) for the copy across
filesystems; no filesystem call is patched.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import fs
from daemon.inbox.inputs import signature_of
from daemon.inbox.stability import Signature
from daemon.outbox import publish as outbox
from tests.conftest import IN_CI

SECRET = b"%PDF-1.4 not the daemon's to move\n"
SCAN = b"%PDF-1.4 the scan\n"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the daemon's folders holding a file named like the input."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.key").write_bytes(SECRET)
    return folder


def dropped(inbox: Path, rel: str, data: bytes) -> Signature:
    """Write an input and return the version the daemon would have converted."""
    path = inbox / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return signature_of(path.stat())


def swap_folder_for_link(inbox: Path, outside: Path, *, carry: bool) -> None:
    """``mv x x.orig; ln -s OUTSIDE x``: the attack on a converted input's folder. With
    ``carry`` the converted file itself is first moved to OUTSIDE (same inode, size and
    mtime, so a check of the version alone would not tell)."""
    if carry:
        (outside / "secret.key").unlink()
        (inbox / "x" / "secret.key").rename(outside / "secret.key")
    (inbox / "x").rename(inbox / "x.orig")
    (inbox / "x").symlink_to(outside)


@pytest.mark.parametrize("carry", [False, True], ids=["other-file", "same-inode"])
def test_archive_never_follows_a_folder_swapped_for_a_link(
    tmp_path: Path, outside: Path, carry: bool
) -> None:
    """The archive step walks from the inbox root without links: the outside file stays."""
    inbox, archive = tmp_path / "inbox", tmp_path / "archive"
    converted = dropped(inbox, "x/secret.key", SCAN)
    swap_folder_for_link(inbox, outside, carry=carry)
    assert outbox.archive_input(inbox, archive, "x/secret.key", converted) is None
    assert (outside / "secret.key").read_bytes() == (SCAN if carry else SECRET)
    assert not archive.exists() or list(archive.rglob("*")) == []


@pytest.mark.parametrize("carry", [False, True], ids=["other-file", "same-inode"])
def test_delete_never_follows_a_folder_swapped_for_a_link(
    tmp_path: Path, outside: Path, carry: bool
) -> None:
    """Deleting walks from the inbox root without links: nothing outside is removed."""
    inbox = tmp_path / "inbox"
    converted = dropped(inbox, "x/secret.key", SCAN)
    swap_folder_for_link(inbox, outside, carry=carry)
    assert outbox.delete_input(inbox, "x/secret.key", converted) is False
    assert (outside / "secret.key").read_bytes() == (SCAN if carry else SECRET)


@pytest.mark.parametrize("how", ["renamed over", "rewritten in place"])
def test_a_newer_version_is_neither_archived_nor_deleted(tmp_path: Path, how: str) -> None:
    """A file written under the input's name after it was converted stays in the inbox."""
    inbox, archive = tmp_path / "inbox", tmp_path / "archive"
    converted = dropped(inbox, "a/scan.pdf", b"%PDF-1.4 version one\n")
    newer = b"%PDF-1.4 version two, longer\n"
    if how == "renamed over":
        (inbox / "a" / ".new").write_bytes(newer)
        (inbox / "a" / ".new").rename(inbox / "a" / "scan.pdf")
    else:
        (inbox / "a" / "scan.pdf").write_bytes(newer)
    assert outbox.archive_input(inbox, archive, "a/scan.pdf", converted) is None
    assert outbox.delete_input(inbox, "a/scan.pdf", converted) is False
    assert (inbox / "a" / "scan.pdf").read_bytes() == newer
    assert not (archive / "a" / "scan.pdf").exists()


def test_the_converted_version_is_archived_and_deleted(tmp_path: Path) -> None:
    """The version that was converted moves into the archive (mirrored), or is deleted."""
    inbox, archive = tmp_path / "inbox", tmp_path / "archive"
    converted = dropped(inbox, "a/b/scan.pdf", b"%PDF-1.4 version one\n")
    (archive / "a" / "b").mkdir(parents=True)
    (archive / "a" / "b" / "scan.pdf").write_bytes(b"an older archived scan")
    target = outbox.archive_input(inbox, archive, "a/b/scan.pdf", converted)
    assert target == archive / "a" / "b" / "scan (2).pdf"  # never overwrites
    assert target.read_bytes() == b"%PDF-1.4 version one\n"
    assert not (inbox / "a" / "b" / "scan.pdf").exists()
    converted = dropped(inbox, "c.pdf", b"%PDF-1.4 to delete\n")
    assert outbox.delete_input(inbox, "c.pdf", converted) is True
    assert not (inbox / "c.pdf").exists()
    assert [p.name for p in inbox.iterdir()] == ["a"]  # no hidden leftover


def test_a_file_swapped_in_at_the_last_moment_is_put_back(tmp_path: Path) -> None:
    """Between the check and the rename another file takes the name: it is put back."""
    folder = tmp_path / "inbox"
    folder.mkdir()
    (folder / "scan.pdf").write_bytes(b"converted")
    taken = (folder / "scan.pdf").stat()
    (folder / "scan.pdf").rename(folder / "kept")  # a newer file takes the name
    (folder / "scan.pdf").write_bytes(b"newer")
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert fs.move_version(fd, "scan.pdf", fd, "moved.pdf", taken) is False
        assert fs.remove_version(fd, "scan.pdf", taken, ".hidden") is False
    finally:
        os.close(fd)
    assert sorted(p.name for p in folder.iterdir()) == ["kept", "scan.pdf"]
    assert (folder / "scan.pdf").read_bytes() == b"newer"


@pytest.fixture
def other_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A folder on another filesystem than ``tmp_path`` (a tmpfs), removed afterwards."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        if IN_CI:
            pytest.fail("CI must test archiving across filesystems, but /dev/shm is missing")
        pytest.skip("no second filesystem (/dev/shm) here")
    folder = shm / f"ldx-archive-{uuid.uuid4().hex}"
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_archive_across_filesystems_copies_the_opened_version(
    tmp_path: Path, other_filesystem: Path
) -> None:
    """EXDEV: the opened version is copied (times kept), flushed, then removed from the inbox."""
    inbox = tmp_path / "inbox"
    converted = dropped(inbox, "a/scan.pdf", b"%PDF-1.4 version one\n" * 1000)
    mtime = (inbox / "a" / "scan.pdf").stat().st_mtime_ns
    target = outbox.archive_input(inbox, other_filesystem, "a/scan.pdf", converted)
    assert target == other_filesystem / "a" / "scan.pdf"
    assert target.read_bytes() == b"%PDF-1.4 version one\n" * 1000
    assert target.stat().st_mtime_ns == mtime
    assert not (inbox / "a" / "scan.pdf").exists()
    assert os.listdir(inbox / "a") == []  # no hidden leftover in the inbox
    assert os.listdir(other_filesystem / "a") == ["scan.pdf"]  # nor in the archive


def test_archive_across_filesystems_keeps_a_newer_version(
    tmp_path: Path, other_filesystem: Path
) -> None:
    """Across filesystems too, a newer version under the input's name is not copied."""
    inbox = tmp_path / "inbox"
    converted = dropped(inbox, "scan.pdf", b"%PDF-1.4 version one\n")
    (inbox / "scan.pdf").write_bytes(b"%PDF-1.4 version two, longer\n")
    assert outbox.archive_input(inbox, other_filesystem, "scan.pdf", converted) is None
    assert list(other_filesystem.rglob("*")) == []
    assert (inbox / "scan.pdf").read_bytes() == b"%PDF-1.4 version two, longer\n"
