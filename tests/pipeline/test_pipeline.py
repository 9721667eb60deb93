"""The pipeline in-process against a real emulator: layout rules, inputs, live watching."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.config import load_settings
from daemon.emulator.hub import HubSettings as EmulatorSettings
from daemon.emulator.server import EmulatorServer
from daemon.jobs.model import Status
from daemon.jobs.store import Store
from daemon.jobs.views import Views
from daemon.service import Outcome, run_service
from tests.conftest import daemon_config
from tests.faults import job_rows
from tests.helpers import (
    daemon_in_process,
    input_name,
    plant_a_forgotten_upload,
    wait_async,
)
from tests.scans import make_scan


def once(config: Path) -> Outcome:
    outcome = asyncio.run(run_service(load_settings(config), once=True))
    assert outcome is not None
    return outcome


def test_same_stem_inputs_get_separate_outputs(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """scan.pdf and scan.png never share an output; the rule is by queue order."""
    (folders["inbox"] / "scan.pdf").write_bytes(make_scan("pdf", 1))
    (folders["inbox"] / "scan.png").write_bytes(make_scan("png", 2))
    outcome = once(daemon_config(tmp_path, folders, emulator.url))
    assert outcome.exit_code == 0
    names = sorted(p.name for p in folders["outbox"].iterdir())
    assert names in (["scan.docx", "scan.png.docx"], ["scan.docx", "scan.pdf.docx"])


def test_existing_foreign_file_is_not_overwritten(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """A file a person put in the outbox under the output name is left alone."""
    (folders["inbox"] / "memo.pdf").write_bytes(make_scan("pdf", 3))
    (folders["outbox"] / "memo.docx").write_text("mine", encoding="utf-8")
    assert once(daemon_config(tmp_path, folders, emulator.url)).exit_code == 0
    assert (folders["outbox"] / "memo.docx").read_text(encoding="utf-8") == "mine"
    assert (folders["outbox"] / "memo.pdf.docx").stat().st_size > 0


def test_kept_inputs_are_not_converted_again(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """A second run over kept inputs converts nothing; a changed file converts again."""
    scan = folders["inbox"] / "a.tif"
    scan.write_bytes(make_scan("tiff", 4))
    config = daemon_config(tmp_path, folders, emulator.url)
    assert once(config).exit_code == 0
    assert once(config).exit_code == 0
    assert len(emulator.hub.ledger()["jobs"]) == 1
    scan.write_bytes(make_scan("tiff", 5, pages=2))
    assert once(config).exit_code == 0
    assert len(emulator.hub.ledger()["jobs"]) == 2


def test_a_clean_conversion_makes_no_recovery_requests(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """With nothing to recover, an input costs one upload, create and download; no file list."""
    # The hub's file list (the crash-recovery lookup) is never asked for; the job list only
    # serves the poll scheduler, at most once per input.
    for seed, kind in enumerate(("pdf", "png", "tiff")):
        (folders["inbox"] / f"s{seed}.{kind[:3]}").write_bytes(make_scan(kind, 40 + seed))
    assert once(daemon_config(tmp_path, folders, emulator.url)).exit_code == 0
    requests = emulator.hub.ledger()["requests"]
    assert requests.get("POST /files") == 3
    assert requests.get("POST /renderocr/jobs") == 3
    assert requests.get("GET /files/{file_id}/content") == 3
    assert requests.get("GET /renderocr/jobs", 0) <= 3
    assert "GET /files" not in requests


def test_on_success_delete_and_archive(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """delete removes the converted input; archive moves it mirroring its path."""
    (folders["inbox"] / "x").mkdir()
    (folders["inbox"] / "x" / "d.jpg").write_bytes(make_scan("jpeg", 6))
    assert once(daemon_config(tmp_path, folders, emulator.url, on_success="delete")).exit_code == 0
    assert not (folders["inbox"] / "x" / "d.jpg").exists()
    (folders["inbox"] / "x" / "e.bmp").write_bytes(make_scan("bmp", 7))
    archive = tmp_path / "archive"
    config = daemon_config(
        tmp_path, folders, emulator.url, on_success="archive", archive_dir=str(archive)
    )
    assert once(config).exit_code == 0
    assert (archive / "x" / "e.bmp").read_bytes() == make_scan("bmp", 7)
    assert (folders["outbox"] / "x" / "e.docx").exists()


@pytest.mark.parametrize("on_success", ["delete", "archive"])
def test_failed_inputs_are_never_deleted_or_moved(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer, on_success: str
) -> None:
    """Whatever on_success is, failed inputs stay put; only converted ones are deleted/archived."""
    # Failed means broken at the hub, or refused.
    inbox, archive = folders["inbox"], tmp_path / "archive"
    broken_pdf = b"%PDF-1.3\nThis is not a valid PDF file\n%%EOF\n"
    (inbox / "x").mkdir()
    (inbox / "x" / "broken.pdf").write_bytes(broken_pdf)
    (inbox / "x" / "notes.pdf").write_text("text named like a PDF\n", encoding="utf-8")
    (inbox / "x" / "good.png").write_bytes(make_scan("png", 13))
    config = daemon_config(
        tmp_path, folders, emulator.url, on_success=on_success, archive_dir=str(archive)
    )
    outcome = once(config)
    assert outcome.exit_code == 1
    assert sorted(outcome.failed) == ["x/broken.pdf", "x/notes.pdf"]
    assert (inbox / "x" / "broken.pdf").read_bytes() == broken_pdf
    assert (inbox / "x" / "notes.pdf").exists()
    assert not (inbox / "x" / "good.png").exists()
    archived = sorted(p.relative_to(archive).as_posix() for p in archive.rglob("*.*"))
    assert archived == (["x/good.png"] if on_success == "archive" else [])


def test_junk_and_partial_names_are_never_uploaded(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """Dotfiles, partial downloads and NAS folders stay out of the pipeline."""
    inbox = folders["inbox"]
    for rel in (
        ".DS_Store",
        "._scan.pdf",
        "Thumbs.db",
        "scan.pdf.part",
        "x.tmp",
        "@eaDir/scan.pdf",
        "#recycle/old.pdf",
        "~$draft.pdf",
    ):
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(make_scan("pdf", 8))
    (inbox / "real.pdf").write_bytes(make_scan("pdf", 9))
    assert once(daemon_config(tmp_path, folders, emulator.url)).completed == ["real.pdf"]
    uploaded = [input_name(u["filename"]) for u in emulator.hub.ledger()["uploads"]]
    assert uploaded == ["real.pdf"]


def test_symlink_in_inbox_is_not_followed(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """A symlink to a file outside the inbox never sends that file's bytes."""
    secret = tmp_path / "secret.pdf"
    secret.write_bytes(make_scan("pdf", 10) + b"% SECRET-MARKER\n")
    (folders["inbox"] / "link.pdf").symlink_to(secret)
    outcome = once(daemon_config(tmp_path, folders, emulator.url))
    assert outcome.completed == []
    assert emulator.hub.ledger()["uploads"] == []


def test_running_daemon_picks_up_new_files_promptly(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """With run, a file dropped later is converted long before the rescan interval."""
    config = daemon_config(tmp_path, folders, emulator.url, rescan_interval=3600.0)
    settings = load_settings(config)

    async def scenario() -> float:
        async with daemon_in_process(settings):  # ready: the drop below must be an event
            dropped = time.monotonic()
            (folders["inbox"] / "late").mkdir()
            (folders["inbox"] / "late" / "n.png").write_bytes(make_scan("png", 12))
            target = folders["outbox"] / "late" / "n.docx"
            await wait_async(target.exists, 20, "the late file's output")
            return time.monotonic() - dropped

    elapsed = asyncio.run(scenario())
    assert (folders["outbox"] / "late" / "n.docx").exists()
    assert elapsed < 20
    store = Store(settings.database_url)
    assert [j.status for j in Views(store).jobs()] == [Status.COMPLETED]
    store.close()


@pytest.fixture
def slow_emulator() -> Iterator[EmulatorServer]:
    """An emulator that takes 2 s per job, leaving time to act while the hub works."""
    with EmulatorServer(EmulatorSettings(processing_time=2.0, seed=11)) as server:
        yield server


def test_an_input_that_cannot_be_archived_is_never_converted_again(
    tmp_path: Path,
    folders: dict[str, Path],
    slow_emulator: EmulatorServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An input that cannot be archived keeps its completed job: it is never converted again."""
    # A file put where the archive's folder should be, while the hub works, makes the
    # move fail, for root as well (intake would refuse the input if it were there before).
    inbox, archive = folders["inbox"], tmp_path / "archive"
    archive.mkdir()
    (inbox / "x").mkdir()
    (inbox / "x" / "scan.png").write_bytes(make_scan("png", 21))
    emulator = slow_emulator
    config = daemon_config(
        tmp_path,
        folders,
        emulator.url,
        on_success="archive",
        archive_dir=str(archive),
        max_attempts=1,
    )
    db = folders["state"] / "state.db"

    async def block_archive_while_converting() -> Outcome | None:
        running = asyncio.create_task(run_service(load_settings(config), once=True))
        await wait_async(lambda: any(r["remote_job_id"] for r in job_rows(db)), 30, "a job")
        (archive / "x").write_text("not a folder", encoding="utf-8")
        return await running

    outcome = asyncio.run(block_archive_while_converting())
    assert outcome is not None
    assert outcome.exit_code == 0
    assert (folders["outbox"] / "x" / "scan.docx").exists()
    assert (inbox / "x" / "scan.png").read_bytes() == make_scan("png", 21)
    store = Store(f"sqlite:///{folders['state'] / 'state.db'}")
    try:
        (job,) = Views(store).jobs()
        assert job.status is Status.COMPLETED
        assert job.error_code == "input_kept"
        assert job.error_message is not None
        assert "could not be archived" in job.error_message
        assert "stays in the inbox" in job.error_message
        # The automatic re-arm of transient failures has nothing to take up again.
        assert store.rearm_due(time.time() + 86400, 0.0, ["local_io", "input_kept"], 5) == []
    finally:
        store.close()
    capsys.readouterr()
    assert main(["explain", "--json", str(inbox / "x" / "scan.png"), "-c", str(config)]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["state"] == "completed"
    assert any("could not be archived" in line for line in report["reasons"])
    assert once(config).exit_code == 0
    assert len(emulator.hub.ledger()["jobs"]) == 1
    assert not list(folders["outbox"].rglob("*.error.txt"))


def test_an_upload_that_expired_before_its_job_was_created_is_uploaded_again(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """A recorded file id the hub no longer knows is uploaded again, not failed for good."""
    # As after a long stop between the upload and the job's creation: the row holds a
    # file id that the hub has forgotten (400 invalid_file_id at job creation).
    plant_a_forgotten_upload(folders["inbox"], folders["state"] / "state.db", make_scan("png", 31))
    config = daemon_config(tmp_path, folders, emulator.url)
    outcome = once(config)
    assert outcome.exit_code == 0
    assert outcome.completed == ["late.png"]
    assert (folders["outbox"] / "late.docx").stat().st_size > 0
    ledger = emulator.hub.ledger()
    assert ledger["requests"].get("POST /files") == 1
    assert len(ledger["jobs"]) == 1
