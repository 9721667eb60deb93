"""The same bytes again: on_duplicate = reuse (default), skip or convert."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from daemon.config import load_settings
from daemon.emulator.server import EmulatorServer
from daemon.service import run_service
from tests.conftest import daemon_config
from tests.helpers import cli
from tests.intake_support import rows
from tests.scans import make_scan


def once(tmp_path: Path, folders: dict[str, Path], url: str, **top: Any) -> int:
    """One ``once`` run in this process; its exit code."""
    outcome = asyncio.run(
        run_service(load_settings(daemon_config(tmp_path, folders, url, **top)), once=True)
    )
    assert outcome is not None
    return outcome.exit_code


def hub_jobs(emulator: EmulatorServer) -> int:
    """How many conversions the hub was asked for."""
    return len(emulator.hub.ledger()["jobs"])


@pytest.fixture
def first(tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer) -> bytes:
    """a/original.pdf, converted once already."""
    data = make_scan("pdf", 50)
    (folders["inbox"] / "a").mkdir()
    (folders["inbox"] / "a" / "original.pdf").write_bytes(data)
    assert once(tmp_path, folders, emulator.url) == 0
    assert hub_jobs(emulator) == 1
    return data


def test_reuse_copies_the_earlier_output(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer, first: bytes
) -> None:
    """Same bytes under another name: the earlier output is copied, the hub is not asked."""
    (folders["inbox"] / "copy.pdf").write_bytes(first)
    assert once(tmp_path, folders, emulator.url) == 0
    assert hub_jobs(emulator) == 1
    outbox = folders["outbox"]
    assert (outbox / "copy.docx").read_bytes() == (outbox / "a" / "original.docx").read_bytes()
    copy = next(r for r in rows(folders["state"] / "state.db") if r["path"] == "copy.pdf")
    assert copy["status"] == "completed"
    assert copy["remote_job_id"] is None
    config = tmp_path / "config.toml"
    explained = cli(config, "explain", str(folders["inbox"] / "copy.pdf"))
    assert "a copy of the output of a/original.pdf" in explained.stdout


def test_reuse_converts_when_the_earlier_output_is_gone(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer, first: bytes
) -> None:
    """Once the earlier output was deleted, the same bytes are converted again."""
    (folders["outbox"] / "a" / "original.docx").unlink()
    (folders["inbox"] / "again.pdf").write_bytes(first)
    assert once(tmp_path, folders, emulator.url) == 0
    assert hub_jobs(emulator) == 2
    assert (folders["outbox"] / "again.docx").exists()


def test_skip_converts_nothing(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer, first: bytes
) -> None:
    """on_duplicate = skip: the job completes with no output and no call to the hub."""
    (folders["inbox"] / "skipped.pdf").write_bytes(first)
    assert once(tmp_path, folders, emulator.url, on_duplicate="skip") == 0
    assert hub_jobs(emulator) == 1
    assert not (folders["outbox"] / "skipped.docx").exists()
    skipped = next(r for r in rows(folders["state"] / "state.db") if r["path"] == "skipped.pdf")
    assert (skipped["status"], skipped["output"]) == ("completed", None)


def test_convert_pays_again_and_other_settings_are_no_duplicate(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer, first: bytes
) -> None:
    """on_duplicate = convert converts again; another output format is never a duplicate."""
    (folders["inbox"] / "again.pdf").write_bytes(first)
    assert once(tmp_path, folders, emulator.url, on_duplicate="convert") == 0
    assert hub_jobs(emulator) == 2
    (folders["inbox"] / "sheet.pdf").write_bytes(first)
    assert once(tmp_path, folders, emulator.url, hub={"output_format": "xlsx"}) == 0
    assert hub_jobs(emulator) == 3
    assert (folders["outbox"] / "sheet.xlsx").exists()
