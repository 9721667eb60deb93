"""The emulator over HTTP: a real EmulatorServer used through httpx, plus in-process ASGI."""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from daemon.emulator.app import STALL_EVENT, create_app, parse_wait
from daemon.emulator.cli import configure_parser
from daemon.emulator.hub import Faults, Hub, HubSettings, Knobs
from daemon.emulator.server import EmulatorServer
from tests.helpers import wait_for
from tests.scans import make_pdf

KEY = "good-key"
CAP = 50_000
PROBLEM_KEYS = {"type", "title", "status", "detail", "instance", "trace"}
BROKEN_PDF = b"%PDF-1.3\nThis is not a valid PDF file\n%%EOF\n"


@pytest.fixture(scope="module")
def server() -> Iterator[EmulatorServer]:
    settings = HubSettings(
        api_keys=(KEY,),
        revoked_keys=("old-key",),
        processing_time=0.3,
        max_upload_bytes=CAP,
        max_chunk_bytes=1000,
        seed=3,
    )
    with EmulatorServer(settings) as running:
        yield running


@pytest.fixture
def emulator(server: EmulatorServer) -> EmulatorServer:
    """The shared server with default knobs and keys and an empty ledger."""
    server.hub.update_faults(Faults().to_json())
    server.hub.set_keys([KEY], ["old-key"])
    server.hub.reset_ledger()
    return server


@pytest.fixture
def client(emulator: EmulatorServer) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=emulator.url, headers=headers, timeout=15) as session:
        yield session


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def upload(client: httpx.Client, data: bytes, name: str = "scan.pdf") -> dict[str, Any]:
    response = client.post("/files", files={"file": (name, data, "application/pdf")})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def job_body(file_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "file_id": file_id,
        "engine": "ki/ocr",
        "languages": ["jpn"],
        "output_format": "docx",
        **fields,
    }


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """Check a Zuplo-style problem+json answer and return its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert set(body) == PROBLEM_KEYS
    assert body["status"] == status
    assert body["type"] == f"https://httpproblems.com/http-status/{status}"
    assert body["instance"] == response.request.url.path
    assert set(body["trace"]) == {"timestamp", "requestId", "buildId"}
    return body


# -- auth ----------------------------------------------------------------------------------


def test_missing_or_unknown_key_gets_problem_401(emulator: EmulatorServer) -> None:
    """Authenticated routes answer 401 problem+json without a valid Bearer key."""
    with httpx.Client(base_url=emulator.url) as anonymous:
        missing = assert_problem(anonymous.get("/files"), 401)
        wrong = anonymous.get("/files", headers={"Authorization": "Bearer nope"})
        assert_problem(wrong, 401)
        assert_problem(anonymous.get("/files", headers={"Authorization": KEY}), 401)
    assert missing["title"] == "Unauthorized"
    assert missing["trace"]["timestamp"].endswith("Z")


def test_revoked_key_gets_problem_403(emulator: EmulatorServer) -> None:
    """A key listed as revoked answers 403."""
    with httpx.Client(base_url=emulator.url) as session:
        response = session.get("/renderocr/jobs", headers={"Authorization": "Bearer old-key"})
    assert "revoked" in assert_problem(response, 403)["detail"]


def test_engine_list_is_public(emulator: EmulatorServer) -> None:
    """GET /renderocr/engines needs no key and is counted in the ledger."""
    response = httpx.get(f"{emulator.url}/renderocr/engines")
    assert response.status_code == 200
    [engine] = response.json()["data"]
    assert engine["id"] == "ki/ocr"
    assert len(engine["supported_conversions"]) == 15
    assert {"Auto", "jpn", "eng"} <= {lang["code"] for lang in engine["supported_languages"]}
    assert emulator.hub.ledger()["requests"] == {"GET /renderocr/engines": 1}


# -- the main flow -------------------------------------------------------------------------


def test_upload_job_long_poll_download_round_trip(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    """Upload 201, job 202 queued, ?wait returns on completion, download the docx."""
    data = make_pdf(2)
    info = upload(client, data, name="Rechnung März.pdf")
    assert info["size"] == len(data)
    assert info["filename"] == "Rechnung März.pdf"
    created = client.post("/renderocr/jobs", json=job_body(info["file_id"]))
    assert created.status_code == 202
    job = created.json()
    assert (job["status"], job["progress"], job["completed_at"]) == ("queued", 0.0, None)
    assert "output_file_id" not in job
    assert "error" not in job

    started = time.monotonic()
    done = client.get(f"/renderocr/jobs/{job['job_id']}", params={"wait": 10}).json()
    assert time.monotonic() - started < 5  # back at completion, not after the full wait
    assert (done["status"], done["progress"]) == ("completed", 1.0)

    response = client.get(f"/files/{done['output_file_id']}/content")
    assert response.status_code == 200
    assert response.headers["content-type"].endswith("wordprocessingml.document")
    assert response.headers["content-length"] == str(len(response.content))
    assert "filename*=UTF-8''Rechnung%20M%C3%A4rz.docx" in response.headers["content-disposition"]
    assert response.headers["content-disposition"].startswith("attachment;")
    assert zipfile.ZipFile(BytesIO(response.content)).testzip() is None

    ledger = emulator.hub.ledger()
    assert ledger["requests"] == {
        "POST /files": 1,
        "POST /renderocr/jobs": 1,
        "GET /renderocr/jobs/{job_id}": 1,
        "GET /files/{file_id}/content": 1,
    }
    [received] = ledger["uploads"]
    assert received["sha256"] == hashlib.sha256(data).hexdigest()
    assert received["content_type"] == "application/pdf"
    assert ledger["jobs"][0]["languages"] == ["jpn"]
    assert ledger["downloads"] == [
        {"file_id": done["output_file_id"], "size": len(response.content), "status": 200}
    ]


def test_file_and_job_lists(client: httpx.Client) -> None:
    """GET /files and GET /renderocr/jobs wrap lists in data, newest first."""
    first = upload(client, make_pdf(), "a.pdf")
    second = upload(client, make_pdf(), "b.pdf")
    jobs = [client.post("/renderocr/jobs", json=job_body(f["file_id"])) for f in (first, second)]
    listed = client.get("/renderocr/jobs").json()["data"]
    assert [j["job_id"] for j in listed[:2]] == [j.json()["job_id"] for j in reversed(jobs)]
    files = client.get("/files").json()["data"]
    assert [f["file_id"] for f in files[:2]] == [second["file_id"], first["file_id"]]
    assert client.get(f"/files/{first['file_id']}").json() == first


def test_unsupported_and_broken_files_fail_after_202(client: httpx.Client) -> None:
    """Content problems are job failures (not HTTP errors), with a JobError."""
    for data, code in ((b"PK\x03\x04zipzip", "unsupported_format"), (BROKEN_PDF, "invalid_input")):
        file_id = upload(client, data)["file_id"]
        created = client.post("/renderocr/jobs", json=job_body(file_id))
        assert created.status_code == 202
        failed = client.get(f"/renderocr/jobs/{created.json()['job_id']}?wait=5").json()
        assert failed["status"] == "failed"
        assert set(failed["error"]) == {"code", "message", "request_id"}
        assert failed["error"]["code"] == code


def test_job_validation_errors_are_400_in_backend_style(client: httpx.Client) -> None:
    """Bad engine, language, format or file_id answer 400 {code, message, request_id}."""
    file_id = upload(client, make_pdf())["file_id"]
    cases = [
        (job_body(file_id, engine="x/y"), "invalid_engine"),
        (job_body(file_id, languages=["klingon"]), "invalid_language"),
        (job_body(file_id, output_format="odt"), "invalid_output_format"),
        (job_body("0" * 32), "invalid_file_id"),
    ]
    for body, code in cases:
        response = client.post("/renderocr/jobs", json=body)
        assert response.status_code == 400
        assert response.headers["content-type"] == "application/json"
        assert set(response.json()) == {"code", "message", "request_id"}
        assert response.json()["code"] == code
    garbled = client.post(
        "/renderocr/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert garbled.json()["code"] == "invalid_request"
    assert client.get("/renderocr/jobs/" + "0" * 32).status_code == 404


def test_upload_sessions_append_base64_chunks(client: httpx.Client) -> None:
    """POST /uploads then PUT base64 chunks; size grows; bad or big chunks are refused."""
    created = client.post("/uploads", json={"filename": "chunked.pdf"})
    assert created.status_code == 201
    assert created.json()["size"] == 0
    file_id = created.json()["file_id"]
    data = make_pdf()
    for start in range(0, len(data), 400):
        piece = base64.b64encode(data[start : start + 400]).decode()
        response = client.put(f"/uploads/{file_id}", json={"data": piece})
        assert response.status_code == 200
    assert client.get(f"/files/{file_id}").json()["size"] == len(data)
    assert (
        client.put(f"/uploads/{file_id}", json={"data": "!!"}).json()["code"] == "invalid_request"
    )
    too_big = client.put(
        f"/uploads/{file_id}", json={"data": base64.b64encode(b"x" * 1001).decode()}
    )
    assert_problem(too_big, 413)
    job = client.post("/renderocr/jobs", json=job_body(file_id)).json()
    assert client.get(f"/renderocr/jobs/{job['job_id']}?wait=5").json()["status"] == "completed"


# -- downloads -----------------------------------------------------------------------------


def test_range_requests_get_206(client: httpx.Client) -> None:
    """A Range header gets 206 with Content-Range; one past the end gets 416."""
    data = bytes(range(256)) * 4
    file_id = upload(client, data)["file_id"]
    url = f"/files/{file_id}/content"
    part = client.get(url, headers={"Range": "bytes=2-5"})
    assert part.status_code == 206
    assert part.content == data[2:6]
    assert part.headers["content-range"] == f"bytes 2-5/{len(data)}"
    assert client.get(url, headers={"Range": "bytes=-3"}).content == data[-3:]
    assert client.get(url, headers={"Range": "bytes=1000-"}).content == data[1000:]
    beyond = client.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(data)}"
    assert client.get(url, headers={"Range": "lines=1-2"}).content == data


def test_download_404s_after_expiry(emulator: EmulatorServer, client: httpx.Client) -> None:
    """Advancing the clock past 24 h makes the file 404 with a JSON body."""
    file_id = upload(client, make_pdf())["file_id"]
    assert client.get(f"/files/{file_id}/content").status_code == 200
    advanced = httpx.post(f"{emulator.url}/_emulator/clock", json={"advance": 24 * 3600 + 1})
    assert advanced.status_code == 200
    gone = client.get(f"/files/{file_id}/content")
    assert gone.status_code == 404
    assert gone.json()["code"] == "file_not_found"
    assert client.get(f"/files/{file_id}").status_code == 404
    assert emulator.hub.ledger()["downloads"][-1] == {"file_id": file_id, "size": 0, "status": 404}


def test_uploads_over_the_cap_get_413(emulator: EmulatorServer, client: httpx.Client) -> None:
    """Over max_upload_bytes: 413 problem+json, whether seen while streaming or up front."""
    before = len(client.get("/files").json()["data"])
    streamed = client.post("/files", files={"file": ("big.pdf", b"%PDF" + b"x" * CAP)})
    declared = client.post("/files", files={"file": ("huge.pdf", b"%PDF" + b"x" * 4 * CAP)})
    assert_problem(streamed, 413)
    assert_problem(declared, 413)
    assert len(client.get("/files").json()["data"]) == before
    assert emulator.hub.ledger()["uploads"] == []
    assert len(list(emulator.hub.data_dir.iterdir())) == before
    assert upload(client, b"%PDF" + b"x" * (CAP - 4))["size"] == CAP


def test_stalled_download_sends_half_then_hangs(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    """A stalled download sends half the body, then nothing until the client gives up."""
    # The ledger tells when the client gave up.
    data = b"%PDF" + bytes(39_996)
    url = f"/files/{upload(client, data)['file_id']}/content"
    client.post("/_emulator/faults", json={"stall_downloads": 1})
    received = bytearray()

    def read_until_the_client_gives_up() -> None:
        with client.stream("GET", url, timeout=httpx.Timeout(15, read=0.5)) as response:
            assert response.headers["content-length"] == str(len(data))
            for chunk in response.iter_raw():
                received.extend(chunk)

    asked = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        read_until_the_client_gives_up()
    assert len(received) == len(data) // 2
    ends = wait_for(
        lambda: [e for e in emulator.hub.ledger()["events"] if e["route"] == STALL_EVENT],
        10,
        "the stall's end in the ledger",
    )
    assert len(ends) == 1
    assert (ends[0]["status"], ends[0]["path"], ends[0]["length"]) == (
        "client gave up",
        url,
        len(data),
    )
    # The client's 0.5 s read timeout starts at the half body, after ``held_from``.
    assert asked <= ends[0]["held_from"] <= ends[0]["at"] - 0.5
    assert client.get(url).content == data  # the next download is whole again
    assert emulator.hub.ledger()["faults"]["stall"] == 1


# -- faults --------------------------------------------------------------------------------


def test_injected_and_real_429_carry_retry_after(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    """rate_limit_rate answers 429 + Retry-After; so does the per-key /files limit."""
    emulator.hub.update_faults({"rate_limit_rate": 1.0, "retry_after": 7})
    limited = client.get("/renderocr/jobs")
    assert assert_problem(limited, 429)["title"] == "Too Many Requests"
    assert limited.headers["retry-after"] == "7"
    assert httpx.get(f"{emulator.url}/renderocr/engines").status_code == 200  # public
    emulator.hub.update_faults({"rate_limit_rate": 0.0, "files_rate_limit": 2})
    assert [client.get("/files").status_code for _ in range(2)] == [200, 200]
    throttled = client.get("/files")
    assert_problem(throttled, 429)
    assert 1 <= int(throttled.headers["retry-after"]) <= 60
    assert client.get("/renderocr/jobs").status_code == 200  # only /files is limited
    assert (
        emulator.hub.ledger()["faults"] | {"rate_limit": 1, "throttle": 1}
        == (emulator.hub.ledger()["faults"])
    )


def test_injected_errors_are_5xx_problems(emulator: EmulatorServer, client: httpx.Client) -> None:
    """error_rate answers 500, 502 or 503 problem+json."""
    emulator.hub.update_faults({"error_rate": 1.0})
    statuses = set()
    for _ in range(20):
        response = client.get("/files")
        assert_problem(response, response.status_code)
        statuses.add(response.status_code)
    assert statuses <= {500, 502, 503}
    assert len(statuses) > 1
    assert emulator.hub.ledger()["faults"]["error"] == 20


def test_dropped_connection_is_a_transport_error(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    """drop_rate cuts the connection without a response; the server carries on."""
    emulator.hub.update_faults({"drop_rate": 1.0})
    with pytest.raises(httpx.TransportError):
        client.get("/files")
    with pytest.raises(httpx.TransportError):
        client.post("/files", files={"file": ("a.pdf", make_pdf())})
    emulator.hub.update_faults({"drop_rate": 0.0})
    assert client.get("/files").status_code == 200
    assert emulator.hub.ledger()["faults"]["drop"] == 2


def test_latency_delays_authenticated_routes_only(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    """latency is added to API responses, not to public or admin routes."""
    emulator.hub.update_faults({"latency": 0.4})
    started = time.monotonic()
    client.get("/files")
    assert time.monotonic() - started >= 0.4
    started = time.monotonic()
    client.get("/renderocr/engines")
    client.get("/_emulator/ledger")
    assert time.monotonic() - started < 0.4


# -- admin and routing ---------------------------------------------------------------------


def test_admin_endpoints(emulator: EmulatorServer) -> None:
    """Faults, clock, keys and ledger are managed over /_emulator without a key."""
    with httpx.Client(base_url=emulator.url) as admin:
        knobs = admin.post("/_emulator/faults", json={"error_rate": 0.25, "latency": 0})
        assert knobs.status_code == 200
        assert knobs.json() == {**Knobs().to_json(), "error_rate": 0.25}
        refused = admin.post("/_emulator/faults", json={"error_rate": 3})
        assert refused.status_code == 400
        assert refused.json()["code"] == "invalid_request"
        admin.post("/_emulator/faults", json={"error_rate": 0})

        offset = emulator.hub.clock.offset
        moved = admin.post("/_emulator/clock", json={"advance": 30}).json()
        assert moved["offset"] == pytest.approx(offset + 30)
        assert admin.post("/_emulator/clock", json={"advance": -1}).status_code == 400

        keys = admin.post("/_emulator/keys", json={"api_keys": ["fresh"], "revoked": [KEY]})
        assert keys.json() == {"api_keys": ["fresh"], "revoked": [KEY]}
        assert admin.get("/files", headers={"Authorization": "Bearer fresh"}).status_code == 200
        assert admin.get("/files", headers={"Authorization": f"Bearer {KEY}"}).status_code == 403

        ledger = admin.get("/_emulator/ledger").json()
        assert set(ledger) == {
            "requests",
            "refused",
            "uploads",
            "jobs",
            "downloads",
            "events",
            "faults",
            "storage_saw_authorization",
        }
        assert ledger["requests"] == {"GET /files": 2}  # admin calls are not counted
        emptied = admin.post("/_emulator/reset-ledger").json()
        assert emptied["requests"] == {}
        assert emptied["faults"]["error"] == 0


def test_unknown_routes_and_methods_are_problems(client: httpx.Client) -> None:
    """Unmatched paths answer 404 and wrong methods 405, as problem+json."""
    assert_problem(client.get("/castdoc/nothing"), 404)
    assert_problem(client.delete("/files"), 405)


# -- long polls ----------------------------------------------------------------------------


def test_parse_wait_clips_to_one_to_ten_seconds() -> None:
    """?wait=N is clipped to 1..10; absent, zero, negative or invalid means no wait."""
    assert [parse_wait(v) for v in (None, "", "0", "-3", "abc", "nan")] == [0.0] * 6
    assert [parse_wait(v) for v in ("0.2", "1", "2.5", "10", "1000", "inf")] == [
        1.0,
        1.0,
        2.5,
        10.0,
        10.0,
        10.0,
    ]


async def raw_get(port: int, path: str) -> bytes:
    """One GET over its own connection. httpx's pool is too slow at hundreds of
    connections in one process to show the server's speed, so this speaks HTTP/1.1."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: emulator\r\nAuthorization: Bearer {KEY}\r\n"
    writer.write(f"{request}Connection: close\r\n\r\n".encode())
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer


def test_hundreds_of_concurrent_long_polls(emulator: EmulatorServer, client: httpx.Client) -> None:
    """300 clients long-polling one job are all answered promptly when it completes."""
    file_id = upload(client, make_pdf())["file_id"]
    job_id = client.post("/renderocr/jobs", json=job_body(file_id)).json()["job_id"]
    port = int(emulator.url.rsplit(":", 1)[1])

    async def poll_all() -> list[bytes]:
        path = f"/renderocr/jobs/{job_id}?wait=10"
        return await asyncio.gather(*(raw_get(port, path) for _ in range(300)))

    started = time.monotonic()
    answers = asyncio.run(poll_all())
    assert time.monotonic() - started < 5
    assert all(a.startswith(b"HTTP/1.1 200") and b'"status":"completed"' in a for a in answers)
    assert emulator.hub.ledger()["requests"]["GET /renderocr/jobs/{job_id}"] == 300


# -- in process ----------------------------------------------------------------------------


@pytest.fixture
def slow_hub(tmp_path: Path) -> Hub:
    """A hub whose jobs take an hour, so only a clock advance finishes them."""
    return Hub(tmp_path, HubSettings(processing_time=3600, seed=1))


def in_process(hub: Hub) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(hub)),
        base_url="http://emulator",
        headers={"Authorization": "Bearer demo-key"},
    )


@pytest.mark.anyio
async def test_in_process_round_trip_with_asgi_transport(slow_hub: Hub) -> None:
    """create_app works with httpx.ASGITransport for fast tests without a server."""
    async with in_process(slow_hub) as session:
        sent = await session.post("/files", files={"file": ("p.pdf", make_pdf())})
        assert sent.status_code == 201
        created = await session.post("/renderocr/jobs", json=job_body(sent.json()["file_id"]))
        slow_hub.clock.advance(3600)
        done = (await session.get(f"/renderocr/jobs/{created.json()['job_id']}")).json()
        assert done["status"] == "completed"
        output = await session.get(f"/files/{done['output_file_id']}/content")
        assert output.status_code == 200
        assert output.content.startswith(b"PK")


@pytest.mark.anyio
async def test_long_poll_wakes_on_clock_advance_and_waits_at_least_a_second(
    slow_hub: Hub,
) -> None:
    """?wait returns soon after the clock passes the job's end; tiny waits become 1 s."""
    async with in_process(slow_hub) as session:
        sent = await session.post("/files", files={"file": ("p.pdf", make_pdf())})
        created = await session.post("/renderocr/jobs", json=job_body(sent.json()["file_id"]))
        url = f"/renderocr/jobs/{created.json()['job_id']}"

        started = anyio.current_time()
        assert (await session.get(url, params={"wait": "0.01"})).json()["status"] == "processing"
        assert anyio.current_time() - started >= 1.0
        started = anyio.current_time()
        await session.get(url, params={"wait": "0"})
        await session.get(url, params={"wait": "soon"})
        assert anyio.current_time() - started < 0.5

        statuses: list[str] = []

        async def poll() -> None:
            statuses.append((await session.get(url, params={"wait": 10})).json()["status"])

        started = anyio.current_time()
        async with anyio.create_task_group() as group:
            group.start_soon(poll)
            with anyio.fail_after(5):  # wait for the poll to arrive
                while slow_hub.ledger()["requests"]["GET /renderocr/jobs/{job_id}"] < 4:
                    await anyio.sleep(0.01)
            slow_hub.clock.advance(3600)
        assert statuses == ["completed"]
        assert anyio.current_time() - started < 3


@pytest.mark.anyio
async def test_in_process_drop_and_stall_raise_what_a_client_would_see(slow_hub: Hub) -> None:
    """Without a socket, a drop is RemoteProtocolError and a stall a ReadTimeout."""
    async with in_process(slow_hub) as session:
        file_id = (await session.post("/files", files={"file": ("p.pdf", make_pdf())})).json()[
            "file_id"
        ]
        slow_hub.update_faults({"drop_rate": 1.0})
        with pytest.raises(httpx.RemoteProtocolError):
            await session.get("/files")
        slow_hub.update_faults({"drop_rate": 0.0, "stall_downloads": 1})
        with pytest.raises(httpx.ReadTimeout):
            await session.get(f"/files/{file_id}/content")


# -- server and command line ---------------------------------------------------------------


def test_server_binds_port_zero_and_stops_cleanly() -> None:
    """EmulatorServer picks a free port, serves, and after stop() refuses connections."""
    server = EmulatorServer(HubSettings(processing_time=1))
    with server:
        url = server.url
        assert not url.endswith(":0")
        assert httpx.get(f"{url}/renderocr/engines").status_code == 200
        data_dir = server.hub.data_dir
    assert not data_dir.exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/renderocr/engines")
    server.stop()  # idempotent


def test_cli_parser_defaults_and_ranges() -> None:
    """The emulator's options default as documented and accept '3' or '3-8'."""
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    defaults = parser.parse_args([])
    assert (defaults.host, defaults.port, defaults.api_keys) == ("127.0.0.1", 8787, None)
    assert defaults.processing_time == 3.0
    assert defaults.data_dir is None
    parsed = parser.parse_args(["--processing-time", "3-8", "--api-key", "a", "--api-key", "b"])
    assert parsed.processing_time == (3.0, 8.0)
    assert parsed.api_keys == ["a", "b"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--error-rate", "2"])


def test_cli_run_announces_serves_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """``ldx-hotfolder emulator`` prints URL and key, serves the API, exits 0 on SIGINT."""
    # It also notes that it does not read a -c file.
    unused = tmp_path / "config.toml"
    command = [sys.executable, "-m", "daemon", "emulator", "-c", str(unused)]
    command += ["--port", "0", "--api-key", "k1", "--data-dir", str(tmp_path)]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        line = process.stdout.readline().strip()
        assert line.startswith("LDX hub emulator on http://127.0.0.1:")
        assert line.endswith("(API key: k1)")
        url = line.split()[4]
        headers = {"Authorization": "Bearer k1"}
        assert wait_for(lambda: httpx.get(f"{url}/files", headers=headers).status_code == 200)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=15) == 0
        assert f"note: emulator does not read {unused}" in process.stderr.read()


def test_events_record_trace_header_and_answer(emulator: EmulatorServer) -> None:
    """Each authenticated request is logged with its trace header, status and Retry-After."""
    emulator.hub.update_faults({"rate_limit_rate": 1.0, "retry_after": 2.5})
    headers = {"Authorization": f"Bearer {KEY}", "X-Ldx-Hotfolder-Job": "42"}
    response = httpx.get(f"{emulator.url}/files", headers=headers)
    assert response.status_code == 429
    event = emulator.hub.ledger()["events"][-1]
    assert event["route"] == "GET /files"
    assert event["trace"] == "42"
    assert event["status"] == 429
    assert event["retry_after"] == 2.5
