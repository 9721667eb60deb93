"""The API key never leaks: a canary key through a rejected key, hub faults and tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import httpx
import pytest

from daemon.config import load_settings
from daemon.emulator.hub import HubSettings as EmulatorSettings
from daemon.emulator.server import EmulatorServer
from tests.conftest import WebhookReceiver, daemon_config, toml_value
from tests.helpers import Daemon, cli, jobs_json, wait_for
from tests.scans import make_scan
from tests.tooling import free_port

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
    """Logs, CLI output, argv, environment, database and outputs never hold the key."""
    canary = f"CANARY-{uuid.uuid4().hex}"
    outputs: list[subprocess.CompletedProcess[str]] = []
    with EmulatorServer(EmulatorSettings(processing_time=0.2, seed=3, api_keys=(canary,))) as hub:
        (folders["inbox"] / "a").mkdir()
        (folders["inbox"] / "a" / "scan.png").write_bytes(make_scan("png", seed=1))
        (folders["inbox"] / "broken.pdf").write_bytes(BROKEN_PDF)
        config = daemon_config(
            tmp_path,
            folders,
            hub.url,
            key=canary,
            auth_recheck_interval=0.3,
            heartbeat_interval=0.2,
            log_level="debug",
        )
        hub.hub.update_faults({"error_rate": 1.0})  # first every request fails (5xx)
        daemon = Daemon(config, tmp_path / "daemon.log").start()
        try:
            wait_for(lambda: "step will be retried" in daemon.log(), 30, "a retried 5xx")
            hub.hub.set_keys(api_keys=["someone-else"])  # then the key is refused
            hub.hub.update_faults({"error_rate": 0.0})
            wait_for(lambda: "rejected the API key" in daemon.log(), 30, "the key rejection")
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


DUMP_HOOK_ENV = (
    "import json, os, sys; open(sys.argv[1], 'a').write(json.dumps(dict(os.environ)) + '\\n')"
)


def echo_config(
    tmp_path: Path, folders: dict[str, Path], url: str, canary: str, hook_url: str
) -> Path:
    """A daemon configuration with hooks, a webhook, metrics and a rule the hub refuses."""
    port = free_port()
    config = daemon_config(
        tmp_path,
        folders,
        url,
        key=canary,
        auth_recheck_interval=0.3,
        heartbeat_interval=0.2,
        metrics_port=port,
        log_level="debug",
    )
    hook = [sys.executable, "-c", DUMP_HOOK_ENV, str(tmp_path / "hook-env.jsonl")]
    extra = (
        '\n[[rules]]\nmatch = "bad/*"\nlanguage = "zzz"\n'  # the hub refuses it: HTTP 400
        f"\n[hooks]\non_completed = {toml_value(hook)}\non_failed = {toml_value(hook)}\n"
        f'webhook_url = "{hook_url}"\n'
    )
    config.write_text(config.read_text(encoding="utf-8") + extra, encoding="utf-8")
    return config


def test_a_hub_echoing_the_key_cannot_make_it_leak(
    tmp_path: Path,
    folders: dict[str, Path],
    receiver: tuple[str, type[WebhookReceiver]],
) -> None:
    """Every error body repeats the Authorization header (5xx, 401, 402, 400): the key is
    in no error file, database, jobs/status output, health or /healthz answer, metric,
    hook environment, webhook body or log line; each echo arrived, masked."""
    canary = f"CANARY{uuid.uuid4().hex}"
    hook_url, handler = receiver
    seen: list[str] = []  # every answer a person or a program could read
    inbox = folders["inbox"]
    settings = EmulatorSettings(processing_time=0.2, seed=4, api_keys=(canary,))
    with EmulatorServer(settings) as hub:
        # No engine list: the rule's language is only refused by the job's creation.
        hub.hub.update_knobs({"echo_auth": True, "engines_shape": "empty", "error_rate": 1.0})
        config = echo_config(tmp_path, folders, hub.url, canary, hook_url)
        port = load_settings(config).metrics_port

        def look() -> None:
            for args in (("status", "--json"), ("status",), ("jobs", "--json"), ("jobs",)):
                result = cli(config, *args)
                seen.append(result.stdout + result.stderr)
            result = cli(config, "health", "--json")
            seen.append(result.stdout + result.stderr)
            for path in ("/healthz", "/metrics"):
                seen.append(httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10).text)

        def health_says(words: str) -> bool:
            result = cli(config, "health", "--json")
            return words in result.stdout

        (inbox / "one.png").write_bytes(make_scan("png", seed=1))
        daemon = Daemon(config, tmp_path / "daemon.log").start()
        try:
            wait_for(lambda: health_says("hub unreachable since"), 60, "the 5xx outage")
            look()
            hub.hub.update_knobs({"error_rate": 0.0})
            hub.hub.set_keys(api_keys=["someone-else"])  # 401, echoing our key
            wait_for(lambda: health_says("rejected the API key"), 60, "the key rejection")
            look()
            hub.hub.set_keys(api_keys=[canary])
            wait_for(lambda: "one.png" in done(config, "completed"), 60, "one.png")
            hub.hub.update_knobs({"refuse_route": "POST /renderocr/jobs", "refuse_status": 402})
            (inbox / "two.png").write_bytes(make_scan("png", seed=2))
            wait_for(lambda: health_says("Credit limit"), 60, "the credit refusal")
            look()
            hub.hub.update_knobs({"refuse_route": ""})
            wait_for(lambda: "two.png" in done(config, "completed"), 60, "two.png")
            (inbox / "bad").mkdir()
            (inbox / "bad" / "three.png").write_bytes(make_scan("png", seed=3))
            wait_for(lambda: "bad/three.png" in done(config, "failed"), 60, "the refused job")
            wait_for(lambda: len(handler.bodies) >= 3, 60, "three webhooks")
            wait_for(lambda: hook_runs(tmp_path) >= 3, 60, "three hook runs")
            look()
            assert daemon.proc is not None
            proc = Path(f"/proc/{daemon.proc.pid}")
            process_view = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        finally:
            assert daemon.stop() == 0
    stored = every_byte_under(folders["state"]) | every_byte_under(folders["outbox"])
    stored["hook environments"] = (tmp_path / "hook-env.jsonl").read_bytes()
    stored["webhook bodies"] = json.dumps(handler.bodies).encode()
    stored["daemon log"] = daemon.log().encode()
    stored["what was shown"] = "\n".join(seen).encode()
    stored["process"] = process_view
    assert [name for name, data in stored.items() if canary.encode() in data] == []
    # The attack happened: each echo reached the daemon and was masked where it shows.
    error_file = (folders["outbox"] / "bad" / "three.png.error.txt").read_text(encoding="utf-8")
    assert "Authorization: Bearer ***" in error_file
    assert "invalid_language" in error_file
    failed = [body for body in handler.bodies if body["status"] == "failed"]
    assert "Bearer ***" in failed[0]["error"]["message"]
    shown = "\n".join(seen)
    for echoed in ("HTTP 50", "HTTP 401", "Credit limit"):
        assert any(echoed in text and "Bearer ***" in text for text in seen), echoed
    assert "Bearer ***" in shown
    hook_envs = [json.loads(line) for line in stored["hook environments"].splitlines()]
    assert "Bearer ***" in next(
        e["LDX_ERROR_MESSAGE"] for e in hook_envs if e["LDX_STATUS"] == "failed"
    )
    assert not any("LDX_HOTFOLDER_HUB__API_KEY" in env for env in hook_envs)


def done(config: Path, status: str) -> set[str]:
    """The paths whose job has ``status``."""
    return {job["path"] for job in jobs_json(config) if job["status"] == status}


def hook_runs(tmp_path: Path) -> int:
    """How many times a command hook ran."""
    dump = tmp_path / "hook-env.jsonl"
    return len(dump.read_text(encoding="utf-8").splitlines()) if dump.exists() else 0


@pytest.mark.parametrize("command", ["run", "once", "check"])
def test_a_key_file_that_is_not_utf8_stops_each_command_unseen(
    tmp_path: Path, folders: dict[str, Path], command: str
) -> None:
    """A UTF-16 key file (as Notepad saves "Unicode"): exit 2 naming the file and the fix,
    no traceback, and the key in no form in the output."""
    canary = f"CANARY{uuid.uuid4().hex}"
    config = daemon_config(tmp_path, folders, "http://127.0.0.1:9")
    key_file = tmp_path / "api-key"
    key_file.write_bytes((canary + "\r\n").encode("utf-16"))
    result = cli(config, command, timeout=60)
    said = result.stdout + result.stderr
    assert result.returncode == 2, said
    assert f"the API key file {key_file} is UTF-16 text" in said
    assert "Traceback" not in said
    for shape in (canary, canary.encode("utf-16-le").decode("latin-1"), canary[:12]):
        assert shape not in said


def test_a_missing_key_file_is_named(tmp_path: Path, folders: dict[str, Path]) -> None:
    """A configured key file that is not there: the message names it, exit 2."""
    config = daemon_config(tmp_path, folders, "http://127.0.0.1:9")
    (tmp_path / "api-key").unlink()
    result = cli(config, "once", timeout=60)
    assert result.returncode == 2
    assert f"the API key file {tmp_path / 'api-key'} (hub.api_key_file) does not exist" in (
        result.stderr
    )
