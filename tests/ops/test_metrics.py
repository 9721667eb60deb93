"""Metrics and health over HTTP from a running daemon, and the per-stage job timings."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from daemon.advice import ADVICE, HTTP_CODE, HUB_CODE
from daemon.emulator.server import EmulatorServer
from daemon.jobs.model import Stage
from daemon.ops import metrics
from tests.conftest import daemon_config
from tests.helpers import Daemon, cli, jobs_json, wait_for
from tests.scans import make_scan
from tests.tooling import free_port

BROKEN_PDF = b"%PDF-1.3\nThis is not a valid PDF file\n%%EOF\n"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page: (name, sorted labels) -> value; the
    ``instance_id`` label that a running daemon puts on every sample is left out."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "instance_id"}
            found[(sample.name, tuple(sorted(labels.items())))] = sample.value
    return found


def value(
    page: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


def test_stage_timer_adds_up_steps_and_observes_them() -> None:
    """Each step's seconds add up per stage name and land in the stage histogram."""
    now = [100.0]
    before = (
        metrics.REGISTRY.get_sample_value("ldx_hotfolder_stage_seconds_count", {"stage": "convert"})
        or 0.0
    )
    timer = metrics.StageTimer(lambda: now[0])
    with timer.stage(Stage.PENDING):
        now[0] += 1.5
    with timer.stage(Stage.SUBMITTED):
        now[0] += 4.0
    with timer.stage(Stage.SUBMITTED):
        now[0] += 2.0
    assert timer.summary() == {"upload": 1.5, "convert": 6.0}
    assert metrics.stage_summary() == {"upload": 1.5, "convert": 6.0}
    after = metrics.REGISTRY.get_sample_value(
        "ldx_hotfolder_stage_seconds_count", {"stage": "convert"}
    )
    assert after == before + 2


def test_running_daemon_serves_metrics_and_health(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """Queue gauges, stage latencies, errors by code, retries, bytes; /healthz; health exits 0."""
    port = free_port()
    sizes = 0
    for i in range(3):
        data = make_scan("png", seed=i)
        sizes += len(data)
        (folders["inbox"] / f"scan {i}.png").write_bytes(data)
    (folders["inbox"] / "broken.pdf").write_bytes(BROKEN_PDF)
    sizes += len(BROKEN_PDF)
    emulator.hub.update_faults({"error_rate": 1.0})  # every request fails until a retry shows
    config = daemon_config(
        tmp_path, folders, emulator.url, metrics_port=port, heartbeat_interval=0.2
    )
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    base = f"http://127.0.0.1:{port}"

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return samples(httpx.get(f"{base}/metrics", timeout=5).text)

    def waiting() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        page = scrape()
        return page if value(page, "ldx_hotfolder_oldest_waiting_age_seconds") > 0.5 else None

    try:
        wait_for(lambda: "step will be retried" in daemon.log(), 30, "a retry")
        # While the hub fails every request the files wait, and the gauges say so.
        held = wait_for(waiting, 30, "the oldest file's age to grow")
        emulator.hub.update_faults({"error_rate": 0.0})
        wait_for(
            lambda: (
                sorted(j["status"] for j in jobs_json(config)) == ["completed"] * 3 + ["failed"]
            ),
            60,
            "every job to be final",
        )

        def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            page = scrape()
            return page if value(page, "ldx_hotfolder_jobs", status="completed") == 3 else None

        page = wait_for(scraped, 30, "the queue gauges to catch up")
        health = httpx.get(f"{base}/healthz", timeout=5)
        checked = cli(config, "health")
    finally:
        assert daemon.stop() == 0
    unfinished = [value(held, "ldx_hotfolder_jobs", status=s) for s in ("queued", "processing")]
    assert sum(unfinished) >= 3, "the held files show in the queue gauges"
    assert value(page, "ldx_hotfolder_jobs", status="failed") == 1
    # present and zero, not merely absent (value() reads a missing sample as 0)
    assert page[("ldx_hotfolder_jobs", (("status", "queued"),))] == 0
    assert page[("ldx_hotfolder_oldest_waiting_age_seconds", ())] == 0
    # The inputs stay in the inbox (on_success = "keep"): no "finish" step handles them.
    for stage in ("upload", "submit", "convert", "download"):
        assert value(page, "ldx_hotfolder_stage_seconds_count", stage=stage) >= 3, stage
    assert value(page, "ldx_hotfolder_errors_total", code="invalid_input", action="fail") == 1
    retried = [
        k for k in page if k[0] == "ldx_hotfolder_errors_total" and ("action", "retry") in k[1]
    ]
    assert retried, "a 5xx counted as an error that was retried"
    assert any(k[0] == "ldx_hotfolder_retries_total" for k in page)
    assert value(page, "ldx_hotfolder_uploaded_bytes_total") == sizes
    assert value(page, "ldx_hotfolder_downloaded_bytes_total") > 0
    assert value(page, "ldx_hotfolder_jobs_finished_total", outcome="completed") == 3
    assert value(page, "ldx_hotfolder_up", component="watcher") == 1
    assert health.status_code == 200
    assert health.json()["ok"] is True
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "healthy" in checked.stdout
    # one summary line per job outcome, with the time spent in each stage
    entries = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    completed = [e for e in entries if e["event"] == "job completed"]
    assert len(completed) == 3
    assert set(completed[0]["stages"]) == {"upload", "submit", "convert", "download"}
    (failed,) = [e for e in entries if e["event"] == "job failed"]
    assert failed["path"] == "broken.pdf"
    assert "convert" in failed["stages"]
    # a clean stop removes the heartbeat: health then says the daemon is not running
    stopped = cli(config, "health")
    assert stopped.returncode == 1
    assert "not running" in stopped.stdout


def test_a_metrics_port_in_use_is_a_configuration_error(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """The daemon refuses to start (exit 2, naming the setting) when the port is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = daemon_config(tmp_path, folders, emulator.url, metrics_port=port)
        result = cli(config, "run", timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "metrics_port" in result.stderr


def test_healthz_is_503_with_the_reasons_when_unhealthy() -> None:
    """/healthz answers 200 while the daemon is healthy and 503 with the reasons when not."""
    state: dict[str, Any] = {"ok": True, "notes": []}
    server = metrics.MetricsServer("127.0.0.1", 0, lambda: (state["ok"], dict(state))).start()
    try:
        host, port = server.address
        assert host == "127.0.0.1"
        healthy = httpx.get(f"http://{host}:{port}/healthz", timeout=5)
        assert (healthy.status_code, healthy.json()["ok"]) == (200, True)
        state.update(ok=False, notes=["the inbox watcher has stopped"])
        sick = httpx.get(f"http://{host}:{port}/healthz", timeout=5)
        assert sick.status_code == 503
        assert sick.json()["notes"] == ["the inbox watcher has stopped"]
        assert httpx.get(f"http://{host}:{port}/other", timeout=5).status_code == 404
    finally:
        server.stop()


def test_unknown_error_codes_share_one_label() -> None:
    """Codes a hub invents count under ``other``: a hostile hub cannot grow the series."""
    sample = "ldx_hotfolder_errors_total"
    before = metrics.REGISTRY.get_sample_value(sample, {"code": "other", "action": "fail"}) or 0
    for number in range(200):
        metrics.record_error(f"hub_invented_{number}\x1b[31m", "fail")
    metrics.record_error("http_503", "retry")
    metrics.record_error("invalid_input", "fail")
    page = samples(metrics.render().decode())
    assert value(page, sample, code="other", action="fail") == before + 200
    assert value(page, sample, code="http_503", action="retry") >= 1
    assert value(page, sample, code="invalid_input", action="fail") >= 1
    assert not [labels for _, labels in page if "hub_invented" in str(labels)]


def test_every_code_the_daemon_explains_keeps_its_own_label() -> None:
    """Each code of the troubleshooting table counts under its own name, never ``other``."""
    own = [code for code in ADVICE if code not in (HUB_CODE, HTTP_CODE)]
    assert [code for code in own if metrics.code_label(code) != code] == []
    assert metrics.code_label("http_413") == "http_413"
