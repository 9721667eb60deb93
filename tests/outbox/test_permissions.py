"""Outputs get ``output_mode`` and ``output_group`` whatever the umask of the daemon."""

from __future__ import annotations

import grp
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import load_settings, parse_mode
from daemon.emulator.server import EmulatorServer
from daemon.errors import ConfigError
from daemon.outbox.permissions import OutputPermissions, dir_mode_for, resolve_group
from tests.conftest import daemon_config
from tests.helpers import _env
from tests.scans import make_scan

BROKEN_PDF = b"%PDF-1.3\nThis is not a valid PDF file\n%%EOF\n"


def other_group() -> int:
    """A group that is not the test process's own, that this process may give files to."""
    mine = os.getegid()
    if os.geteuid() == 0:
        for group in grp.getgrall():
            if group.gr_gid not in (mine, 0):
                return group.gr_gid
    for gid in os.getgroups():
        if gid != mine:
            return gid
    return mine  # no other group available: at least the configured group is applied


@pytest.mark.parametrize(
    ("value", "mode"), [(0o640, 0o640), ("0640", 0o640), ("640", 0o640), ("0o600", 0o600)]
)
def test_parse_mode_accepts_octal_forms(value: object, mode: int) -> None:
    """A TOML octal number or an octal string give the same mode."""
    assert parse_mode(value) == mode


@pytest.mark.parametrize("value", ["rw-r-----", "0999", 0o4755, 0o040, True])
def test_parse_mode_rejects_nonsense(value: object) -> None:
    """Words, non-octal digits, special bits and modes hiding outputs from the daemon fail."""
    with pytest.raises(ValueError, match="mode"):
        parse_mode(value)


def test_folder_modes_follow_file_modes() -> None:
    """Search bits wherever read is granted: 0640 gives 0750, 0644 gives 0755, 0600 0700."""
    assert dir_mode_for(0o640) == 0o750
    assert dir_mode_for(0o644) == 0o755
    assert dir_mode_for(0o600) == 0o700


def test_settings_take_mode_and_group_from_file_and_environment(
    tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """output_mode as a string in TOML, overridden by an environment variable; unknown group."""
    config = daemon_config(tmp_path, folders, "http://127.0.0.1:9", output_mode="0600")
    assert load_settings(config).output_mode == 0o600
    monkeypatch.setenv("LDX_HOTFOLDER_OUTPUT_MODE", "0644")
    assert load_settings(config).output_mode == 0o644
    with pytest.raises(ConfigError, match="no group named"):
        resolve_group("no-such-group-ldx")
    assert OutputPermissions.of(0o640, "0").gid == 0


@pytest.mark.parametrize("umask", [0o000, 0o077], ids=["umask-000", "umask-077"])
def test_outputs_get_the_configured_mode_and_group(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer, umask: int
) -> None:
    """Under umask 000 and 077: outputs 0640, folders 0750, state and archive closed to others."""
    gid = other_group()
    (folders["inbox"] / "a" / "b").mkdir(parents=True)
    (folders["inbox"] / "a" / "b" / "scan.png").write_bytes(make_scan("png", seed=4))
    (folders["inbox"] / "c").mkdir()
    (folders["inbox"] / "c" / "broken.pdf").write_bytes(BROKEN_PDF)
    archive, state = tmp_path / "archive", tmp_path / "new-state"
    config = daemon_config(
        tmp_path,
        folders,
        emulator.url,
        output_mode=0o640,
        output_group=str(gid),
        on_success="archive",
        archive_dir=str(archive),
        state_db=str(state / "state.db"),
    )
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "once", "-c", str(config)],
        capture_output=True,
        text=True,
        env=_env(),
        umask=umask,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr  # the broken file failed
    outbox = folders["outbox"]
    files = [outbox / "a" / "b" / "scan.docx", outbox / "c" / "broken.pdf.error.txt"]
    folders_made = [outbox / "a", outbox / "a" / "b", outbox / "c"]
    for path in files:
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o640, path
        assert st.st_gid == gid, path
    for path in folders_made:
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o750, path
        assert st.st_gid == gid, path
    # The daemon's own files follow its umask, at least 027 whatever the caller's.
    own = [archive, archive / "a", archive / "a" / "b", state, state / "state.db"]
    assert (archive / "a" / "b" / "scan.png").exists()
    for path in own:
        assert stat.S_IMODE(path.stat().st_mode) & 0o027 == 0, path
