"""What intake holds back or refuses before anything is sent: unreadable, too large, unsafe."""

from __future__ import annotations

import asyncio
import ctypes
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.config import load_settings
from daemon.emulator.server import EmulatorServer
from daemon.inbox.intake import MAX_UPLOAD_BYTES
from daemon.service import run_service
from tests.conftest import daemon_config
from tests.helpers import wait_for
from tests.intake_support import done, rows, running, uploads
from tests.ops.test_explain import explained, stalled, waiting
from tests.scans import make_scan

# Root reads a chmod 000 file anyway (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH): the daemon
# runs without those two in its bounding set, so after exec it has them no more.
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork


def _drop_file_override() -> None:
    """In the child, before exec: give up the capabilities that ignore file modes."""
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if _LIBC.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))


AS_DAEMON: Callable[[], None] | None = _drop_file_override if os.geteuid() == 0 else None


def locked_file(path: Path, data: bytes) -> Path:
    """Write ``path`` with mode 000; skip unless a daemon started here gets EACCES on it."""
    path.write_bytes(data)
    path.chmod(0)
    try:
        probe = subprocess.run(
            [sys.executable, "-c", f"open({str(path)!r}, 'rb')"],
            capture_output=True,
            preexec_fn=AS_DAEMON,
            check=False,
        )
    except subprocess.SubprocessError:
        _cannot_test("cannot drop CAP_DAC_OVERRIDE here (no CAP_SETPCAP)")
    if probe.returncode == 0:
        _cannot_test("file modes are not enforced for this user")
    assert b"PermissionError" in probe.stderr
    return path


def _cannot_test(why: str) -> None:
    """Where the machine cannot make an unreadable file: fail in CI, which must prove the
    behaviour, and skip on a developer's machine that lacks the means."""
    if os.environ.get("CI"):
        pytest.fail(f"an unreadable file cannot be made: {why}")
    pytest.skip(why)


def job(db: Path, path: str) -> dict[str, Any]:
    """The latest job row of ``path`` once it is final, else an empty dict."""
    found = [r for r in rows(db) if r["path"] == path and r["status"] in ("completed", "failed")]
    return found[-1] if found else {}


def test_unreadable_input_stalls_as_unreadable_then_fails(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A file the daemon may not read shows as unreadable, then fails with an error file."""
    inbox, db = folders["inbox"], folders["state"] / "state.db"
    locked = locked_file(inbox / "locked.pdf", make_scan("pdf", 1))
    (inbox / "ok.png").write_bytes(make_scan("png", 2))
    config = daemon_config(
        tmp_path, folders, emulator.url, quiet_period=0.2, stalled_after=0.3, incomplete_timeout=4
    )
    with running(config, tmp_path / "daemon.log", preexec_fn=AS_DAEMON) as daemon:
        wait_for(lambda: waiting(db) == ["locked.pdf"], 30, "locked.pdf to show as stalled")
        shown = stalled(capsys, config)["locked.pdf"]
        assert shown["code"] == "unreadable"
        assert "Permission denied" in shown["reason"]
        assert "read access" in shown["reason"]
        assert explained(capsys, config, locked)["locked.pdf"]["state"] == "unreadable"
        failed = wait_for(lambda: job(db, "locked.pdf"), 30, "locked.pdf to fail")
        wait_for(lambda: "ok.png" in done(db), 30, "ok.png to convert")
        log = daemon.log()
    assert (failed["status"], failed["error_code"]) == ("failed", "unreadable")
    assert log.count("an input cannot be read by the daemon") == 1  # not at every look
    error = (folders["outbox"] / "locked.pdf.error.txt").read_text(encoding="utf-8")
    assert "Code:   unreadable" in error
    assert "give the daemon's user read access" in error
    assert waiting(db) == []
    assert uploads(emulator) == Counter({"ok.png": 1})


def test_unreadable_input_made_readable_is_converted(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """A file given read access before incomplete_timeout is converted at the next rescan."""
    inbox, db = folders["inbox"], folders["state"] / "state.db"
    locked = locked_file(inbox / "locked.pdf", make_scan("pdf", 3))
    config = daemon_config(
        tmp_path,
        folders,
        emulator.url,
        quiet_period=0.2,
        stalled_after=0.3,
        incomplete_timeout=300,
        rescan_interval=0.5,
    )
    with running(config, tmp_path / "daemon.log", preexec_fn=AS_DAEMON):
        wait_for(lambda: waiting(db) == ["locked.pdf"], 30, "locked.pdf to show as stalled")
        locked.chmod(0o644)
        converted = wait_for(lambda: job(db, "locked.pdf"), 30, "locked.pdf to convert")
        wait_for(lambda: waiting(db) == [], 30, "locked.pdf not to show as stalled")
    assert converted["status"] == "completed"
    assert uploads(emulator) == Counter({"locked.pdf": 1})
    assert not (folders["outbox"] / "locked.pdf.error.txt").exists()


def test_once_fails_an_unreadable_input_at_once(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """``once`` cannot wait for a person: an unreadable file fails as soon as it is quiet."""
    inbox, db = folders["inbox"], folders["state"] / "state.db"
    locked_file(inbox / "locked.pdf", make_scan("pdf", 4))
    config = daemon_config(tmp_path, folders, emulator.url, quiet_period=0.2)
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "once", "-c", str(config)],
        capture_output=True,
        timeout=60,
        preexec_fn=AS_DAEMON,
        check=False,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert job(db, "locked.pdf").get("error_code") == "unreadable"


def test_input_over_the_upload_cap_is_refused_unsent(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """A PDF over 200 MB fails with too_large and is never uploaded; the others convert."""
    inbox, db = folders["inbox"], folders["state"] / "state.db"
    huge = inbox / "huge.pdf"
    huge.write_bytes(b"%PDF-1.7\n")
    os.truncate(huge, MAX_UPLOAD_BYTES + 1)  # sparse: nothing near that size is written
    (inbox / "ok.png").write_bytes(make_scan("png", 5))
    config = daemon_config(tmp_path, folders, emulator.url)
    outcome = asyncio.run(run_service(load_settings(config), once=True))
    assert outcome is not None
    assert outcome.exit_code == 1
    failed = job(db, "huge.pdf")
    assert failed["error_code"] == "too_large"
    assert "200.0 MB, more than the hub takes in one upload (200 MB)" in failed["error_message"]
    assert "split it" in (folders["outbox"] / "huge.pdf.error.txt").read_text(encoding="utf-8")
    assert "ok.png" in done(db)
    assert uploads(emulator) == Counter({"ok.png": 1})


def test_input_with_a_linked_output_folder_is_refused_unsent(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """An input whose output folder is a symlink fails with unsafe_output_path, unsent."""
    inbox, outbox, db = folders["inbox"], folders["outbox"], folders["state"] / "state.db"
    for rel, fmt in {"dept/scan.pdf": "pdf", "other/page.png": "png", "top.jpg": "jpeg"}.items():
        (inbox / rel).parent.mkdir(exist_ok=True)
        (inbox / rel).write_bytes(make_scan(fmt, len(rel)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (outbox / "dept").symlink_to(elsewhere)
    config = daemon_config(tmp_path, folders, emulator.url)
    outcome = asyncio.run(run_service(load_settings(config), once=True))
    assert outcome is not None
    assert outcome.exit_code == 1
    failed = job(db, "dept/scan.pdf")
    assert failed["error_code"] == "unsafe_output_path"
    assert f"{outbox / 'dept'} is a symbolic link" in failed["error_message"]
    assert set(done(db)) == {"other/page.png", "top.jpg"}
    assert uploads(emulator) == Counter({"page.png": 1, "top.jpg": 1})
    assert list(elsewhere.iterdir()) == []  # nothing written through the link


def test_input_with_a_linked_archive_folder_is_refused_unsent(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """With on_success = "archive", a symlinked archive folder fails its inputs unsent."""
    inbox, db = folders["inbox"], folders["state"] / "state.db"
    archive, elsewhere = tmp_path / "archive", tmp_path / "elsewhere"
    archive.mkdir()
    elsewhere.mkdir()
    (archive / "dept").symlink_to(elsewhere)
    for rel, fmt in {"dept/scan.pdf": "pdf", "other/page.png": "png"}.items():
        (inbox / rel).parent.mkdir(exist_ok=True)
        (inbox / rel).write_bytes(make_scan(fmt, len(rel)))
    config = daemon_config(
        tmp_path, folders, emulator.url, on_success="archive", archive_dir=str(archive)
    )
    outcome = asyncio.run(run_service(load_settings(config), once=True))
    assert outcome is not None
    assert outcome.exit_code == 1
    failed = job(db, "dept/scan.pdf")
    assert failed["error_code"] == "unsafe_output_path"
    assert f"{archive / 'dept'} is a symbolic link" in failed["error_message"]
    assert (inbox / "dept" / "scan.pdf").exists()  # refused inputs stay where they are
    assert set(done(db)) == {"other/page.png"}
    assert (archive / "other" / "page.png").exists()
    assert uploads(emulator) == Counter({"page.png": 1})
    assert list(elsewhere.iterdir()) == []


def test_a_linked_archive_folder_does_not_refuse_inputs_that_are_kept(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """A rule that keeps a folder's inputs converts them even if its archive folder is a link."""
    inbox, db = folders["inbox"], folders["state"] / "state.db"
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "dept").symlink_to(tmp_path)
    (inbox / "dept").mkdir()
    (inbox / "dept" / "scan.pdf").write_bytes(make_scan("pdf", 3))
    config = daemon_config(
        tmp_path, folders, emulator.url, on_success="archive", archive_dir=str(archive)
    )
    with config.open("a", encoding="utf-8") as file:
        file.write('\n[[rules]]\nmatch = "dept/**"\non_success = "keep"\n')
    outcome = asyncio.run(run_service(load_settings(config), once=True))
    assert outcome is not None
    assert outcome.exit_code == 0
    assert set(done(db)) == {"dept/scan.pdf"}
    assert (inbox / "dept" / "scan.pdf").exists()
