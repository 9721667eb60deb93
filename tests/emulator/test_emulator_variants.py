"""The emulator's answer-shape and hub-economy knobs, through the HTTP app in process."""

from __future__ import annotations

import gzip
import json
import re
import zlib
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import pytest

from daemon.emulator.app import create_app
from daemon.emulator.hub import (
    DEFAULT_API_KEY,
    Hub,
    HubSettings,
    pages_billed,
    paid_conversions,
    refused_share,
)
from tests.scans import make_pdf, make_scan

AUTH = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
PROCESSING = 10.0
FRACTION_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
OFFSET = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def hub(tmp_path: Path) -> Hub:
    """A hub whose jobs take ten seconds of its clock, which the tests advance."""
    return Hub(tmp_path / "store", HubSettings(processing_time=PROCESSING, seed=5))


def session_for(hub: Hub, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(hub)),
        base_url="http://emulator",
        headers=AUTH if headers is None else headers,
    )


async def upload(session: httpx.AsyncClient, data: bytes, name: str = "scan.pdf") -> str:
    response = await session.post("/files", files={"file": (name, data, "application/pdf")})
    assert response.is_success, response.text
    file_id: str = response.json()["file_id"]
    return file_id


def job_request(file_id: str) -> dict[str, Any]:
    return {"file_id": file_id, "engine": "ki/ocr", "languages": ["jpn"], "output_format": "docx"}


async def submit(session: httpx.AsyncClient, data: bytes, name: str = "scan.pdf") -> str:
    """Upload ``data`` and create a job on it; return the job id."""
    created = await session.post(
        "/renderocr/jobs", json=job_request(await upload(session, data, name))
    )
    assert created.is_success, created.text
    job_id: str = created.json()["job_id"]
    return job_id


async def job(session: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await session.get(f"/renderocr/jobs/{quote(job_id, safe='')}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def completed(hub: Hub, session: httpx.AsyncClient, data: bytes) -> dict[str, Any]:
    """A job on ``data`` run to its end."""
    job_id = await submit(session, data)
    hub.clock.advance(PROCESSING + 1)
    return await job(session, job_id)


# -- status codes ----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("status", [200, 201, 202])
async def test_create_and_upload_answer_the_chosen_status(hub: Hub, status: int) -> None:
    """create_status and upload_status set the 2xx of job creation, uploads and sessions."""
    hub.update_knobs({"create_status": status, "upload_status": status})
    async with session_for(hub) as session:
        sent = await session.post("/files", files={"file": ("a.pdf", make_pdf())})
        made = await session.post("/renderocr/jobs", json=job_request(sent.json()["file_id"]))
        opened = await session.post("/uploads", json={"filename": "b.pdf"})
    assert (sent.status_code, made.status_code, opened.status_code) == (status,) * 3
    assert made.json()["status"] == "queued"


# -- job bodies ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_default_completed_job_reports_usage_and_no_extras(hub: Hub) -> None:
    """By default a completed job carries usage.input_pages and only the documented fields."""
    async with session_for(hub) as session:
        done = await completed(hub, session, make_pdf(3))
    assert done["usage"] == {"input_pages": 3}
    assert (done["status"], done["progress"]) == ("completed", 1.0)
    assert set(done) == {
        "job_id",
        "file_id",
        "engine",
        "status",
        "progress",
        "output_file_id",
        "usage",
        "created_at",
        "updated_at",
        "completed_at",
        "expires_at",
    }


@pytest.mark.anyio
async def test_progress_scale_status_case_extra_status_and_extra_fields(hub: Hub) -> None:
    """Progress as percent, status upper-cased or renamed, unknown fields added."""
    async with session_for(hub) as session:
        job_id = await submit(session, make_pdf())
        hub.clock.advance(PROCESSING / 2)
        hub.update_knobs({"progress_scale": "percent_int", "extra_fields": True})
        halfway = await job(session, job_id)
        hub.update_knobs({"progress_scale": "percent_float", "extra_status": "running"})
        renamed = await job(session, job_id)
        hub.update_knobs({"status_case": "upper"})
        shouted = await job(session, job_id)
        listed = (await session.get("/renderocr/jobs")).json()["data"][0]
    assert halfway["progress"] == 50
    assert isinstance(halfway["progress"], int)
    assert halfway["status"] == "processing"
    assert halfway["metadata"]["source"] == "ldx-hub-emulator"
    assert halfway["x_gateway_region"] == "ap-northeast-1"
    assert renamed["progress"] == pytest.approx(50.0)
    assert isinstance(renamed["progress"], float)
    assert renamed["status"] == "running"
    assert shouted["status"] == listed["status"] == "RUNNING"


@pytest.mark.anyio
async def test_upper_case_applies_to_terminal_statuses(hub: Hub) -> None:
    """status_case upper reports COMPLETED, and percent scales end at 100."""
    hub.update_knobs({"status_case": "upper", "progress_scale": "percent_int"})
    async with session_for(hub) as session:
        done = await completed(hub, session, make_pdf())
    assert (done["status"], done["progress"]) == ("COMPLETED", 100)


@pytest.mark.anyio
@pytest.mark.parametrize(("style", "pattern"), [("fraction_z", FRACTION_Z), ("offset", OFFSET)])
async def test_timestamp_styles(hub: Hub, style: str, pattern: re.Pattern[str]) -> None:
    """timestamp_style formats every time in job and file bodies."""
    hub.update_knobs({"timestamp_style": style})
    async with session_for(hub) as session:
        done = await completed(hub, session, make_pdf())
        info = (await session.get(f"/files/{done['file_id']}")).json()
    stamps = [done[k] for k in ("created_at", "updated_at", "completed_at", "expires_at")]
    stamps += [info[k] for k in ("created_at", "updated_at", "expires_at")]
    assert all(pattern.match(stamp) for stamp in stamps), stamps


@pytest.mark.anyio
async def test_timestamp_skew_shifts_reported_times_only(hub: Hub) -> None:
    """timestamp_skew moves body times, trace times and Last-Modified, not the hub's timing."""
    async with session_for(hub) as session:
        job_id = await submit(session, make_pdf())
        plain = await job(session, job_id)
        hub.update_knobs({"timestamp_skew": -300})
        skewed = await job(session, job_id)
        hub.clock.advance(PROCESSING + 1)
        done = await job(session, job_id)  # finishes on time despite the skew
        download = await session.get(f"/files/{done['output_file_id']}/content")
        bad_key = {"Authorization": "Bearer wrong"}
        problem = (await session.get("/renderocr/jobs", headers=bad_key)).json()
        refused = await session.get(
            f"/files/{done['output_file_id']}/content",
            headers={"If-Unmodified-Since": download.headers["last-modified"]},
        )
    shift = datetime.fromisoformat(plain["created_at"]) - datetime.fromisoformat(
        skewed["created_at"]
    )
    assert shift == timedelta(seconds=300)
    assert done["status"] == "completed"
    modified = parsedate_to_datetime(download.headers["last-modified"])
    assert modified < datetime.fromisoformat(done["completed_at"]) + timedelta(seconds=1)
    assert modified > datetime.fromisoformat(plain["created_at"]) - timedelta(seconds=301)
    traced = datetime.fromisoformat(problem["trace"]["timestamp"])
    assert hub.clock.now() - traced > timedelta(seconds=290)
    assert refused.status_code == 200  # the client's date is judged against the skewed one


@pytest.mark.anyio
async def test_omitted_fields_and_usage_on_failure(hub: Hub) -> None:
    """omit_fields drops completed_at, expires_at and usage; failed jobs bill usage on request."""
    hub.update_knobs({"omit_fields": ["completed_at", "expires_at", "usage"]})
    async with session_for(hub) as session:
        done = await completed(hub, session, make_pdf(2))
        hub.update_knobs({"omit_fields": [], "job_failure_rate": 1.0})
        failed = await completed(hub, session, make_pdf(2))
        hub.update_knobs({"usage_on_failure": True})
        billed = await job(session, failed["job_id"])
    assert not {"completed_at", "expires_at", "usage"} & set(done)
    assert failed["status"] == "failed"
    assert "usage" not in failed
    assert billed["usage"] == {"input_pages": 2}


@pytest.mark.anyio
async def test_error_as_string(hub: Hub) -> None:
    """error_as_string reports a failed job's error as "code: message"."""
    hub.update_knobs({"job_failure_rate": 1.0, "error_as_string": True})
    async with session_for(hub) as session:
        failed = await completed(hub, session, make_pdf())
    assert isinstance(failed["error"], str)
    assert failed["error"].startswith("upstream_service_error: ")


# -- engine list -----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("strings", {"data": ["ki/ocr"]}),
        ("empty", {"data": []}),
    ],
)
async def test_engine_list_flat_shapes(hub: Hub, shape: str, expected: dict[str, Any]) -> None:
    """engines_shape strings and empty answer those exact bodies."""
    hub.update_knobs({"engines_shape": shape})
    async with session_for(hub, headers={}) as session:
        assert (await session.get("/renderocr/engines")).json() == expected


@pytest.mark.anyio
async def test_engine_list_wrappers_and_missing_keys(hub: Hub) -> None:
    """other_wrapper moves the list off 'data'; no_languages/no_conversions drop a key."""
    async with session_for(hub, headers={}) as session:
        hub.update_knobs({"engines_shape": "other_wrapper"})
        wrapped = (await session.get("/renderocr/engines")).json()
        hub.update_knobs({"engines_shape": "no_languages"})
        [bare] = (await session.get("/renderocr/engines")).json()["data"]
        hub.update_knobs({"engines_shape": "no_conversions"})
        [blind] = (await session.get("/renderocr/engines")).json()["data"]
    assert list(wrapped) == ["engines"]
    assert wrapped["engines"][0]["id"] == "ki/ocr"
    assert "supported_languages" not in bare
    assert "supported_conversions" in bare
    assert "supported_conversions" not in blind
    assert "supported_languages" in blind


@pytest.mark.anyio
async def test_engine_list_behind_auth(hub: Hub) -> None:
    """engines_shape auth_required answers 401 without a key and the list with one."""
    hub.update_knobs({"engines_shape": "auth_required"})
    async with session_for(hub, headers={}) as session:
        anonymous = await session.get("/renderocr/engines")
        keyed = await session.get("/renderocr/engines", headers=AUTH)
    assert anonymous.status_code == 401
    assert anonymous.headers["content-type"] == "application/problem+json"
    assert keyed.json()["data"][0]["id"] == "ki/ocr"


# -- error bodies ----------------------------------------------------------------------------

ERROR_STYLES = {
    "default": ("application/json", lambda r: set(r.json()) == {"code", "message", "request_id"}),
    "problem": ("application/problem+json", lambda r: r.json()["title"] == "Not Found"),
    "nested": ("application/json", lambda r: r.json()["error"]["code"] == "job_not_found"),
    "message": ("application/json", lambda r: list(r.json()) == ["message"]),
    "text": ("text/plain; charset=utf-8", lambda r: r.text.startswith("job_not_found: ")),
    "html": ("text/html; charset=utf-8", lambda r: "<h1>404 Not Found</h1>" in r.text),
}


@pytest.mark.anyio
@pytest.mark.parametrize("style", sorted(ERROR_STYLES))
async def test_backend_error_body_styles(hub: Hub, style: str) -> None:
    """error_body shapes the body of backend errors such as an unknown job id."""
    hub.update_knobs({"error_body": style})
    async with session_for(hub) as session:
        response = await session.get("/renderocr/jobs/" + "0" * 32)
    media_type, looks_right = ERROR_STYLES[style]
    assert response.status_code == 404
    assert response.headers["content-type"] == media_type
    assert looks_right(response), response.text


@pytest.mark.anyio
async def test_unknown_file_id_on_create_can_be_404_or_another_code(hub: Hub) -> None:
    """missing_input_status/code change the refusal of a job naming an unknown file_id."""
    async with session_for(hub) as session:
        default = await session.post("/renderocr/jobs", json=job_request("0" * 32))
        hub.update_knobs({"missing_input_status": 404})
        not_found = await session.post("/renderocr/jobs", json=job_request("0" * 32))
        hub.update_knobs({"missing_input_status": 400, "missing_input_code": "file_expired"})
        renamed = await session.post("/renderocr/jobs", json=job_request("0" * 32))
    assert (default.status_code, default.json()["code"]) == (400, "invalid_file_id")
    assert (not_found.status_code, not_found.json()["code"]) == (404, "invalid_file_id")
    assert (renamed.status_code, renamed.json()["code"]) == (400, "file_expired")


@pytest.mark.anyio
async def test_echo_auth_repeats_the_key_in_every_error_body(hub: Hub) -> None:
    """echo_auth puts the Authorization value verbatim in problem, backend and HTML bodies."""
    hub.update_knobs({"echo_auth": True})
    secret = "Bearer zpka_secret_leak_1234"
    async with session_for(hub) as session:
        unauthorized = await session.get("/files", headers={"Authorization": secret})
        backend = await session.get("/files/" + "0" * 32)
        hub.update_knobs({"error_body": "text"})
        text = await session.get("/files/" + "0" * 32)
        hub.update_knobs({"outage": True, "outage_mode": "html502"})
        page = await session.get("/files")
    assert secret in unauthorized.json()["detail"]
    assert AUTH["Authorization"] in backend.json()["message"]
    assert AUTH["Authorization"] in text.text
    assert page.status_code == 502
    assert AUTH["Authorization"] in page.text


# -- listings, long polls --------------------------------------------------------------------


@pytest.mark.anyio
async def test_list_limit_keeps_the_newest(hub: Hub) -> None:
    """list_limit cuts GET /files and GET /renderocr/jobs to the newest N."""
    async with session_for(hub) as session:
        jobs = [await submit(session, make_pdf(), f"{n}.pdf") for n in range(3)]
        hub.update_knobs({"list_limit": 2})
        listed = (await session.get("/renderocr/jobs")).json()["data"]
        files = (await session.get("/files")).json()["data"]
    assert [j["job_id"] for j in listed] == [jobs[2], jobs[1]]
    assert [f["filename"] for f in files] == ["2.pdf", "1.pdf"]


@pytest.mark.anyio
async def test_wait_mode_ignore_answers_at_once_and_reject_refuses(hub: Hub) -> None:
    """wait_mode ignore answers a ?wait poll at once; reject answers it 400."""
    async with session_for(hub) as session:
        job_id = await submit(session, make_pdf())
        hub.update_knobs({"wait_mode": "ignore"})
        with anyio.fail_after(0.9):  # honoured, the wait would take at least 1 s
            ignored = await session.get(f"/renderocr/jobs/{job_id}", params={"wait": 10})
        hub.update_knobs({"wait_mode": "reject"})
        rejected = await session.get(f"/renderocr/jobs/{job_id}", params={"wait": 10})
        plain = await session.get(f"/renderocr/jobs/{job_id}")
    assert ignored.json()["status"] == "processing"
    assert rejected.status_code == 400
    assert rejected.json()["code"] == "invalid_parameter"
    assert plain.status_code == 200


# -- hostile ids -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_hostile_ids_work_when_percent_encoded(hub: Hub) -> None:
    """hostile_ids hands out ids with '..', '/' and '%' that work only percent-encoded."""
    hub.update_knobs({"hostile_ids": True})
    async with session_for(hub) as session:
        file_id = await upload(session, make_pdf())
        created = await session.post("/renderocr/jobs", json=job_request(file_id))
        job_id = created.json()["job_id"]
        hub.clock.advance(PROCESSING + 1)
        done = await job(session, job_id)
        output = quote(done["output_file_id"], safe="")
        info = await session.get(f"/files/{quote(file_id, safe='')}")
        content = await session.get(f"/files/{output}/content")
        half_encoded = await session.get("/files/" + file_id.replace("/", "%2F"))
    for hostile in (file_id, job_id, done["output_file_id"]):
        assert ".." in hostile
        assert "/" in hostile
        assert "%" in hostile
    assert info.json()["file_id"] == file_id
    assert content.content.startswith(b"PK")
    assert half_encoded.status_code == 404  # "%2F" in the id itself was not sent as "%252F"
    stored = sorted(p.name for p in hub.data_dir.iterdir())
    assert len(stored) == 2  # the upload and the output, inside the store
    assert all(p.parent == hub.data_dir for p in hub.data_dir.iterdir())


# -- padded and gzipped JSON -----------------------------------------------------------------


@pytest.mark.anyio
async def test_json_padding_pads_job_and_list_answers(hub: Hub) -> None:
    """json_padding adds an extra field of spaces; the length is declared and exact."""
    async with session_for(hub) as session:
        job_id = await submit(session, make_pdf())
        hub.update_knobs({"json_padding": 3_000_000})
        padded = await session.get(f"/renderocr/jobs/{job_id}")
        listed = await session.get("/renderocr/jobs")
        info = await session.get("/files")
    body = padded.json()
    assert len(body["x_padding"]) == 3_000_000
    assert body["job_id"] == job_id
    assert int(padded.headers["content-length"]) == len(padded.content) > 3_000_000
    assert len(listed.json()["x_padding"]) == 3_000_000
    assert len(info.json()["x_padding"]) == 3_000_000


@pytest.mark.anyio
async def test_gzip_json_is_small_on_the_wire_and_huge_inflated(hub: Hub) -> None:
    """gzip_json with 300 MB of padding sends a few hundred KB that inflate to 300 MB."""
    padding = 300_000_000
    async with session_for(hub) as session:
        job_id = await submit(session, make_pdf())
        hub.update_knobs({"json_padding": padding, "gzip_json": True})
        async with session.stream("GET", f"/renderocr/jobs/{job_id}") as response:
            wire = b"".join([chunk async for chunk in response.aiter_raw()])
    assert response.headers["content-encoding"] == "gzip"
    assert int(response.headers["content-length"]) == len(wire) < 400_000
    inflated, head = inflate_count(wire, 31)
    assert inflated > padding
    assert head.startswith(b'{"job_id":')


def inflate_count(data: bytes, wbits: int) -> tuple[int, bytes]:
    """Bytes ``data`` inflates to, counted in pieces (never all in memory); and its start."""
    inflater = zlib.decompressobj(wbits)
    total, head = 0, b""
    while data:
        piece = inflater.decompress(data, 16 * 1024 * 1024)
        head = head or piece[:64]
        total += len(piece)
        data = inflater.unconsumed_tail
    return total + len(inflater.flush()), head


# -- storage ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_output_delay_then_available_and_output_missing(hub: Hub) -> None:
    """output_delay holds a new output back (404) for N s; output_missing for ever."""
    hub.update_knobs({"output_delay": 30})
    async with session_for(hub) as session:
        done = await completed(hub, session, make_pdf())
        url = f"/files/{done['output_file_id']}/content"
        lagging = await session.get(url)
        info_lagging = await session.get(f"/files/{done['output_file_id']}")
        upload_ok = await session.get(f"/files/{done['file_id']}/content")
        hub.clock.advance(30)
        arrived = await session.get(url)
        hub.update_knobs({"output_missing": True})
        lost = await session.get(url)
    assert (lagging.status_code, info_lagging.status_code) == (404, 404)
    assert lagging.json()["code"] == "file_not_found"
    assert upload_ok.status_code == 200
    assert arrived.status_code == 200
    assert lost.status_code == 404
    assert hub.ledger()["faults"]["storage_lag"] == 3


@pytest.mark.anyio
async def test_output_and_job_ttl_with_410(hub: Hub) -> None:
    """output_ttl/job_ttl expire outputs and jobs N s after completion; 410 if asked."""
    hub.update_knobs({"output_ttl": 60, "job_ttl": 120, "expired_status": 410})
    async with session_for(hub) as session:
        done = await completed(hub, session, make_pdf())
        url = f"/files/{done['output_file_id']}/content"
        hub.clock.advance(61)
        gone = await session.get(url)
        still = await session.get(f"/renderocr/jobs/{done['job_id']}")
        hub.clock.advance(60)
        job_gone = await session.get(f"/renderocr/jobs/{done['job_id']}")
        unknown = await session.get("/renderocr/jobs/" + "0" * 32)
    assert datetime.fromisoformat(done["expires_at"]) - datetime.fromisoformat(
        done["completed_at"]
    ) == timedelta(seconds=120)
    assert gone.status_code == 410
    assert still.status_code == 200
    assert job_gone.status_code == 410
    assert unknown.status_code == 404
    assert hub.ledger()["downloads"][-1]["status"] == 410


@pytest.mark.anyio
async def test_download_gzip_declares_the_compressed_length(hub: Hub) -> None:
    """download_gzip sends Content-Encoding gzip with the compressed Content-Length."""
    data = make_pdf()
    async with session_for(hub) as session:
        file_id = await upload(session, data)
        hub.update_knobs({"download_gzip": True})
        async with session.stream("GET", f"/files/{file_id}/content") as response:
            wire = b"".join([chunk async for chunk in response.aiter_raw()])
    assert response.headers["content-encoding"] == "gzip"
    assert int(response.headers["content-length"]) == len(wire)
    assert gzip.decompress(wire) == data


@pytest.mark.anyio
async def test_gzip_bomb_download_is_small_on_the_wire_and_a_gibibyte_inflated(hub: Hub) -> None:
    """download_gzip_bomb sends about 1 MB that inflates to 1 GiB (counted, not held)."""
    async with session_for(hub) as session:
        file_id = await upload(session, make_pdf())
        hub.update_knobs({"download_gzip_bomb": True})
        async with session.stream("GET", f"/files/{file_id}/content") as response:
            wire = b"".join([chunk async for chunk in response.aiter_raw()])
    assert response.headers["content-encoding"] == "gzip"
    assert int(response.headers["content-length"]) == len(wire) < 1_200_000
    assert inflate_count(wire, 31)[0] == 1024**3
    assert hub.ledger()["downloads"][-1]["mode"] == "gzip_bomb"


@pytest.mark.anyio
async def test_never_ending_bodies_raise_read_timeout_in_process(hub: Hub) -> None:
    """Without a socket, endless and trickling downloads raise what a client would see."""
    async with session_for(hub) as session:
        file_id = await upload(session, make_pdf())
        for mode in ("endless", "trickle"):
            hub.update_knobs({"download_mode": mode, "trickle_interval": 0.01})
            with pytest.raises(httpx.ReadTimeout):
                await session.get(f"/files/{file_id}/content")
    assert [d["mode"] for d in hub.ledger()["downloads"]] == ["endless", "trickle"]


@pytest.mark.anyio
async def test_oversize_and_unsized_bodies_in_process(hub: Hub) -> None:
    """In process, oversize sends more than its Content-Length; unsized sends no length."""
    data = make_pdf()
    async with session_for(hub) as session:
        file_id = await upload(session, data)
        hub.update_knobs({"download_mode": "oversize", "oversize_bytes": 100})
        over = await session.get(f"/files/{file_id}/content")
        hub.update_knobs({"download_mode": "unsized"})
        unsized = await session.get(f"/files/{file_id}/content")
    assert int(over.headers["content-length"]) == len(data)
    assert over.content == data + bytes(100)
    assert "content-length" not in unsized.headers
    assert unsized.content == data + bytes(100)


@pytest.mark.anyio
async def test_redirected_download_serves_from_storage_without_the_key(hub: Hub) -> None:
    """download_redirect answers 302 to /_storage/<token>; storage counts requests with a key."""
    data = make_pdf()
    async with session_for(hub) as session, session_for(hub, headers={}) as keyless:
        file_id = await upload(session, data)
        hub.update_knobs({"download_redirect": True})
        redirect = await session.get(f"/files/{file_id}/content")
        location = httpx.URL(redirect.headers["location"])
        clean = await keyless.get(location)
        leaked = await session.get(location)
        unknown = await keyless.get("/_storage/" + "0" * 32)
    assert redirect.status_code == 302
    assert location.host == "localhost"
    assert location.path.startswith("/_storage/")
    assert clean.content == leaked.content == data
    assert unknown.status_code == 403
    assert b"AccessDenied" in unknown.content
    ledger = hub.ledger()
    assert ledger["requests"]["GET /_storage/{token}"] == 3
    assert ledger["storage_saw_authorization"] == 1


# -- refusals, limits and outages ------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "words"), [(402, "Credit limit"), (403, "plan")])
async def test_refused_route_only(hub: Hub, status: int, words: str) -> None:
    """refuse_route answers one route 402 or 403 with a reason; the key works elsewhere."""
    hub.update_knobs({"refuse_route": "POST /renderocr/jobs", "refuse_status": status})
    async with session_for(hub) as session:
        file_id = await upload(session, make_pdf())
        refused = await session.post("/renderocr/jobs", json=job_request(file_id))
        listed = await session.get("/renderocr/jobs")
    assert refused.status_code == status
    assert words in refused.json()["detail"]
    assert listed.status_code == 200
    assert hub.ledger()["jobs"] == []
    assert hub.ledger()["faults"]["refused_route"] == 1


@pytest.mark.anyio
async def test_requests_per_minute_limits_every_route_per_key(hub: Hub) -> None:
    """requests_per_minute refuses the (N+1)th request of a key within a minute, any route."""
    hub.update_knobs({"requests_per_minute": 3})
    async with session_for(hub) as session:
        answers = [
            await session.get("/files"),
            await session.get("/renderocr/jobs"),
            await session.get("/renderocr/jobs/" + "0" * 32),
            await session.get("/renderocr/jobs"),
        ]
        hub.clock.advance(60)
        later = await session.get("/renderocr/jobs")
    assert [a.status_code for a in answers] == [200, 200, 404, 429]
    assert 1 <= int(answers[-1].headers["retry-after"]) <= 60
    assert later.status_code == 200
    ledger = hub.ledger()
    assert ledger["refused"] == {"GET /renderocr/jobs": 1}
    assert refused_share(ledger) == pytest.approx(1 / 5)
    assert refused_share(ledger, "GET /renderocr/jobs") == pytest.approx(1 / 3)


@pytest.mark.anyio
async def test_retry_after_as_http_date_or_absent(hub: Hub) -> None:
    """retry_after_format gives every 429's Retry-After as an HTTP date, or none at all."""
    hub.update_knobs({"rate_limit_rate": 1.0, "retry_after": 30, "retry_after_format": "http_date"})
    async with session_for(hub) as session:
        dated = await session.get("/files")
        hub.update_knobs({"retry_after_format": "absent"})
        bare = await session.get("/files")
    when = parsedate_to_datetime(dated.headers["retry-after"])
    ahead = (when - datetime.now(when.tzinfo)).total_seconds()
    assert 28 <= ahead <= 32
    assert bare.status_code == 429
    assert "retry-after" not in bare.headers
    assert [e["retry_after"] for e in hub.ledger()["events"]][-1] is None


@pytest.mark.anyio
async def test_outage_answers_503_or_html_then_ends(hub: Hub) -> None:
    """An outage answers every route (engines too unless spared) until its window ends."""
    async with session_for(hub) as session:
        hub.update_knobs({"outage": 120, "outage_mode": "503"})
        down = await session.get("/files", headers={})  # refused before the key check
        engines_down = await session.get("/renderocr/engines")
        hub.update_knobs({"outage_mode": "html502", "outage_spares_engines": True})
        page = await session.get("/renderocr/jobs")
        engines_up = await session.get("/renderocr/engines")
        hub.clock.advance(121)
        back = await session.get("/files")
    assert down.status_code == 503
    assert down.headers["content-type"] == "application/problem+json"
    assert engines_down.status_code == 503
    assert page.status_code == 502
    assert page.headers["content-type"].startswith("text/html")
    assert "<h1>502 Bad Gateway</h1>" in page.text
    assert engines_up.status_code == 200
    assert back.status_code == 200


@pytest.mark.anyio
async def test_outage_until_cleared_and_drop_mode_in_process(hub: Hub) -> None:
    """outage true lasts until set false; in process a dropped request raises."""
    hub.update_knobs({"outage": True})
    async with session_for(hub) as session:
        with pytest.raises(httpx.RemoteProtocolError):
            await session.get("/files")
        hub.clock.advance(365 * 24 * 3600)
        with pytest.raises(httpx.RemoteProtocolError):
            await session.get("/renderocr/engines")
        hub.update_knobs({"outage": False})
        assert (await session.get("/files")).status_code == 200
    assert hub.ledger()["faults"]["outage"] == 2


# -- creates lost, paid once -----------------------------------------------------------------


@pytest.mark.anyio
async def test_lost_create_reply_made_the_job(hub: Hub) -> None:
    """lose_create_replies cuts the reply, yet the job exists, is billed and is marked."""
    hub.update_knobs({"lose_create_replies": 1})
    async with session_for(hub) as session:
        file_id = await upload(session, make_pdf(2))
        with pytest.raises(httpx.RemoteProtocolError):
            await session.post("/renderocr/jobs", json=job_request(file_id))
        listed = (await session.get("/renderocr/jobs")).json()["data"]
        again = await session.post("/renderocr/jobs", json=job_request(file_id))
    assert again.status_code == 202
    ledger = hub.ledger()
    assert [j["reply_lost"] for j in ledger["jobs"]] == [True, False]
    assert listed[0]["job_id"] == ledger["jobs"][0]["job_id"]
    assert paid_conversions(ledger) == 2
    assert pages_billed(ledger) == 4
    assert ledger["faults"]["lost_reply"] == 1
    assert hub.faults.lose_create_replies == 0


@pytest.mark.anyio
async def test_dropped_create_requests_make_no_job(hub: Hub) -> None:
    """drop_create_requests cuts the next N creates before any job exists."""
    hub.update_knobs({"drop_create_requests": 2})
    async with session_for(hub) as session:
        file_id = await upload(session, make_pdf())
        for _ in range(2):
            with pytest.raises(httpx.RemoteProtocolError):
                await session.post("/renderocr/jobs", json=job_request(file_id))
        made = await session.post("/renderocr/jobs", json=job_request(file_id))
    assert made.status_code == 202
    assert paid_conversions(hub.ledger()) == 1
    assert hub.ledger()["faults"]["dropped_create"] == 2


@pytest.mark.anyio
async def test_create_after_a_failure_is_dropped_for_that_file_only(hub: Hub) -> None:
    """drop_create_after_failure cuts the next create of a file whose job just failed."""
    hub.update_knobs({"drop_create_after_failure": 1, "job_failure_rate": 1.0})
    async with session_for(hub) as session:
        failing = await upload(session, make_pdf(), "failing.pdf")
        other = await upload(session, make_pdf(), "other.pdf")
        first = await session.post("/renderocr/jobs", json=job_request(failing))
        hub.clock.advance(PROCESSING + 1)
        assert (await job(session, first.json()["job_id"]))["status"] == "failed"
        hub.update_knobs({"job_failure_rate": 0.0})
        unrelated = await session.post("/renderocr/jobs", json=job_request(other))
        reuploaded = await upload(session, make_pdf(), "failing.pdf")
        with pytest.raises(httpx.RemoteProtocolError):
            await session.post("/renderocr/jobs", json=job_request(reuploaded))
        retried = await session.post("/renderocr/jobs", json=job_request(failing))
    assert (unrelated.status_code, retried.status_code) == (202, 202)
    ledger = hub.ledger()
    assert [j["filename"] for j in ledger["jobs"]] == ["failing.pdf", "other.pdf", "failing.pdf"]
    assert [j["outcome"] for j in ledger["jobs"]][:1] == ["failed"]
    assert ledger["faults"]["dropped_create"] == 1


@pytest.mark.anyio
async def test_ledger_bills_every_job_by_pages_and_outcome(hub: Hub) -> None:
    """Each job is one paid conversion of its input pages, failed or not."""
    async with session_for(hub) as session:
        await submit(session, make_pdf(3), "three.pdf")
        await submit(session, make_scan("png"), "one.png")
        hub.update_knobs({"job_failure_rate": 1.0})
        await submit(session, make_pdf(2), "three.pdf")
        pending = hub.ledger()
        hub.clock.advance(PROCESSING + 1)
    ledger = hub.ledger()
    assert [j["outcome"] for j in pending["jobs"]] == ["pending"] * 3
    assert [j["outcome"] for j in ledger["jobs"]] == ["completed", "completed", "failed"]
    assert [j["input_pages"] for j in ledger["jobs"]] == [3, 1, 2]
    assert paid_conversions(ledger) == 3
    assert pages_billed(ledger) == 6
    assert pages_billed(ledger, "three.pdf") == 5
    assert json.loads(json.dumps(ledger)) == ledger  # JSON-ready, as /_emulator/ledger sends
