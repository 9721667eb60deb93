"""The daemon against every answer variant a real hub may give (docs/emulator.md, shapes).

Each test runs ``once`` in-process against the emulator answering one variant: the daemon
converts, or fails with the hub's own reason; it never pays twice for one input (the
ledger's ``paid_conversions``) and never stops with a crash or a configuration error.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from daemon.config import load_settings
from daemon.emulator.hub import HubSettings as EmulatorSettings
from daemon.emulator.hub import paid_conversions
from daemon.emulator.server import EmulatorServer
from daemon.service import Outcome, run_service
from tests.conftest import daemon_config
from tests.faults import job_rows
from tests.helpers import input_name, plant_a_forgotten_upload
from tests.scans import make_scan

BROKEN_PDF = b"%PDF-1.3\nThis is not a valid PDF file\n%%EOF\n"
DAMAGED = "damaged or truncated"  # the emulator's own words for a broken PDF


def once(config: Path) -> Outcome:
    """``once`` in this process; its outcome."""
    outcome = asyncio.run(run_service(load_settings(config), once=True))
    assert outcome is not None
    return outcome


def drop_good(inbox: Path) -> list[str]:
    """Two good scans (a PDF in a folder and a PNG at the top); their paths."""
    (inbox / "letters").mkdir()
    (inbox / "letters" / "a.pdf").write_bytes(make_scan("pdf", 1))
    (inbox / "b.png").write_bytes(make_scan("png", 2))
    return ["b.png", "letters/a.pdf"]


def rows_by_path(folders: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """The job rows by input path."""
    return {row["path"]: row for row in job_rows(folders["state"] / "state.db")}


CONVERTING = [
    {"status_case": "upper"},
    {"extra_status": "running"},
    {"extra_status": "IN_PROGRESS", "status_case": "upper"},
    {"progress_scale": "percent_int"},
    {"progress_scale": "percent_float"},
    {"timestamp_style": "fraction_z"},
    {"timestamp_style": "offset"},
    {"omit_fields": ["completed_at"]},
    {"omit_fields": ["expires_at"]},
    {"omit_fields": ["usage"]},
    {"omit_fields": ["completed_at", "expires_at", "usage"]},
    {"extra_fields": True},
    {"create_status": 200},
    {"create_status": 201},
    {"upload_status": 200},
    {"upload_status": 202},
    {"download_gzip": True},
    {"download_redirect": True},
    {"download_redirect": True, "download_gzip": True},
    {"engines_shape": "strings"},
    {"engines_shape": "other_wrapper"},
    {"engines_shape": "no_languages"},
    {"engines_shape": "no_conversions"},
    {"engines_shape": "empty"},
    {"engines_shape": "auth_required"},
    {"gzip_json": True},
    {"wait_mode": "ignore"},
    {"wait_mode": "reject"},
]


@pytest.mark.parametrize(
    "knobs", CONVERTING, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items())
)
def test_every_variant_converts_paying_once(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer, knobs: dict[str, Any]
) -> None:
    """Each answer variant: every good scan converts, one paid conversion per input."""
    emulator.hub.update_knobs(knobs)
    inputs = drop_good(folders["inbox"])
    outcome = once(daemon_config(tmp_path, folders, emulator.url))
    rows = rows_by_path(folders)
    assert outcome.exit_code == 0, {p: r["error_message"] for p, r in rows.items()}
    assert outcome.completed == inputs
    ledger = emulator.hub.ledger()
    assert paid_conversions(ledger) == len(inputs)
    assert ledger["storage_saw_authorization"] == 0
    for rel in inputs:
        assert (folders["outbox"] / (rel.rsplit(".", 1)[0] + ".docx")).stat().st_size > 0


@pytest.mark.parametrize("as_string", [False, True])
def test_a_conversion_the_hub_fails_shows_the_hubs_reason(
    tmp_path: Path,
    folders: dict[str, Path],
    emulator: EmulatorServer,
    as_string: bool,
) -> None:
    """A failed job's reason (an object, or "code: message") reaches the table; paid once."""
    emulator.hub.update_knobs({"error_as_string": as_string})
    (folders["inbox"] / "bad.pdf").write_bytes(BROKEN_PDF)
    outcome = once(daemon_config(tmp_path, folders, emulator.url))
    assert outcome.failed == ["bad.pdf"]
    row = rows_by_path(folders)["bad.pdf"]
    assert DAMAGED in row["error_message"]
    assert row["error_code"] == "invalid_input"
    assert paid_conversions(emulator.hub.ledger()) == 1
    error_file = (folders["outbox"] / "bad.pdf.error.txt").read_text(encoding="utf-8")
    assert DAMAGED in error_file


@pytest.mark.parametrize("style", ["default", "problem", "nested", "message", "text", "html"])
def test_a_refused_creation_fails_with_the_hubs_reason_in_every_error_body(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer, style: str
) -> None:
    """A 400 at job creation, in each error-body style: the hub's message, its code when given."""
    # The engine list is empty (advice only), so a language the hub refuses gets as far as
    # the creation; nothing is created, so nothing is paid.
    emulator.hub.update_knobs({"error_body": style, "engines_shape": "empty"})
    (folders["inbox"] / "a.png").write_bytes(make_scan("png", 3))
    config = daemon_config(tmp_path, folders, emulator.url, hub={"language": "zzz"})
    outcome = once(config)
    assert outcome.failed == ["a.png"]
    row = rows_by_path(folders)["a.png"]
    assert "does not offer language 'zzz'" in row["error_message"]
    assert "HTTP 400" in row["error_message"]
    expected = "invalid_language" if style in ("default", "nested") else "http_400"
    assert row["error_code"] == expected
    ledger = emulator.hub.ledger()
    assert paid_conversions(ledger) == 0
    assert ledger["requests"]["POST /renderocr/jobs"] == 1  # failed, not retried in a loop


@pytest.mark.parametrize(("status", "code"), [(400, "invalid_file_id"), (404, "file_expired")])
def test_an_expired_upload_is_uploaded_again_whatever_the_hub_calls_it(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer, status: int, code: str
) -> None:
    """The creation names a file the hub forgot (any status, any code): upload again, pay once."""
    # The daemon asks the hub whether the upload still exists instead of trusting a code.
    emulator.hub.update_knobs({"missing_input_status": status, "missing_input_code": code})
    plant_a_forgotten_upload(folders["inbox"], folders["state"] / "state.db", make_scan("png", 31))
    config = daemon_config(tmp_path, folders, emulator.url)
    outcome = once(config)
    assert outcome.completed == ["late.png"]
    ledger = emulator.hub.ledger()
    assert ledger["requests"]["POST /files"] == 1
    assert paid_conversions(ledger) == 1


def test_an_upload_the_hub_finds_too_large_fails_with_its_reason(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    """A hub with a lower upload limit answers 413: the job fails with the hub's words, unpaid."""
    # The error file says a corrected (smaller) file is needed: retrying cannot help.
    with EmulatorServer(EmulatorSettings(processing_time=0.2, max_upload_bytes=2000)) as small:
        (folders["inbox"] / "big.pdf").write_bytes(make_scan("pdf", 1, pages=40))
        assert (folders["inbox"] / "big.pdf").stat().st_size > 2000
        outcome = once(daemon_config(tmp_path, folders, small.url))
        ledger = small.hub.ledger()
    assert outcome.failed == ["big.pdf"]
    row = rows_by_path(folders)["big.pdf"]
    assert row["error_code"] == "http_413"
    assert "maximum upload size of 2000 bytes" in row["error_message"]
    assert paid_conversions(ledger) == 0
    text = (folders["outbox"] / "big.pdf.error.txt").read_text(encoding="utf-8")
    assert "Retrying the same file cannot help" in text
    assert "ldx-hotfolder retry" not in text


def test_an_unknown_status_is_polled_on_until_the_jobs_deadline(
    tmp_path: Path, folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A status outside the four counts as running (one warning), then job_deadline ends it."""
    slow = EmulatorSettings(processing_time=600.0)
    with EmulatorServer(slow) as emulator:
        knobs = {"extra_status": "RUNNING", "status_case": "upper", "wait_mode": "ignore"}
        emulator.hub.update_knobs(knobs)
        (folders["inbox"] / "a.png").write_bytes(make_scan("png", 4))
        config = daemon_config(tmp_path, folders, emulator.url, job_deadline=6.0)
        outcome = once(config)
        ledger = emulator.hub.ledger()
    assert outcome.failed == ["a.png"]
    row = rows_by_path(folders)["a.png"]
    assert row["error_code"] == "hub_job_deadline"
    assert "running for 6 s without an end" in row["error_message"]
    assert paid_conversions(ledger) == 1
    assert (
        ledger["requests"]["GET /renderocr/jobs/{job_id}"]
        + ledger["requests"].get("GET /renderocr/jobs", 0)
        >= 2
    )  # looked at more than once: polled on
    log = capsys.readouterr()
    warned = (log.out + log.err).count("job status this version does not know")
    assert warned == 1


def test_uploads_carry_the_extension_of_their_content(
    tmp_path: Path, folders: dict[str, Path], emulator: EmulatorServer
) -> None:
    """A PNG named .jpg and a TIFF without an extension go up as .png and .tif; both convert."""
    (folders["inbox"] / "photo.jpg").write_bytes(make_scan("png", 6))
    (folders["inbox"] / "scan").write_bytes(make_scan("tiff", 7))
    outcome = once(daemon_config(tmp_path, folders, emulator.url))
    assert outcome.completed == ["photo.jpg", "scan"]
    uploads = emulator.hub.ledger()["uploads"]
    names = sorted(input_name(upload["filename"]) for upload in uploads)
    assert names == ["photo.png", "scan.tif"]
    types = sorted(upload["content_type"] for upload in uploads)
    assert types == ["image/png", "image/tiff"]
