"""Links inside the outbox (or archive) never send a file outside it (guarantee G9)."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.emulator.server import EmulatorServer
from daemon.errors import JobFailed, RetryLater, UnsafeOutputPath
from daemon.inbox.inputs import signature_of
from daemon.outbox import publish as outbox
from daemon.outbox.duplicates import copy_output
from daemon.outbox.permissions import OutputPermissions, check_dirs, make_dirs, open_output
from tests.conftest import daemon_config
from tests.helpers import cli
from tests.intake_support import outputs, rows
from tests.scans import make_scan

PERMS = OutputPermissions(mode=0o640)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside every configured folder, which must stay empty."""
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


def linked_outbox(tmp_path: Path, outside: Path) -> Path:
    """An outbox whose subfolder ``a`` is a symbolic link to ``outside``."""
    root = tmp_path / "outbox"
    root.mkdir()
    (root / "a").symlink_to(outside)
    return root


@pytest.mark.parametrize("perms", [PERMS, None], ids=["with-perms", "no-perms"])
def test_make_dirs_refuses_a_link_below_the_root(
    tmp_path: Path, outside: Path, perms: OutputPermissions | None
) -> None:
    """A symlinked folder below the root is refused with a readable, per-job error."""
    root = linked_outbox(tmp_path, outside)
    with pytest.raises(UnsafeOutputPath) as caught:
        make_dirs(root, root / "a" / "b", perms)
    assert isinstance(caught.value, JobFailed)
    assert caught.value.code == "unsafe_output_path"
    assert f"{root / 'a'} is a symbolic link" in caught.value.message
    assert list(outside.iterdir()) == []


def test_make_dirs_refuses_a_file_where_a_folder_belongs(tmp_path: Path) -> None:
    """A regular file in the folder chain is refused, not mistaken for a folder."""
    (tmp_path / "a").write_text("not a folder")
    with pytest.raises(UnsafeOutputPath, match="is not a folder"):
        make_dirs(tmp_path, tmp_path / "a" / "b", PERMS)


def test_make_dirs_accepts_a_linked_root(tmp_path: Path) -> None:
    """The root itself may be a link set up by the administrator; folders go below it."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "root").symlink_to(real)
    make_dirs(tmp_path / "root", tmp_path / "root" / "a" / "b", PERMS)
    assert (real / "a" / "b").is_dir()
    assert not (real / "a").is_symlink()


def test_check_dirs_tells_a_linked_chain(tmp_path: Path, outside: Path) -> None:
    """check_dirs is False for a link in the chain, True for real or missing folders."""
    root = linked_outbox(tmp_path, outside)
    assert not check_dirs(root, root / "a" / "b")
    assert check_dirs(root, root / "missing" / "b")


def test_open_output_refuses_a_link_at_the_temporary_name(tmp_path: Path) -> None:
    """A link planted under a temporary name is refused and its target left untouched."""
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    (tmp_path / ".out.docx.ldx-part-1").symlink_to(target)
    with pytest.raises(UnsafeOutputPath, match="is a link or a special file"):
        open_output(tmp_path / ".out.docx.ldx-part-1")
    assert target.read_text() == "keep me"


def test_error_file_is_not_written_through_a_link(tmp_path: Path, outside: Path) -> None:
    """The error file of an input below a linked folder is skipped (and logged)."""
    root = linked_outbox(tmp_path, outside)
    assert outbox.write_error_file(root, "a/scan.png", "reason", PERMS) is None
    assert list(outside.iterdir()) == []


def test_error_file_is_not_removed_through_a_link(tmp_path: Path, outside: Path) -> None:
    """Removing a stale error file never deletes a file beyond a linked folder."""
    root = linked_outbox(tmp_path, outside)
    (outside / "scan.png.error.txt").write_text("not the daemon's")
    outbox.remove_error_file(root, "a/scan.png")
    assert (outside / "scan.png.error.txt").exists()


@pytest.mark.parametrize("source", ["earlier/scan.docx", "a/scan.docx"], ids=["copy", "same"])
def test_copy_output_refuses_a_linked_target_folder(
    tmp_path: Path, outside: Path, source: str
) -> None:
    """Reusing an earlier output never copies into, nor counts an output beyond, a link."""
    root = linked_outbox(tmp_path, outside)
    (root / "earlier").mkdir()
    (root / "earlier" / "scan.docx").write_bytes(b"PK")
    with pytest.raises(UnsafeOutputPath):
        copy_output(root, source, "a/scan.docx", "docx", job_id=1, perms=PERMS)
    assert list(outside.iterdir()) == []


def test_archive_refuses_a_linked_folder(tmp_path: Path, outside: Path) -> None:
    """A linked folder below the archive root is retried, the input left in the inbox."""
    inbox, archive = tmp_path / "inbox", tmp_path / "archive"
    (inbox / "a").mkdir(parents=True)
    (inbox / "a" / "scan.png").write_bytes(b"scan")
    archive.mkdir()
    (archive / "a").symlink_to(outside)
    converted = signature_of((inbox / "a" / "scan.png").stat())
    with pytest.raises(RetryLater) as caught:
        outbox.archive_input(inbox, archive, "a/scan.png", converted)
    assert caught.value.code == "unsafe_output_path"
    assert (inbox / "a" / "scan.png").exists()
    assert list(outside.iterdir()) == []


def test_daemon_fails_a_job_whose_output_folder_is_a_link(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer, outside: Path
) -> None:
    """End to end: the job fails as unsafe_output_path, nothing lands outside, others convert."""
    real_outbox = folders["outbox"]
    linked_root = tmp_path / "outbox-link"  # a linked outbox root stays allowed
    linked_root.symlink_to(real_outbox)
    (real_outbox / "a").symlink_to(outside)
    for folder, seed in (("a", 1), ("b", 2)):
        (folders["inbox"] / folder).mkdir()
        (folders["inbox"] / folder / "scan.png").write_bytes(make_scan("png", seed))
    config = daemon_config(tmp_path, {**folders, "outbox": linked_root}, emulator.url)
    result = cli(config, "once")
    assert result.returncode == 1, result.stdout + result.stderr  # one job failed
    assert list(outside.iterdir()) == []
    assert outputs(real_outbox) == ["b/scan.docx"]
    failed = {r["path"]: r for r in rows(folders["state"] / "state.db")}["a/scan.png"]
    assert failed["status"] == "failed"
    assert failed["error_code"] == "unsafe_output_path"
    assert "is a symbolic link" in failed["error_message"]
    assert "error file not written" in result.stdout + result.stderr
    assert (folders["inbox"] / "a" / "scan.png").exists()
