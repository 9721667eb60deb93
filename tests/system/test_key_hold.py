"""Work held for a rejected key never stays held for ever, and ``health`` tells the truth.

The real daemon runs against the emulator behind a hostile front: a reverse proxy on
loopback that passes every request on but can answer the key recheck (``GET /files``)
with a 404 or a redirect, as a misconfigured gateway or a man in the middle would.
"""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from daemon.emulator.hub import DEFAULT_API_KEY
from daemon.emulator.server import EmulatorServer
from tests.conftest import daemon_config
from tests.front import Front
from tests.helpers import Daemon, cli, jobs_json, wait_for
from tests.scans import make_scan
from tests.tooling import free_port


@pytest.fixture
def front(emulator: EmulatorServer) -> Iterator[Front]:
    """The hostile front before the test's emulator."""
    with Front(emulator.url) as proxy:
        yield proxy


def health(config: Path) -> tuple[int, dict[str, object]]:
    result = cli(config, "health", "--json")
    return result.returncode, json.loads(result.stdout)


def healthz(port: int) -> tuple[int, dict[str, object]]:
    answer = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    return answer.status_code, answer.json()


def completed(config: Path) -> set[str]:
    return {job["path"] for job in jobs_json(config) if job["status"] == "completed"}


@pytest.mark.parametrize("recheck", [404, 302])
def test_a_rejected_key_with_a_hostile_recheck_is_held_truthfully_and_resumes(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    front: Front,
    recheck: int,
) -> None:
    """Key rejected and the recheck answered 404/302: health fails with the reason (and
    /healthz 503) while work is held; with the key accepted again the work converts,
    although the recheck still answers nonsense."""
    port = free_port()
    config = daemon_config(
        tmp_path, folders, front.url, auth_recheck_interval=0.5, metrics_port=port
    )
    inbox = folders["inbox"]
    (inbox / "first.png").write_bytes(make_scan("png", seed=1))
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        wait_for(lambda: completed(config) == {"first.png"}, 60, "the first scan")
        assert health(config)[0] == 0
        emulator.hub.set_keys(api_keys=["someone-else"])
        front.recheck = recheck
        (inbox / "second.png").write_bytes(make_scan("png", seed=2))
        wait_for(lambda: health(config)[0] == 1, 60, "health to report the held work")
        _, said = health(config)
        assert "held until a person acts" in str(said["notes"])
        assert "rejected the API key" in str(said["held"])
        status, body = healthz(port)
        assert status == 503
        assert "held until a person acts" in str(body["notes"])
        wait_for(lambda: front.rechecks >= 2, 60, "the recheck to be asked on")
        emulator.hub.set_keys(api_keys=[DEFAULT_API_KEY])
        wait_for(lambda: "second.png" in completed(config), 60, "the held scan to convert")
        wait_for(lambda: health(config)[0] == 0, 30, "health to be green again")
    finally:
        assert daemon.stop() == 0
    assert front.recheck == recheck  # the recheck never answered properly


def test_an_unreadable_key_file_holds_truthfully_and_a_bad_reload_is_survived(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """A UTF-16 key file: SIGHUP reports it and the reloader lives on; while the key is
    held the probe names the file as the reason (health fails, never showing the key);
    a fixed file and key resume the work, and a later SIGHUP reloads."""
    canary = f"CANARY{uuid.uuid4().hex}"
    config = daemon_config(tmp_path, folders, emulator.url, auth_recheck_interval=0.5)
    key_file = tmp_path / "api-key"
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        wait_for(lambda: health(config)[0] == 0, 60, "the daemon to be up")
        assert daemon.proc is not None
        key_file.write_bytes((canary + "\r\n").encode("utf-16"))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reload failed" in daemon.log(), 30, "the failed reload")
        assert "UTF-16" in daemon.log()
        emulator.hub.set_keys(api_keys=["someone-else"])  # the running key is refused
        (folders["inbox"] / "held.png").write_bytes(make_scan("png", seed=3))
        wait_for(lambda: "UTF-16" in str(health(config)[1]["notes"]), 60, "the file as reason")
        assert health(config)[0] == 1
        key_file.write_text(f"\ufeff{canary}\n", encoding="utf-8")  # fixed, with a BOM
        emulator.hub.set_keys(api_keys=[canary])
        wait_for(lambda: "held.png" in completed(config), 60, "the held scan to convert")
        daemon.proc.send_signal(signal.SIGHUP)  # the reloader survived the bad one
        wait_for(lambda: "the API key was read again" in daemon.log(), 30, "a good reload")
        # the answer is the last heartbeat: it turns green at the next one
        wait_for(lambda: health(config)[0] == 0, 30, "health to be green again")
    finally:
        assert daemon.stop() == 0
    log = daemon.log()
    assert canary not in log
    assert canary.encode("utf-16-le").decode("latin-1") not in log


@pytest.mark.parametrize("status", [402, 403])
def test_a_refused_plan_or_credit_holds_truthfully_and_resumes(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer, status: int
) -> None:
    """Conversions refused (402 credit, 403 plan) while the key works: health fails with
    the reason, nothing fails, and once the hub allows them again every held scan converts,
    each paid once (before, held jobs were never tried again: held for ever)."""
    config = daemon_config(tmp_path, folders, emulator.url, auth_recheck_interval=0.5)
    emulator.hub.update_knobs({"refuse_route": "POST /renderocr/jobs", "refuse_status": status})
    names = [f"held-{number}.png" for number in range(3)]
    for number, name in enumerate(names):
        (folders["inbox"] / name).write_bytes(make_scan("png", seed=10 + number))
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        refused = "refuses POST /renderocr/jobs"
        wait_for(lambda: refused in str(health(config)[1]["held"]), 60, "the refusal")
        code, said = health(config)
        assert code == 1
        assert "held until a person acts" in str(said["notes"])
        emulator.hub.update_knobs({"refuse_route": ""})
        wait_for(lambda: completed(config) == set(names), 60, "every held scan to convert")
        wait_for(lambda: health(config)[0] == 0, 30, "health to be green again")
    finally:
        assert daemon.stop() == 0
    assert [job["status"] for job in jobs_json(config)] == ["completed"] * 3
    assert len(emulator.hub.ledger()["jobs"]) == 3
