"""The systemd unit: it verifies, its sandbox scores at most 1.5, and it runs the daemon."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from daemon.cli import EXIT_CONFIG
from daemon.emulator.server import EmulatorServer
from tests.conftest import daemon_config
from tests.helpers import _env, wait_for
from tests.scans import make_scan
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
    """systemd-analyze security --offline rates the sandbox at most 1.5 (docs/operations.md)."""
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


def test_unit_does_not_restart_after_a_configuration_error() -> None:
    """Exit 2 (a configuration error, as ``run`` and ``check`` give it) is never restarted."""
    # Restarting every RestartSec cannot fix a configuration; a crash (any other failure)
    # is still restarted.
    entries = unit_entries(UNIT.read_text(encoding="utf-8"))
    prevented = {value for line in entries["RestartPreventExitStatus"] for value in line.split()}
    assert str(EXIT_CONFIG) in prevented
    assert one(entries, "Restart") == "on-failure"
    assert not prevented & {"1", "70", "SIGKILL", "SIGABRT"}


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


MDWE_RUNNER = """
import ctypes, runpy, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(77)
sys.argv = ["ldx-hotfolder", *sys.argv[1:]]
runpy.run_module("daemon", run_name="__main__", alter_sys=True)
"""


def test_daemon_runs_without_writable_executable_memory(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """Under the kernel's MDWE (what MemoryDenyWriteExecute=yes sets) the daemon still works."""
    (folders["inbox"] / "scan.png").write_bytes(make_scan("png", seed=3))
    config = daemon_config(tmp_path, folders, emulator.url)
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", MDWE_RUNNER, "run", "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
    try:
        wait_for(
            lambda: proc.poll() == 77 or (folders["outbox"] / "scan.docx").exists(),
            60,
            "the output",
        )
        if proc.poll() == 77:
            pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3)")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, log_path.read_text(encoding="utf-8")
    assert "watching the inbox" in log_path.read_text(encoding="utf-8")
