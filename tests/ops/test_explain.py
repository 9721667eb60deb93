"""Stalled inputs in ``status`` and ``explain``; incomplete files fail only after the limit."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from daemon.cli import main
from daemon.config import load_settings
from daemon.emulator.server import EmulatorServer
from daemon.service import run_service
from tests.conftest import daemon_config
from tests.helpers import input_name, wait_for
from tests.intake_support import done, rows, running
from tests.scans import make_pdf, make_scan


def command(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> Any:
    """Run the command line in this process (as ``ldx-hotfolder ARGS -c CONFIG``); its JSON."""
    capsys.readouterr()
    assert main([*args, "-c", str(config)]) == 0
    return json.loads(capsys.readouterr().out)


def stalled(capsys: pytest.CaptureFixture[str], config: Path) -> dict[str, dict[str, Any]]:
    """``status --json``'s stalled inputs by path."""
    report = command(capsys, config, "status", "--json", "--no-hub")
    return {item["path"]: item for item in report["stalled"]}


def waiting(db: Path) -> list[str]:
    """Paths in the table's waiting list (what ``status`` shows as stalled)."""
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT path FROM waiting ORDER BY path")]


def explained(
    capsys: pytest.CaptureFixture[str], config: Path, *paths: Path
) -> dict[str, dict[str, Any]]:
    """``explain --json`` by path."""
    return {
        item["path"]: item
        for item in command(capsys, config, "explain", "--json", *map(str, paths))
    }


def test_placeholders_and_incomplete_files_wait_show_as_stalled_and_explain(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Empty placeholders and incomplete PDFs wait, shown stalled in status; explain tells each."""
    # An empty placeholder waits until it is filled; an incomplete PDF fails with its reason
    # only once unchanged for incomplete_timeout.
    inbox = folders["inbox"]
    db = folders["state"] / "state.db"
    patient = daemon_config(tmp_path, folders, emulator.url, stalled_after=0.5)
    with running(patient, tmp_path / "daemon.log"):
        (inbox / "placeholder.pdf").touch()
        (inbox / "cut.pdf").write_bytes(make_pdf(2)[:-40])
        wait_for(lambda: len(waiting(db)) == 2, 30, "both to show as stalled")
        shown = stalled(capsys, patient)
        assert shown["placeholder.pdf"]["code"] == "empty_file"
        assert shown["cut.pdf"]["code"] == "incomplete"
        assert "no %%EOF" in shown["cut.pdf"]["reason"]
        now = explained(
            capsys, patient, inbox / "placeholder.pdf", inbox / "cut.pdf", inbox / "new.png"
        )
        assert now["placeholder.pdf"]["state"] == "stalled"
        assert "placeholder" in " ".join(now["placeholder.pdf"]["reasons"])
        assert now["cut.pdf"]["state"] == "stalled"
        assert "incomplete PDF" in " ".join(now["cut.pdf"]["reasons"])
        assert now["new.png"]["state"] == "missing"
        (inbox / "placeholder.pdf").write_bytes(make_scan("pdf", 60))
        wait_for(lambda: "placeholder.pdf" in done(db), 30, "the filled placeholder to convert")
        wait_for(lambda: waiting(db) == ["cut.pdf"], 30, "the placeholder not to be stalled")
    assert [r["path"] for r in rows(db)] == ["placeholder.pdf"]  # cut.pdf still waits
    impatient = daemon_config(tmp_path, folders, emulator.url, incomplete_timeout=0.5)
    with running(impatient, tmp_path / "daemon.log"):
        wait_for(lambda: any(r["path"] == "cut.pdf" for r in rows(db)), 30, "cut.pdf to fail")
        assert stalled(capsys, impatient) == {}
    cut = next(r for r in rows(db) if r["path"] == "cut.pdf")
    assert (cut["status"], cut["error_code"]) == ("failed", "incomplete")
    assert "no %%EOF" in cut["error_message"]
    assert "no %%EOF" in (folders["outbox"] / "cut.pdf.error.txt").read_text(encoding="utf-8")
    after = explained(capsys, impatient, inbox / "cut.pdf", inbox / "placeholder.pdf")
    assert after["cut.pdf"]["state"] == "failed"
    assert after["placeholder.pdf"]["state"] == "completed"


def test_unsupported_content_fails_at_once_whatever_the_name(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """Content decides: a .docx renamed .pdf or text fails with no hub call; real scans convert."""
    # Real scans convert whatever the case of their extension.
    inbox = folders["inbox"]
    (inbox / "renamed.pdf").write_bytes(b"PK\x03\x04" + b"\x00" * 200)
    (inbox / "notes.PDF").write_text("meeting notes\n", encoding="utf-8")
    good = {"A.PDF": "pdf", "b.tif": "tiff", "c.TIFF": "tiff", "d.jpg": "jpeg", "e.JPEG": "jpeg"}
    for name, fmt in good.items():
        (inbox / name).write_bytes(make_scan(fmt, len(name)))
    config = daemon_config(tmp_path, folders, emulator.url)
    outcome = asyncio.run(run_service(load_settings(config), once=True))
    assert outcome is not None
    assert outcome.exit_code == 1
    jobs = {r["path"]: r for r in rows(folders["state"] / "state.db")}
    assert jobs["renamed.pdf"]["error_message"].startswith(
        "unsupported type: looks like a ZIP archive or Office document"
    )
    assert jobs["notes.PDF"]["error_message"].startswith("unsupported type: looks like a text")
    assert {name for name, r in jobs.items() if r["status"] == "completed"} == set(good)
    # Each upload carries the extension of its content's type, whatever the name says.
    uploaded = [input_name(u["filename"]) for u in emulator.hub.ledger()["uploads"]]
    assert sorted(uploaded) == ["A.pdf", "b.tif", "c.tif", "d.jpg", "e.jpg"]
