"""The hub client: request shapes, tolerant parsing, and one place of error translation."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.emulator.app import create_app
from daemon.emulator.hub import DEFAULT_API_KEY, Hub, HubSettings
from daemon.errors import AuthRejected, HubBusy, HubUnavailable, JobFailed, RemoteNotFound
from daemon.hub.client import HubClient, error_detail, retry_after_seconds
from daemon.hub.gate import Gate
from daemon.hub.models import JobState, RemoteJob
from tests.scans import make_scan

BASE = "http://hub.test"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def mock_client(handler: Callable[[httpx.Request], httpx.Response]) -> HubClient:
    return HubClient.connect(BASE, "k", transport=httpx.MockTransport(handler))


def test_round_trip_through_emulator_app(tmp_path: Path) -> None:
    """Upload, create, long-poll and download against the emulator's ASGI app in-process."""
    hub = Hub(tmp_path / "hub", HubSettings(processing_time=0.0))
    transport = httpx.ASGITransport(app=create_app(hub))

    async def scenario() -> tuple[str, int]:
        async with HubClient.connect(BASE, DEFAULT_API_KEY, transport=transport) as client:
            scan = make_scan("png")
            info = await client.upload(io.BytesIO(scan), "a.png", "image/png", len(scan))
            job = await client.create_job(info.file_id, "ki/ocr", "jpn", "pptx")
            assert job.status in ("queued", "processing", "completed")
            done = await client.get_job(job.job_id, wait=5)
            assert done.output_file_id is not None
            with (tmp_path / "out.pptx").open("wb") as sink:
                size = await client.download(done.output_file_id, sink, 10**8)
            listed = await client.list_jobs()
            assert [j.job_id for j in listed] == [job.job_id]
            return done.status, size

    status, size = run(scenario())
    assert status == "completed"
    assert (tmp_path / "out.pptx").stat().st_size == size > 0
    sent = hub.ledger()["jobs"][0]
    assert sent["languages"] == ["jpn"]
    assert sent["output_format"] == "pptx"


def test_models_tolerate_200_unknown_and_missing_fields() -> None:
    """A 200 instead of 201, extra fields and absent optional fields all parse."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"file_id": "f" * 32, "brand_new": {"x": 1}})

    info = run(_upload(mock_client(handler)))
    assert info.file_id == "f" * 32
    assert info.size is None


async def _upload(client: HubClient) -> Any:
    async with client:
        return await client.upload(io.BytesIO(b"%PDF-1.4"), "x.pdf", "application/pdf", 8)


def _status(code: int, headers: dict[str, str] | None = None, body: Any = None) -> HubClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(code, headers=headers, json=body if body is not None else {})

    return mock_client(handler)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (401, AuthRejected),
        (403, AuthRejected),
        (429, HubBusy),
        (500, HubUnavailable),
        (503, HubUnavailable),
        (400, JobFailed),
        (422, JobFailed),
        (404, RemoteNotFound),
    ],
)
def test_http_statuses_map_to_duties(code: int, kind: type[Exception]) -> None:
    """Each status lands in the branch that says what the caller must do."""
    with pytest.raises(kind):
        run(_upload(_status(code)))


def test_429_carries_retry_after() -> None:
    """Retry-After in seconds reaches the caller as a float."""
    with pytest.raises(HubBusy) as info:
        run(_upload(_status(429, {"Retry-After": "7"})))
    assert info.value.retry_after == 7.0


def test_retry_after_http_date() -> None:
    """Retry-After as an HTTP date is turned into seconds from now."""
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0) == 10.0
    assert retry_after_seconds("1.5", 0.0) == 1.5
    assert retry_after_seconds("soon", 0.0) is None


def test_error_bodies_of_both_styles_are_read() -> None:
    """problem+json, {code,message} and plain text bodies all give a message."""
    problem = json.dumps({"title": "Unauthorized", "detail": "bad key"}).encode()
    backend = json.dumps({"code": "invalid_file", "message": "no such file"}).encode()
    assert error_detail(problem, "application/problem+json") == (None, "bad key")
    assert error_detail(backend, "application/json") == ("invalid_file", "no such file")
    assert error_detail(b"<html>Bad Gateway</html>", "text/html")[1] == "Bad Gateway"


def test_network_errors_are_transient() -> None:
    """A refused connection or a timeout is HubUnavailable, never a crash."""

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    for handler in (refused, slow):
        with pytest.raises(HubUnavailable):
            run(_upload(mock_client(handler)))


def test_garbage_success_body_is_transient() -> None:
    """A 2xx body that is not the expected JSON is retried, not trusted."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>proxy login</html>")

    with pytest.raises(HubUnavailable, match="not JSON"):
        run(_upload(mock_client(handler)))


@pytest.mark.parametrize("body", [[], {"data": "x"}, {"job_id": "j1"}, "ok"])
def test_success_body_of_the_wrong_shape_is_transient(body: object) -> None:
    """Valid JSON of the wrong shape (a list, a field missing) is a retried bad_response."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(201, json=body)

    async def create_and_list() -> None:
        client = mock_client(handler)
        with pytest.raises(HubUnavailable) as created:
            await client.create_job("f1", "ki/ocr", "jpn", "docx")
        assert created.value.code == "bad_response"
        if body != []:  # a bare list is a listing too (a gateway may drop the wrapper)
            with pytest.raises(HubUnavailable, match="unreadable"):
                await client.list_jobs()

    run(create_and_list())


def test_short_download_is_detected(tmp_path: Path) -> None:
    """Fewer bytes than Content-Length is a transient fault, not a finished file."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Length": "100"}, content=b"x" * 40)

    async def scenario() -> None:
        async with mock_client(handler) as client:
            await client.download("f" * 32, io.BytesIO(), 10**6)

    with pytest.raises(HubUnavailable):
        run(scenario())


def test_requests_carry_bearer_key_except_engines() -> None:
    """Authenticated calls send the Bearer key; the public engines call does not."""
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("authorization")))
        if request.url.path == "/renderocr/engines":
            return httpx.Response(200, json={"data": []})
        return httpx.Response(200, json={"data": []})

    async def scenario() -> None:
        async with mock_client(handler) as client:
            await client.engines()
            await client.list_files()

    run(scenario())
    assert seen == [("/renderocr/engines", None), ("/files", "Bearer k")]


def test_create_job_body_shape() -> None:
    """The job request is JSON with file_id, engine, one language and the format."""
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(202, json={"job_id": "j" * 32, "status": "queued"})

    async def scenario() -> None:
        async with mock_client(handler) as client:
            await client.create_job("f" * 32, "ki/ocr", "eng", "xlsx")

    run(scenario())
    assert bodies == [
        {"file_id": "f" * 32, "engine": "ki/ocr", "languages": ["eng"], "output_format": "xlsx"}
    ]


def test_an_unreadable_creation_answer_counts_as_maybe_created() -> None:
    """A 2xx to POST /renderocr/jobs that cannot be read: the job may exist (paid), so the
    caller must look for it rather than create another."""
    for answer in (httpx.Response(202, text="<html>ok</html>"), httpx.Response(202, json={})):
        client = mock_client(lambda request, answer=answer: answer)
        with pytest.raises(HubUnavailable) as info:
            run(client.create_job("f" * 32, "ki/ocr", "jpn", "docx"))
        assert info.value.code == "bad_response"
        assert info.value.maybe_done


def test_an_engine_list_behind_the_key_is_asked_again_with_it() -> None:
    """A gateway answering 401 to the public engine list gets the key; the gate stays open."""
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        if request.headers.get("authorization") is None:
            return httpx.Response(401, json={"title": "Unauthorized", "detail": "no key"})
        return httpx.Response(200, json={"data": [{"id": "ki/ocr"}]})

    gate = Gate()
    client = HubClient(
        httpx.AsyncClient(base_url=BASE, transport=httpx.MockTransport(handler)), "k", gate=gate
    )
    engines = run(client.engines())
    assert [engine.id for engine in engines] == ["ki/ocr"]
    assert seen == [None, "Bearer k"]
    assert gate.closure is None


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        ("invalid_input: The PDF file is damaged.", "invalid_input", "The PDF file is damaged."),
        ("The PDF file is damaged.", "unknown", "The PDF file is damaged."),
        ({"code": "x_y", "message": "m"}, "x_y", "m"),
    ],
)
def test_a_failed_jobs_error_as_object_or_string(error: object, code: str, message: str) -> None:
    """``error`` as an object, as "code: message" or as a bare message: code and message kept."""
    job = RemoteJob.model_validate({"job_id": "j", "status": "FAILED", "error": error})
    assert job.state is JobState.FAILED
    assert job.error is not None
    assert (job.error.code, job.error.message) == (code, message)


def test_nested_error_bodies_give_code_and_message() -> None:
    """``{"error": {code, message}}`` shows both, not only "HTTP 400 Bad Request"."""
    nested = json.dumps({"error": {"code": "invalid_language", "message": "no fra"}}).encode()
    assert error_detail(nested, "application/json") == ("invalid_language", "no fra")
    flat = json.dumps({"error": "quota exceeded"}).encode()
    assert error_detail(flat, "application/json") == (None, "quota exceeded")
