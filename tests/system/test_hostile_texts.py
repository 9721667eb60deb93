"""A hostile hub's texts and ids: shown and stored clean, sent back only where they belong."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from daemon.emulator.hub import HubSettings as EmulatorSettings
from daemon.emulator.knobs import ROUTES
from daemon.emulator.server import EmulatorServer
from tests.conftest import daemon_config
from tests.front import Front
from tests.helpers import Daemon, cli, jobs_json, wait_for
from tests.scans import make_scan
from tests.tooling import free_port

# Clear screen, an OSC window title, a colour, a carriage return that forges a line, a NUL
# and a right-to-left override: each would act on the terminal of whoever reads it.
HOSTILE_BODY = {
    "code": "\x1b]0;pwned\x07bad\x1b[31m_code",
    "message": "The input\x1b[2J\x1b[H is bad\r\nFAKE 2026 job completed\x00 \u202eevil",
}
CONTROLS = ("\x1b", "\r", "\x00", "\u202e", "\x07")


def clean(text: str) -> bool:
    """Whether ``text`` holds none of the controls the hub sent."""
    return not any(char in text for char in CONTROLS)


def test_hub_error_texts_reach_no_terminal_or_file_raw(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """An error body full of terminal escapes fails the job with its words only: in jobs,
    status, explain, the error file, the table, the log and the metrics labels."""
    port = free_port()
    with Front(emulator.url) as front:
        front.answers["POST /renderocr/jobs"] = (400, json.dumps(HOSTILE_BODY).encode())
        config = daemon_config(tmp_path, folders, front.url, metrics_port=port)
        (folders["inbox"] / "scan.png").write_bytes(make_scan("png", seed=1))
        daemon = Daemon(config, tmp_path / "daemon.log").start()
        try:
            wait_for(
                lambda: [j["status"] for j in jobs_json(config)] == ["failed"], 60, "the failure"
            )
            metrics_page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        finally:
            assert daemon.stop() == 0
    shown = {
        "jobs": cli(config, "jobs").stdout,
        "status": cli(config, "status", "--no-hub").stdout,
        "explain": cli(config, "explain", str(folders["inbox"] / "scan.png")).stdout,
        "error file": (folders["outbox"] / "scan.png.error.txt").read_text(encoding="utf-8"),
        "log": daemon.log(),
    }
    stored = jobs_json(config)[0]["error"]
    assert {name for name, text in shown.items() if not clean(text)} == set()
    assert clean(stored["message"])
    assert clean(stored["code"])
    assert "The input is bad FAKE 2026 job completed evil" in stored["message"]
    assert stored["code"] == "bad_code"
    for name in ("jobs", "status", "explain", "error file"):
        assert "The input is bad" in shown[name], name
    assert len(shown["jobs"].splitlines()) == 1  # one job, one line: no forged second line
    errors = [line for line in metrics_page.splitlines() if line.startswith("ldx_hotfolder_errors")]
    assert any('code="other"' in line for line in errors)
    assert not any("bad_code" in line or "pwned" in line for line in errors)


def test_ids_with_dots_and_slashes_stay_in_their_segment(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    """The hub hands out ids like ``../../x%2F…``: every request carries them encoded in one
    segment, so each lands on its own route, and every scan converts as usual."""
    with EmulatorServer(EmulatorSettings(processing_time=0.2, seed=9)) as hub:
        hub.hub.update_knobs({"hostile_ids": True})
        config = daemon_config(tmp_path, folders, hub.url)
        names = [f"scan-{number}.png" for number in range(3)]
        for number, name in enumerate(names):
            (folders["inbox"] / name).write_bytes(make_scan("png", seed=number))
        result = cli(config, "once")
        ledger = hub.hub.ledger()
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = jobs_json(config)
    assert sorted(job["path"] for job in jobs) == names
    assert {job["status"] for job in jobs} == {"completed"}
    assert all(job["remote_job_id"].startswith("../../x%2F") for job in jobs)
    assert all(job["remote_file_id"].startswith("../../x%2F") for job in jobs)
    requests = ledger["requests"]
    assert set(requests) <= set(ROUTES)  # nothing walked up to another route
    assert requests["GET /files/{file_id}/content"] == 3
    assert requests["POST /renderocr/jobs"] == 3
    assert len(ledger["downloads"]) >= 3
    assert sorted(p.name for p in folders["outbox"].iterdir()) == [
        name.replace(".png", ".docx") for name in names
    ]
