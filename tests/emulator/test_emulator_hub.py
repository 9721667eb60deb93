"""The emulator's logic without HTTP: clock, state machine, expiry, sniffing, faults, ledger."""

from __future__ import annotations

import hashlib
import re
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from daemon.emulator.clock import Clock
from daemon.emulator.hub import (
    UPSTREAM_ERROR_MESSAGE,
    Access,
    Fault,
    Faults,
    Hub,
    HubSettings,
    InvalidRequest,
    JobInfo,
    NotFound,
    PayloadTooLarge,
    inspect_file,
)
from tests.scans import make_pdf, make_scan

ID = re.compile(r"^[a-z0-9]{32}$")
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
BROKEN_PDF = b"%PDF-1.3\nThis is not a valid PDF file\n%%EOF\n"
ZIP = b"PK\x03\x04" + b"\x00" * 40


class RecordingRenderer:
    """A stand-in for documents.render_document that remembers its arguments."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(
        self,
        output_format: str,
        *,
        source_name: str,
        engine: str,
        language: str,
        pages: int,
        input_format: str,
    ) -> bytes:
        self.calls.append(
            {
                "output_format": output_format,
                "source_name": source_name,
                "engine": engine,
                "language": language,
                "pages": pages,
                "input_format": input_format,
            }
        )
        return b"PK\x03\x04 rendered"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def hub(tmp_path: Path, clock: Clock) -> Hub:
    settings = HubSettings(processing_time=10.0, queue_delay=2.0, seed=7)
    return Hub(tmp_path / "store", settings, clock=clock)


def submit(hub: Hub, data: bytes, name: str = "scan.pdf", **fields: Any) -> JobInfo:
    """Upload ``data`` and create a job on it."""
    info = hub.add_file(name, data)
    body = {"file_id": info.file_id, "engine": "ki/ocr", "languages": ["jpn"]}
    body["output_format"] = "docx"
    return hub.create_job({**body, **fields})


def finish(hub: Hub, job: JobInfo) -> JobInfo:
    """Fast-forward past the job's end and return it."""
    hub.clock.advance(3600)
    return hub.get_job(job.job_id)


def tiff_header_beyond_file() -> bytes:
    """A TIFF whose first IFD offset points past the end of the file."""
    return b"II*\x00" + (1000).to_bytes(4, "little") + b"\x00" * 8


# -- clock ---------------------------------------------------------------------------------


def test_clock_is_aware_utc_real_time_plus_offset() -> None:
    """now() is an aware UTC datetime that advance() moves forward."""
    clock = Clock()
    before = clock.now()
    clock.advance(90)
    assert before.tzinfo is UTC
    assert clock.now() - before >= timedelta(seconds=90)
    assert clock.offset == 90


def test_clock_refuses_to_go_back() -> None:
    """A negative or NaN advance is refused."""
    clock = Clock()
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="forward"):
            clock.advance(bad)


def test_clock_advances_safely_from_many_threads() -> None:
    """Concurrent advances all count."""
    clock = Clock()
    threads = [
        threading.Thread(target=lambda: [clock.advance(1) for _ in range(200)]) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert clock.offset == 1600


# -- files ---------------------------------------------------------------------------------


def test_file_info_uses_hub_ids_timestamps_and_24h_expiry(hub: Hub) -> None:
    """Uploads get 32-char ids, second-precision Z stamps and expire 24 h after creation."""
    info = hub.add_file("dir/scan.pdf", make_pdf())
    body = info.to_json()
    assert ID.match(info.file_id)
    assert info.filename == "scan.pdf"
    assert all(STAMP.match(body[key]) for key in ("created_at", "updated_at", "expires_at"))
    assert info.expires_at - info.created_at == timedelta(hours=24)
    assert hub.get_file(info.file_id) == info


def test_files_expire_after_24_hours_and_leave_the_disk(hub: Hub) -> None:
    """A file is served until its expiry, then 404s and its data is deleted."""
    info = hub.add_file("scan.pdf", make_pdf())
    path = hub.data_dir / info.file_id
    hub.clock.advance(24 * 3600 - 5)
    assert hub.get_file(info.file_id).size == info.size
    hub.clock.advance(10)
    with pytest.raises(NotFound):
        hub.get_file(info.file_id)
    with pytest.raises(NotFound):
        hub.open_download(info.file_id)
    assert not path.exists()
    assert hub.list_files() == []


def test_upload_cap_is_enforced_while_streaming(tmp_path: Path) -> None:
    """Writing past max_upload_bytes raises and leaves nothing behind."""
    hub = Hub(tmp_path, HubSettings(max_upload_bytes=10))
    with hub.receive_file() as incoming:
        incoming.write(b"12345")
        with pytest.raises(PayloadTooLarge):
            incoming.write(b"678901")
    assert list(tmp_path.iterdir()) == []
    assert hub.list_files() == []


def test_upload_sessions_append_chunks(hub: Hub) -> None:
    """POST /uploads makes an empty file that PUT chunks grow, with a running hash."""
    session = hub.create_upload_session("chunked.pdf")
    assert session.size == 0
    data = make_pdf(2)
    hub.append_upload(session.file_id, data[:100])
    grown = hub.append_upload(session.file_id, data[100:])
    assert grown.size == len(data)
    assert (hub.data_dir / session.file_id).read_bytes() == data
    [entry] = hub.ledger()["uploads"]
    assert entry["size"] == len(data)
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    job = hub.create_job(
        {
            "file_id": session.file_id,
            "engine": "ki/ocr",
            "languages": ["eng"],
            "output_format": "xlsx",
        }
    )
    assert finish(hub, job).status == "completed"


def test_upload_session_limits(tmp_path: Path) -> None:
    """Chunks over max_chunk_bytes, totals over the cap and non-sessions are refused."""
    hub = Hub(tmp_path, HubSettings(max_chunk_bytes=4, max_upload_bytes=6))
    session = hub.create_upload_session("x.pdf")
    with pytest.raises(PayloadTooLarge, match="at most 4 bytes"):
        hub.append_upload(session.file_id, b"12345")
    hub.append_upload(session.file_id, b"1234")
    with pytest.raises(PayloadTooLarge):
        hub.append_upload(session.file_id, b"567")
    plain = hub.add_file("plain.pdf", b"%PDF")
    with pytest.raises(NotFound):
        hub.append_upload(plain.file_id, b"1")


# -- jobs ----------------------------------------------------------------------------------


def test_job_state_machine_follows_the_clock(hub: Hub) -> None:
    """queued (queue delay) -> processing with progress -> completed, computed lazily."""
    created = submit(hub, make_pdf())
    assert ID.match(created.job_id)
    assert (created.status, created.progress) == ("queued", 0.0)
    assert created.output_file_id is None
    assert created.completed_at is None
    assert "output_file_id" not in created.to_json()
    assert "error" not in created.to_json()
    hub.clock.advance(2.5)
    assert (hub.get_job(created.job_id).status, hub.get_job(created.job_id).progress) == (
        "processing",
        0.0,
    )
    hub.clock.advance(5)
    halfway = hub.get_job(created.job_id)
    assert (halfway.status, halfway.progress) == ("processing", 0.5)
    assert halfway.updated_at == created.created_at + timedelta(seconds=7)
    hub.clock.advance(5)
    done = hub.get_job(created.job_id)
    assert (done.status, done.progress) == ("completed", 1.0)
    assert done.completed_at == created.created_at + timedelta(seconds=12)
    assert done.expires_at == done.completed_at + timedelta(days=3)
    assert done.output_file_id is not None
    assert ID.match(done.output_file_id)


def test_completed_job_output_is_a_stored_docx_named_after_the_source(hub: Hub) -> None:
    """The output file is in the store as '<stem>.<format>', rendered by documents.py."""
    done = finish(hub, submit(hub, make_pdf(), name="invoice 7.pdf"))
    assert done.output_file_id is not None
    output = hub.open_download(done.output_file_id)
    assert output.filename == "invoice 7.docx"
    assert output.media_type.endswith("wordprocessingml.document")
    assert output.path.read_bytes().startswith(b"PK\x03\x04")
    info = hub.get_file(done.output_file_id)
    assert info.created_at == done.completed_at
    assert info.expires_at == info.created_at + timedelta(hours=24)


def test_renderer_gets_the_documented_arguments(tmp_path: Path) -> None:
    """render_document is called with format, source name, engine, first language, pages."""
    renderer = RecordingRenderer()
    hub = Hub(tmp_path, HubSettings(processing_time=1), renderer=renderer)
    finish(hub, submit(hub, make_pdf(3), languages=["eng", "jpn"], output_format="pptx"))
    assert renderer.calls == [
        {
            "output_format": "pptx",
            "source_name": "scan.pdf",
            "engine": "ki/ocr",
            "language": "eng",
            "pages": 3,
            "input_format": "pdf",
        }
    ]


def test_processing_time_range_is_drawn_reproducibly_from_the_seed(tmp_path: Path) -> None:
    """A min-max processing time is drawn per job from the seeded RNG."""

    def durations(seed: int) -> list[float]:
        hub = Hub(tmp_path / str(seed), HubSettings(processing_time=(3, 8), seed=seed))
        jobs = [submit(hub, make_pdf()) for _ in range(5)]
        ends = [hub.job_terminal_at(job.job_id) for job in jobs]
        return [
            (end - job.created_at).total_seconds()
            for end, job in zip(ends, jobs, strict=True)
            if end
        ]

    first = durations(11)
    assert first == durations(11)
    assert all(3 <= seconds <= 8 for seconds in first)
    assert len(set(first)) == 5


def test_jobs_expire_three_days_after_completion_outputs_after_one(hub: Hub) -> None:
    """The output file 404s after 24 h while the job lives on until 3 days."""
    done = finish(hub, submit(hub, make_pdf()))
    assert done.output_file_id is not None
    assert done.completed_at is not None
    hub.clock.advance(24 * 3600)
    with pytest.raises(NotFound):
        hub.get_file(done.output_file_id)
    assert hub.get_job(done.job_id).output_file_id == done.output_file_id
    hub.clock.advance(2 * 24 * 3600)
    with pytest.raises(NotFound):
        hub.get_job(done.job_id)
    assert hub.list_jobs() == []


def test_clock_jump_past_the_output_expiry_stores_no_output(hub: Hub) -> None:
    """A job first looked at days after it ended is completed but its file is gone."""
    job = submit(hub, make_pdf())
    hub.clock.advance(2 * 24 * 3600)
    done = hub.get_job(job.job_id)
    assert done.status == "completed"
    assert done.output_file_id is not None
    with pytest.raises(NotFound):
        hub.open_download(done.output_file_id)


def test_lists_are_newest_first(hub: Hub) -> None:
    """GET /files and GET /renderocr/jobs order by creation, newest first."""
    first = submit(hub, make_pdf(), name="a.pdf")
    second = submit(hub, make_pdf(), name="b.pdf")
    assert [job.job_id for job in hub.list_jobs()] == [second.job_id, first.job_id]
    assert [info.filename for info in hub.list_files()] == ["b.pdf", "a.pdf"]


def test_engine_list_offers_every_conversion_and_some_languages(hub: Hub) -> None:
    """One engine, ki/ocr, converting 5 input formats to docx/xlsx/pptx, Auto first."""
    [engine] = hub.engines()
    assert engine["id"] == "ki/ocr"
    assert engine["provider"] == "ki"
    pairs = {(c["from"], c["to"]) for c in engine["supported_conversions"]}
    assert len(pairs) == 15
    assert ("bmp", "pptx") in pairs
    codes = [language["code"] for language in engine["supported_languages"]]
    assert codes[:3] == ["Auto", "jpn", "eng"]
    assert len(codes) > 3


# -- sniffing and page counts --------------------------------------------------------------


def test_unsupported_content_fails_the_job_after_acceptance(hub: Hub) -> None:
    """A ZIP named .pdf is accepted, then fails with unsupported_format saying what it is."""
    job = submit(hub, ZIP, name="scan.pdf")
    assert job.status == "queued"
    hub.clock.advance(2)
    failed = hub.get_job(job.job_id)
    assert failed.status == "failed"
    assert failed.progress == 0.0
    assert failed.error is not None
    assert failed.error.code == "unsupported_format"
    assert "looks like a ZIP archive" in failed.error.message
    assert ID.match(failed.error.request_id)
    assert failed.completed_at is not None
    assert failed.output_file_id is None
    assert "output_file_id" not in failed.to_json()


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("pdf without a page", BROKEN_PDF),
        ("png without IEND", make_scan("png")[:-12]),
        ("jpeg without FFD9", make_scan("jpeg")[:-2]),
        ("tiff cut short", tiff_header_beyond_file()),
        ("bmp cut short", make_scan("bmp")[:200]),
    ],
)
def test_broken_files_fail_with_invalid_input(hub: Hub, name: str, data: bytes) -> None:
    """Damaged or truncated inputs end failed with invalid_input."""
    failed = finish(hub, submit(hub, data))
    assert failed.status == "failed", name
    assert failed.error is not None
    assert failed.error.code == "invalid_input"


@pytest.mark.parametrize(
    ("data", "pages"),
    [
        (make_pdf(3), 3),
        (make_scan("tiff", pages=2), 2),
        (make_scan("tiff"), 1),
        (make_scan("jpeg"), 1),
        (make_scan("png"), 1),
        (make_scan("bmp"), 1),
        (b"%PDF-1.5\n1 0 obj <</Type /ObjStm /N 3>> stream\n...\nendstream\n%%EOF\n", 1),
    ],
)
def test_page_counts(tmp_path: Path, data: bytes, pages: int) -> None:
    """PDF counts /Type /Page objects (not /Pages), TIFF counts IFDs, images are 1 page."""
    path = tmp_path / "input"
    path.write_bytes(data)
    inspection = inspect_file(path)
    assert inspection.problem is None
    assert inspection.pages == pages


def test_pdf_pages_are_counted_across_read_chunks(tmp_path: Path) -> None:
    """Page markers straddling the 1 MiB scan chunks are each counted once."""
    chunk = 1024 * 1024
    marker = b"<</Type /Page>>"
    data = bytearray(b"%PDF-1.4\n" + b" " * (3 * chunk))
    for position in (chunk - 8, chunk - 64, 2 * chunk - 3, 2 * chunk + 100, 3 * chunk):
        data[position : position + len(marker)] = marker
    path = tmp_path / "big.pdf"
    path.write_bytes(bytes(data))
    assert inspect_file(path).pages == 5


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"engine": "ki/other"}, "invalid_engine"),
        ({"languages": ["xx"]}, "invalid_language"),
        ({"languages": ["jpn", "nope"]}, "invalid_language"),
        ({"output_format": "pdf"}, "invalid_output_format"),
        ({"file_id": "a" * 32}, "invalid_file_id"),
        ({"languages": []}, "invalid_request"),
        ({"engine": None}, "invalid_request"),
    ],
)
def test_job_creation_refusals(hub: Hub, fields: dict[str, Any], code: str) -> None:
    """Unknown engine, language, format or file are refused with a backend error code."""
    with pytest.raises(InvalidRequest) as refused:
        submit(hub, make_pdf(), **fields)
    assert refused.value.code == code
    assert hub.ledger()["jobs"] == []


def test_job_body_must_be_an_object(hub: Hub) -> None:
    """A body that is not a JSON object is invalid_request."""
    with pytest.raises(InvalidRequest, match="JSON object"):
        hub.create_job(["ki/ocr"])


def test_expired_file_cannot_start_a_job(hub: Hub) -> None:
    """A file past its expiry is an invalid file_id."""
    info = hub.add_file("scan.pdf", make_pdf())
    hub.clock.advance(25 * 3600)
    body = {"file_id": info.file_id, "engine": "ki/ocr", "languages": ["jpn"]}
    with pytest.raises(InvalidRequest) as refused:
        hub.create_job({**body, "output_format": "docx"})
    assert refused.value.code == "invalid_file_id"


# -- auth and faults -----------------------------------------------------------------------


def test_keys_are_granted_refused_or_revoked(hub: Hub) -> None:
    """Bearer keys are checked against the valid and revoked sets, which can change."""
    assert hub.check_key(None) is Access.MISSING
    assert hub.check_key("Basic abc") is Access.MALFORMED
    assert hub.check_key("Bearer demo-key") is Access.GRANTED
    assert hub.check_key("bearer   demo-key ") is Access.GRANTED
    assert hub.check_key("Bearer other") is Access.UNKNOWN
    keys = hub.set_keys(api_keys=["new"], revoked=["demo-key"])
    assert keys == {"api_keys": ["new"], "revoked": ["demo-key"]}
    assert hub.check_key("Bearer demo-key") is Access.REVOKED
    assert hub.check_key("Bearer new") is Access.GRANTED


def test_request_faults_are_reproducible_from_the_seed(tmp_path: Path) -> None:
    """Two hubs with the same seed and rates draw the same faults, counted in the ledger."""
    faults = Faults(error_rate=0.3, rate_limit_rate=0.2, drop_rate=0.1, retry_after=4)

    def draws(name: str) -> tuple[list[tuple[str, int] | None], dict[str, int]]:
        hub = Hub(tmp_path / name, HubSettings(seed=99, faults=faults))
        seen = [hub.draw_fault() for _ in range(300)]
        return [(f.kind, f.status) if f else None for f in seen], hub.ledger()["faults"]

    first, counted = draws("a")
    assert first == draws("b")[0]
    kinds = [draw[0] for draw in first if draw]
    assert counted["error"] == kinds.count("error") > 60
    assert counted["rate_limit"] == kinds.count("rate_limit") > 30
    assert counted["drop"] == kinds.count("drop") > 10
    assert {status for kind, status in filter(None, first) if kind == "error"} == {500, 502, 503}


def test_a_client_jobs_faults_do_not_depend_on_other_clients_traffic(tmp_path: Path) -> None:
    """With a seed, one trace's draws are the same whether or not other traces interleave."""
    faults = Faults(error_rate=0.3, rate_limit_rate=0.2, drop_rate=0.1)
    alone = Hub(tmp_path / "alone", HubSettings(seed=7, faults=faults))
    busy = Hub(tmp_path / "busy", HubSettings(seed=7, faults=faults))
    mine: list[Fault | None] = []
    for i in range(100):
        for other in range(i % 4):
            busy.draw_fault(f"other-{other}")
            busy.draw_fault()  # untraced requests draw from the shared stream
        mine.append(busy.draw_fault("7"))
    assert mine == [alone.draw_fault("7") for _ in range(100)]
    assert 30 < sum(fault is not None for fault in mine) < 90


def test_fault_knobs_change_while_running_and_are_validated(hub: Hub) -> None:
    """update_faults applies partial changes and refuses bad names and values."""
    assert hub.draw_fault() is None
    knobs = hub.update_faults({"rate_limit_rate": 1, "retry_after": 2.5})
    assert knobs.rate_limit_rate == 1
    assert knobs.error_rate == 0
    fault = hub.draw_fault()
    assert fault is not None
    assert (fault.kind, fault.status, fault.retry_after) == (
        "rate_limit",
        429,
        2.5,
    )
    for bad in (
        {"nonsense": 1},
        {"error_rate": 1.5},
        {"error_rate": 0.5, "drop_rate": 0.6, "rate_limit_rate": 0},
        {"latency": -1},
        {"stall_downloads": 1.5},
        {"drop_rate": True},
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - the message varies per knob
            hub.update_faults(bad)
    assert hub.faults == knobs


def test_job_failure_rate_fails_jobs_with_upstream_service_error(tmp_path: Path) -> None:
    """Injected job failures end failed after processing, with the observed error body."""
    hub = Hub(tmp_path, HubSettings(processing_time=10, faults=Faults(job_failure_rate=1.0)))
    job = submit(hub, make_pdf())
    hub.clock.advance(5)
    assert hub.get_job(job.job_id).status == "processing"
    failed = finish(hub, job)
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error.code == "upstream_service_error"
    assert failed.error.message == UPSTREAM_ERROR_MESSAGE
    assert failed.completed_at == job.created_at + timedelta(seconds=10)
    assert hub.ledger()["faults"]["job_failure"] == 1


def test_stalled_downloads_are_used_up(hub: Hub) -> None:
    """stall_downloads counts down one per download and is counted as a fault."""
    hub.update_faults({"stall_downloads": 2})
    assert [hub.take_stall() for _ in range(3)] == [True, True, False]
    assert hub.faults.stall_downloads == 0
    assert hub.ledger()["faults"]["stall"] == 2


def test_files_rate_limit_is_a_sliding_minute_per_key(hub: Hub) -> None:
    """Over N requests a minute one key gets a Retry-After; others and later are fine."""
    assert hub.throttle("a") is None  # off by default
    hub.update_faults({"files_rate_limit": 2})
    assert [hub.throttle("a"), hub.throttle("a")] == [None, None]
    retry = hub.throttle("a")
    assert retry is not None
    assert 1 <= retry <= 60
    assert hub.throttle("b") is None
    hub.clock.advance(60)
    assert hub.throttle("a") is None
    assert hub.ledger()["faults"]["throttle"] == 1


# -- ledger --------------------------------------------------------------------------------


def test_ledger_records_uploads_jobs_downloads_and_resets(hub: Hub) -> None:
    """The ledger lists what was received, in JSON-ready form, until reset."""
    data = make_pdf()
    job = submit(hub, data, languages=["Auto"], output_format="xlsx")
    hub.count_request("GET /files")
    hub.count_request("GET /files")
    hub.record_download("f" * 32, 10, 206)
    ledger = hub.ledger()
    assert ledger["requests"] == {"GET /files": 2}
    [upload] = ledger["uploads"]
    assert upload["filename"] == "scan.pdf"
    assert upload["size"] == len(data)
    assert upload["sha256"] == hashlib.sha256(data).hexdigest()
    assert upload["content_type"] is None
    assert STAMP.match(upload["received_at"])
    finishes_at = ledger["jobs"][0].pop("finishes_at")  # the exact end, for benchmarks
    assert finishes_at >= datetime.fromisoformat(job.to_json()["created_at"]).timestamp()
    assert ledger["jobs"] == [
        {
            "job_id": job.job_id,
            "file_id": job.file_id,
            "engine": "ki/ocr",
            "languages": ["Auto"],
            "output_format": "xlsx",
            "created_at": job.to_json()["created_at"],
            "filename": "scan.pdf",
            "input_pages": 1,
            "outcome": "pending",
            "reply_lost": False,
        }
    ]
    assert ledger["downloads"] == [{"file_id": "f" * 32, "size": 10, "status": 206}]
    ledger["requests"]["GET /files"] = 99  # a copy: the hub's own is untouched
    assert hub.ledger()["requests"] == {"GET /files": 2}
    hub.reset_ledger()
    assert hub.ledger() == {
        "requests": {},
        "refused": {},
        "uploads": [],
        "jobs": [],
        "downloads": [],
        "events": [],
        "faults": dict.fromkeys(
            (
                "error",
                "rate_limit",
                "drop",
                "stall",
                "job_failure",
                "throttle",
                "lost_reply",
                "dropped_create",
                "outage",
                "refused_route",
                "storage_lag",
            ),
            0,
        ),
        "storage_saw_authorization": 0,
    }


def test_hub_is_consistent_under_concurrent_use(hub: Hub) -> None:
    """Threads uploading and submitting at once lose nothing."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                submit(hub, make_pdf())
                hub.count_request("POST /files")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    ledger = hub.ledger()
    assert ledger["requests"]["POST /files"] == 80
    assert len(ledger["uploads"]) == len(ledger["jobs"]) == 80
    assert len(hub.list_jobs()) == 80
