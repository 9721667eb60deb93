"""The API key never leaks: a canary key through a rejected key, hub faults and tracebacks."""

from __future__ import annotations

import subprocess
import uuid
import zipfile
from pathlib import Path

from daemon.emulator.hub import HubSettings as EmulatorSettings
from daemon.emulator.server import EmulatorServer
from tests.conftest import daemon_config
from tests.helpers import Daemon, cli, jobs_json, wait_for
from tests.scans import make_scan

BROKEN_PDF = b"%PDF-1.3\nThis is not a valid PDF file\n%%EOF\n"


def every_byte_under(folder: Path) -> dict[str, bytes]:
    """Each file's bytes, and each member's of the zip packages (docx, xlsx, pptx)."""
    found: dict[str, bytes] = {}
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        found[str(path)] = data
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as package:
                for name in package.namelist():
                    found[f"{path}!{name}"] = package.read(name)
    return found


def test_canary_key_appears_nowhere(tmp_path: Path, folders: dict[str, Path]) -> None:
    """Logs, CLI output, argv, environment, database, heartbeat and outputs never hold the key."""
    canary = f"CANARY-{uuid.uuid4().hex}"
    outputs: list[subprocess.CompletedProcess[str]] = []
    with EmulatorServer(EmulatorSettings(processing_time=0.2, seed=3, api_keys=(canary,))) as hub:
        (folders["inbox"] / "a").mkdir()
        (folders["inbox"] / "a" / "scan.png").write_bytes(make_scan("png", seed=1))
        (folders["inbox"] / "broken.pdf").write_bytes(BROKEN_PDF)
        blocker = tmp_path / "a-file-not-a-folder"
        blocker.write_text("x", encoding="utf-8")
        config = daemon_config(
            tmp_path,
            folders,
            hub.url,
            key=canary,
            auth_recheck_interval=0.3,
            heartbeat_interval=0.2,
            # An unwritable heartbeat makes the daemon log a traceback on every beat.
            heartbeat_file=str(blocker / "heartbeat.json"),
            log_level="debug",
        )
        hub.hub.update_faults({"error_rate": 1.0})  # first every request fails (5xx)
        daemon = Daemon(config, tmp_path / "daemon.log").start()
        try:
            wait_for(lambda: "step will be retried" in daemon.log(), 30, "a retried 5xx")
            hub.hub.set_keys(api_keys=["someone-else"])  # then the key is refused
            hub.hub.update_faults({"error_rate": 0.0})
            wait_for(lambda: "rejected the API key" in daemon.log(), 30, "the key rejection")
            wait_for(lambda: '"exc_type"' in daemon.log(), 30, "a traceback")
            assert daemon.proc is not None
            proc = Path(f"/proc/{daemon.proc.pid}")
            process_view = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
            outputs += [cli(config, "status"), cli(config, "check")]
            hub.hub.set_keys(api_keys=[canary])  # and accepted again
            wait_for(
                lambda: sorted(j["status"] for j in jobs_json(config)) == ["completed", "failed"],
                60,
                "every job to be final",
            )
            outputs += [
                cli(config, "status"),
                cli(config, "status", "--json"),
                cli(config, "jobs", "--json"),
            ]
        finally:
            assert daemon.stop() == 0
    log = daemon.log()
    assert "accepted again" in log
    assert canary not in log
    assert canary.encode() not in process_view
    for result in outputs:
        assert canary not in result.stdout + result.stderr, result.args
    assert "API key REJECTED" in outputs[0].stdout
    assert "api key: rejected" in outputs[1].stdout
    assert "API key accepted" in outputs[2].stdout
    stored = every_byte_under(folders["state"]) | every_byte_under(folders["outbox"])
    assert any(name.endswith("state.db") for name in stored)
    assert any(name.endswith(".docx") for name in stored)
    leaks = [name for name, data in stored.items() if canary.encode() in data]
    assert leaks == []


def test_a_key_that_cannot_be_a_header_is_refused_unseen(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    """A key with a space or a control character stops the daemon at once, without showing it."""
    canary = f"CANARY {uuid.uuid4().hex}"
    config = daemon_config(tmp_path, folders, "http://127.0.0.1:9", key=canary)
    result = cli(config, "once")
    assert result.returncode == 2
    assert "the API key contains spaces" in result.stderr
    assert canary not in result.stdout + result.stderr
    assert canary.split()[1] not in result.stdout + result.stderr
