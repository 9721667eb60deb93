"""The systemd unit: it verifies, its sandbox scores at most 1.5, and it runs the daemon."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.tooling import REPO, program, require_tool

UNIT = REPO / "systemd" / "ldx-hotfolder.service"
SYSUSERS = REPO / "systemd" / "ldx-hotfolder.sysusers"
MAX_EXPOSURE = 1.5


def unit_entries(text: str) -> dict[str, list[str]]:
    """``Key`` -> every value it is given in the unit (comments and sections skipped)."""
    entries: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        entries.setdefault(key.strip(), []).append(value.strip())
    return entries


def one(entries: dict[str, list[str]], key: str) -> str:
    values = entries.get(key)
    assert values, f"{key}= is missing"
    return values[-1]


@pytest.fixture
def local_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's program (verify checks it)."""
    text = UNIT.read_text(encoding="utf-8")
    argv = shlex.split(one(unit_entries(text), "ExecStart"))
    local = text.replace(f"ExecStart={argv[0]}", f"ExecStart={program()}", 1)
    path = tmp_path / "ldx-hotfolder.service"
    path.write_text(local, encoding="utf-8")
    return path


def test_unit_verifies(local_unit: Path) -> None:
    """systemd-analyze verify accepts the unit without a warning."""
    tool = require_tool("systemd-analyze")
    result = subprocess.run(
        [tool, "verify", str(local_unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


def test_unit_security_exposure_at_most_1_5(local_unit: Path) -> None:
    """systemd-analyze security --offline rates the sandbox at most 1.5 (reliability.md §8)."""
    tool = require_tool("systemd-analyze")
    result = subprocess.run(
        [tool, "security", "--offline=true", "--threshold=15", str(local_unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, result.stdout


def test_unit_runs_the_daemon_as_a_notify_service() -> None:
    """Type=notify with a watchdog, restart on failure, `ldx-hotfolder run`, SIGHUP reload."""
    entries = unit_entries(UNIT.read_text(encoding="utf-8"))
    assert one(entries, "Type") == "notify"
    assert one(entries, "NotifyAccess") == "main"
    assert int(one(entries, "WatchdogSec")) > 0
    assert one(entries, "Restart") == "on-failure"
    argv = shlex.split(one(entries, "ExecStart"))
    assert Path(argv[0]).name == "ldx-hotfolder"
    assert argv[1] == "run"
    assert "-HUP" in one(entries, "ExecReload")
    assert int(one(entries, "TimeoutStopSec")) >= 30


def test_unit_identity_secret_and_paths() -> None:
    """A fixed system user, the key as a credential, the state and the two folders writable."""
    entries = unit_entries(UNIT.read_text(encoding="utf-8"))
    user = one(entries, "User")
    assert user not in ("", "root")
    assert "DynamicUser" not in entries
    assert one(entries, "LoadCredential").startswith("api-key:")
    assert "Environment" not in entries  # no secret (or anything) in systemctl show
    assert one(entries, "StateDirectory") == "ldx-hotfolder"
    example = tomllib.loads((REPO / "config.example.toml").read_text(encoding="utf-8"))
    writable = one(entries, "ReadWritePaths").split()
    assert example["inbox"] in writable
    assert example["outbox"] in writable
    assert one(entries, "ProtectSystem") == "strict"
    assert one(entries, "NoNewPrivileges") == "yes"
    assert one(entries, "CapabilityBoundingSet") == ""
    assert f"u {user} " in SYSUSERS.read_text(encoding="utf-8")
