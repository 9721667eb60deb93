"""End to end over loopback: the daemon as a subprocess against a real emulator server."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from bench.harness import process_tree
from daemon.emulator.hub import HubSettings as EmulatorSettings
from daemon.emulator.server import EmulatorServer
from daemon.outbox.verify import verify_package
from tests.conftest import daemon_config
from tests.helpers import Daemon, cli, jobs_json, wait_for
from tests.scans import EXTENSIONS, FORMATS, make_scan

NAMES = ["scan", "Rechnung März", "請求書", "two  spaces", "émile-ß"]


def drop_tree(inbox: Path, count: int) -> dict[str, bytes]:
    """Drop ``count`` scans of every format into nested, oddly named folders."""
    dropped: dict[str, bytes] = {}
    for i in range(count):
        fmt = FORMATS[i % len(FORMATS)]
        folder = f"dept {i % 3}/{NAMES[i % len(NAMES)]}/{i % 4}"
        rel = f"{folder}/{NAMES[(i + 1) % len(NAMES)]} {i}{EXTENSIONS[fmt]}"
        data = make_scan(fmt, seed=i)
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(data)
        dropped[rel] = data
    return dropped


def mirrored(rel: str, fmt: str = "docx") -> str:
    return rel.rsplit(".", 1)[0] + f".{fmt}"


def test_once_converts_nested_tree_exactly_once(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """50 files in nested non-ASCII folders give 50 valid outputs; one upload and job each."""
    dropped = drop_tree(folders["inbox"], 50)
    hub = {"output_format": "xlsx"}
    config = daemon_config(tmp_path, folders, emulator.url, hub=hub)
    result = cli(config, "once")
    assert result.returncode == 0, result.stdout + result.stderr
    outputs = sorted(
        p.relative_to(folders["outbox"]).as_posix()
        for p in folders["outbox"].rglob("*")
        if p.is_file()
    )
    assert outputs == sorted(mirrored(rel, "xlsx") for rel in dropped)
    for rel in outputs:
        verify_package(folders["outbox"] / rel, "xlsx")
    ledger = emulator.hub.ledger()
    assert len(ledger["uploads"]) == 50
    assert len(ledger["jobs"]) == 50
    received = {u["sha256"] for u in ledger["uploads"]}
    assert received == {hashlib.sha256(d).hexdigest() for d in dropped.values()}
    assert len(received) == 50  # 50 distinct files, so one upload each
    # one job per uploaded file
    assert sorted(j["file_id"] for j in ledger["jobs"]) == sorted(
        u["file_id"] for u in ledger["uploads"]
    )
    assert {j["output_format"] for j in ledger["jobs"]} == {"xlsx"}
    assert all(j["status"] == "completed" for j in jobs_json(config))


def test_once_with_broken_file_fails_only_it(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """A broken PDF fails with a clear message and an error file; the rest complete."""
    drop_tree(folders["inbox"], 5)
    broken = folders["inbox"] / "broken.pdf"
    broken.write_bytes(b"%PDF-1.3\nThis is not a valid PDF file\n%%EOF\n")
    text = folders["inbox"] / "notes.pdf"
    text.write_text("just some text, named like a PDF\n", encoding="utf-8")
    config = daemon_config(tmp_path, folders, emulator.url)
    result = cli(config, "once")
    assert result.returncode == 1, result.stdout + result.stderr
    jobs = {j["path"]: j for j in jobs_json(config)}
    assert sum(j["status"] == "completed" for j in jobs.values()) == 5
    assert jobs["broken.pdf"]["status"] == "failed"
    assert jobs["broken.pdf"]["error"]["code"] == "invalid_input"
    assert "damaged" in jobs["broken.pdf"]["error"]["message"]
    assert jobs["broken.pdf"]["output"] is None
    assert jobs["notes.pdf"]["error"]["code"] == "unsupported_type"
    assert "looks like a text file" in jobs["notes.pdf"]["error"]["message"]
    assert broken.exists()
    assert text.exists()
    error_file = folders["outbox"] / "broken.pdf.error.txt"
    assert "damaged" in error_file.read_text(encoding="utf-8")
    # the unsupported file never reached the hub
    assert len(emulator.hub.ledger()["uploads"]) == 6


def test_kill_while_in_flight_does_not_pay_twice(tmp_path: Path, folders: dict[str, Path]) -> None:
    """SIGKILL with jobs at the hub, then restart: no committed job is uploaded again."""
    settings = EmulatorSettings(processing_time=3.0, seed=5)
    with EmulatorServer(settings) as hub:
        dropped = drop_tree(folders["inbox"], 12)
        config = daemon_config(tmp_path, folders, hub.url)
        daemon = Daemon(config, tmp_path / "daemon.log").start()
        db = folders["state"] / "state.db"

        def submitted() -> bool:
            try:
                with sqlite3.connect(db) as conn:
                    rows = conn.execute(
                        "SELECT count(*) FROM jobs WHERE remote_job_id IS NOT NULL"
                    ).fetchone()
            except sqlite3.OperationalError:  # not created yet
                return False
            return bool(rows[0] == 12)

        wait_for(submitted, 60, "every job to be submitted")
        assert daemon.proc is not None
        assert process_tree(daemon.proc.pid)[1:] == []  # one process: no helper to orphan
        daemon.kill()
        uploads_before = len(hub.hub.ledger()["uploads"])
        in_flight = [j for j in jobs_json(config) if j["status"] != "completed"]
        assert in_flight, "the kill came too late: every job had already finished"
        daemon = Daemon(config, tmp_path / "daemon.log").start()
        try:
            wait_for(
                lambda: (
                    all(j["status"] == "completed" for j in jobs_json(config))
                    and len(jobs_json(config)) == 12
                ),
                60,
                "all jobs to complete after the restart",
            )
        finally:
            assert daemon.stop() == 0
        ledger = hub.hub.ledger()
        assert len(ledger["uploads"]) == uploads_before == 12
        assert len(ledger["jobs"]) == 12
        outputs = [p for p in folders["outbox"].rglob("*") if p.is_file()]
        assert sorted(p.relative_to(folders["outbox"]).as_posix() for p in outputs) == sorted(
            mirrored(rel) for rel in dropped
        )
        assert not list(folders["outbox"].rglob(".*"))


def test_wrong_key_pauses_then_resumes(tmp_path: Path, folders: dict[str, Path]) -> None:
    """Wrong key: check says so; run logs one error, pauses failing nothing, resumes once fixed."""
    # While paused it keeps retrying the key; it resumes once the key file is fixed.
    with EmulatorServer(EmulatorSettings(processing_time=0.1)) as hub:
        config = daemon_config(
            tmp_path, folders, hub.url, key="wrong-key", auth_recheck_interval=0.3
        )
        checked = cli(config, "check")
        assert checked.returncode == 2
        assert "api key: rejected" in checked.stdout
        drop_tree(folders["inbox"], 3)
        daemon = Daemon(config, tmp_path / "daemon.log").start()
        try:
            wait_for(lambda: "rejected the API key" in daemon.log(), 30, "the pause message")
            checks = hub.hub.ledger()["requests"].get("GET /files", 0)
            wait_for(
                lambda: hub.hub.ledger()["requests"].get("GET /files", 0) >= checks + 3,
                30,
                "the paused daemon to try the key three more times",
            )
            paused = jobs_json(config)
            assert len(paused) == 3
            assert {j["status"] for j in paused} <= {"queued", "processing"}
            # one clear error, and no warnings either (one per job or per recheck would be noise)
            errors = [line for line in daemon.log().splitlines() if '"level": "info"' not in line]
            assert len(errors) == 1, errors
            assert "all work is paused" in errors[0]
            (tmp_path / "api-key").write_text("demo-key\n", encoding="utf-8")
            wait_for(
                lambda: [j["status"] for j in jobs_json(config)] == ["completed"] * 3,
                30,
                "work to resume with the fixed key",
            )
        finally:
            assert daemon.stop() == 0
        log = daemon.log()
        assert log.count("all work is paused") == 1
        assert "accepted again" in log
