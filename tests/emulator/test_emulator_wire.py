"""Knobs that need a real socket: cut connections, endless, trickling and overlong bodies,
redirects to another host name, the Date header, and bombs as they cross the wire."""

from __future__ import annotations

import socket
import threading
import time
import zipfile
import zlib
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from io import BytesIO
from typing import Any

import httpx
import pytest

from daemon.emulator.app import TRICKLE_LENGTH
from daemon.emulator.hub import DEFAULT_API_KEY, HubSettings, paid_conversions
from daemon.emulator.server import EmulatorServer
from tests.helpers import wait_for
from tests.scans import make_pdf

AUTH = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}


@pytest.fixture(scope="module")
def server() -> Iterator[EmulatorServer]:
    with EmulatorServer(HubSettings(processing_time=1.0, seed=2)) as running:
        yield running


@pytest.fixture
def emulator(server: EmulatorServer) -> EmulatorServer:
    """The shared server with its build knobs and an empty ledger."""
    server.hub.reset_knobs()
    server.hub.reset_ledger()
    return server


@pytest.fixture
def client(emulator: EmulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emulator.url, headers=AUTH, timeout=15) as session:
        yield session


def upload(client: httpx.Client, data: bytes, name: str = "scan.pdf") -> str:
    response = client.post("/files", files={"file": (name, data, "application/pdf")})
    assert response.status_code == 201, response.text
    file_id: str = response.json()["file_id"]
    return file_id


def job_request(file_id: str) -> dict[str, Any]:
    return {"file_id": file_id, "engine": "ki/ocr", "languages": ["jpn"], "output_format": "docx"}


def output_of(emulator: EmulatorServer, client: httpx.Client) -> str:
    """The output file id of a fresh job, run to its end on the hub clock."""
    job_id = client.post("/renderocr/jobs", json=job_request(upload(client, make_pdf()))).json()
    emulator.hub.clock.advance(2)
    done = client.get(f"/renderocr/jobs/{job_id['job_id']}").json()
    assert done["status"] == "completed", done
    output: str = done["output_file_id"]
    return output


# -- cut connections -------------------------------------------------------------------------


def test_lost_create_reply_cuts_the_socket_after_the_job_exists(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    """lose_create_replies: the client sees a cut connection; the hub made and billed the job."""
    file_id = upload(client, make_pdf())
    emulator.hub.update_knobs({"lose_create_replies": 1})
    with pytest.raises(httpx.TransportError):
        client.post("/renderocr/jobs", json=job_request(file_id))
    [made] = emulator.hub.ledger()["jobs"]
    assert made["reply_lost"] is True
    assert client.get(f"/renderocr/jobs/{made['job_id']}").status_code == 200
    assert client.post("/renderocr/jobs", json=job_request(file_id)).status_code == 202
    assert paid_conversions(emulator.hub.ledger()) == 2


def test_dropped_create_cuts_the_socket_before_any_job(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    """drop_create_requests: a cut connection and no job at the hub."""
    file_id = upload(client, make_pdf())
    emulator.hub.update_knobs({"drop_create_requests": 1})
    with pytest.raises(httpx.TransportError):
        client.post("/renderocr/jobs", json=job_request(file_id))
    assert emulator.hub.ledger()["jobs"] == []
    assert client.post("/renderocr/jobs", json=job_request(file_id)).status_code == 202


def test_outage_drop_cuts_every_request_until_the_window_ends(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    """An outage in drop mode cuts authenticated and public requests, then ends on time."""
    emulator.hub.update_knobs({"outage": 600})
    with pytest.raises(httpx.TransportError):
        client.get("/files")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{emulator.url}/renderocr/engines")
    assert httpx.get(f"{emulator.url}/_emulator/ledger").status_code == 200  # admin stays up
    emulator.hub.clock.advance(600)
    assert client.get("/files").status_code == 200


# -- hostile bodies --------------------------------------------------------------------------


def test_endless_download_streams_past_any_size(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    """download_mode endless: no Content-Length and bytes well past the file, until we stop."""
    file_id = upload(client, make_pdf())
    emulator.hub.update_knobs({"download_mode": "endless"})
    received = 0
    with client.stream("GET", f"/files/{file_id}/content") as response:
        assert "content-length" not in response.headers
        for chunk in response.iter_raw():
            received += len(chunk)
            if received > 20 * 1024 * 1024:
                break
    assert received > 20 * 1024 * 1024
    assert client.get("/files").status_code == 200  # the server carries on
    assert emulator.hub.ledger()["downloads"][-1]["mode"] == "endless"


def test_trickle_declares_a_huge_length_and_sends_a_byte_per_interval(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    """download_mode trickle: Content-Length of a TiB, one byte every trickle_interval s."""
    data = make_pdf()
    file_id = upload(client, data)
    emulator.hub.update_knobs({"download_mode": "trickle", "trickle_interval": 0.2})
    pieces: list[bytes] = []
    started = time.monotonic()
    with client.stream("GET", f"/files/{file_id}/content") as response:
        assert response.headers["content-length"] == str(TRICKLE_LENGTH)
        for chunk in response.iter_raw():
            pieces.append(chunk)
            if sum(map(len, pieces)) >= 4:
                break
    elapsed = time.monotonic() - started
    assert b"".join(pieces)[:4] == data[:4]
    assert 0.55 <= elapsed < 5  # three intervals between four bytes
    with (
        pytest.raises(httpx.ReadTimeout),
        client.stream(
            "GET", f"/files/{file_id}/content", timeout=httpx.Timeout(15, read=0.1)
        ) as slow,
    ):
        for _ in slow.iter_raw():
            pass


def raw_get(url: str, path: str) -> tuple[bytes, bytes]:
    """GET over a plain socket, read until the server hangs up: (head, everything after)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {AUTH['Authorization']}"
        sock.sendall(f"{request}\r\n\r\n".encode())
        answer = bytearray()
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = bytes(answer).partition(b"\r\n\r\n")
    return head, body


def test_oversize_sends_more_than_its_content_length(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    """download_mode oversize: the socket carries oversize_bytes past the declared length."""
    data = make_pdf()
    file_id = upload(client, data)
    emulator.hub.update_knobs({"download_mode": "oversize", "oversize_bytes": 5000})
    head, body = raw_get(emulator.url, f"/files/{file_id}/content")
    assert f"content-length: {len(data)}".encode() in head.lower()
    assert len(body) == len(data) + 5000
    assert body[: len(data)] == data
    with httpx.Client(base_url=emulator.url, headers=AUTH) as fresh:
        assert fresh.get(f"/files/{file_id}/content").content == data  # h11 stops at the length
    assert client.get("/files").status_code == 200


def test_unsized_body_is_longer_than_the_file(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    """download_mode unsized: chunked, without a length, oversize_bytes longer than the file."""
    data = make_pdf()
    file_id = upload(client, data)
    emulator.hub.update_knobs({"download_mode": "unsized", "oversize_bytes": 1000})
    response = client.get(f"/files/{file_id}/content")
    assert "content-length" not in response.headers
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.content == data + bytes(1000)


def test_server_stop_ends_endless_bodies_promptly() -> None:
    """Stopping the server while it streams an endless body neither hangs nor waits long."""
    server = EmulatorServer(HubSettings(processing_time=1.0)).start()
    failures: list[BaseException] = []
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        file_id = upload(client, make_pdf())
        server.hub.update_knobs({"download_mode": "endless"})
        streaming = threading.Event()

        def read_for_ever() -> None:
            try:
                with client.stream("GET", f"/files/{file_id}/content") as response:
                    for _ in response.iter_raw():
                        streaming.set()
            except httpx.TransportError as exc:
                failures.append(exc)

        reader = threading.Thread(target=read_for_ever)
        reader.start()
        assert streaming.wait(10)
        started = time.monotonic()
        server.stop()
        reader.join(10)
    assert time.monotonic() - started < 8
    assert not reader.is_alive()
    assert failures  # the client saw its connection go


# -- redirects, dates, bombs -----------------------------------------------------------------


def test_redirect_goes_to_another_host_name_that_must_not_get_the_key(
    emulator: EmulatorServer, client: httpx.Client
) -> None:
    """download_redirect: 302 from 127.0.0.1 to localhost on the same port; the key stays home."""
    data = make_pdf()
    file_id = upload(client, data)
    emulator.hub.update_knobs({"download_redirect": True})
    redirect = client.get(f"/files/{file_id}/content")
    location = httpx.URL(redirect.headers["location"])
    followed = client.get(f"/files/{file_id}/content", follow_redirects=True)
    assert redirect.status_code == 302
    assert (location.host, location.port) == ("localhost", httpx.URL(emulator.url).port)
    assert followed.content == data
    assert emulator.hub.ledger()["storage_saw_authorization"] == 0  # httpx dropped it
    assert client.get(location).content == data  # a careless client sends it
    assert emulator.hub.ledger()["storage_saw_authorization"] == 1


def test_date_header_follows_timestamp_skew(emulator: EmulatorServer, client: httpx.Client) -> None:
    """timestamp_skew shifts the server's Date header (refreshed once a second)."""
    emulator.hub.update_knobs({"timestamp_skew": -3600})

    def skewed() -> bool:
        date = parsedate_to_datetime(client.get("/renderocr/engines").headers["date"])
        return abs(date.timestamp() - (time.time() - 3600)) < 5

    wait_for(skewed, 5, "a Date header an hour behind")
    emulator.hub.update_knobs({"timestamp_skew": 0})


def test_gzip_bomb_crosses_the_wire_small(emulator: EmulatorServer, client: httpx.Client) -> None:
    """download_gzip_bomb over a socket: the declared compressed length, inflating to N."""
    file_id = upload(client, make_pdf())
    emulator.hub.update_knobs({"download_gzip_bomb": True, "gzip_bomb_bytes": 256 * 1024**2})
    with client.stream("GET", f"/files/{file_id}/content") as response:
        wire = b"".join(response.iter_raw())
    assert int(response.headers["content-length"]) == len(wire) < 300_000
    inflater, total, rest = zlib.decompressobj(31), 0, wire
    while rest:
        total += len(inflater.decompress(rest, 16 * 1024 * 1024))
        rest = inflater.unconsumed_tail
    assert total == 256 * 1024**2


def test_zeros_output_bomb_downloads_small(emulator: EmulatorServer, client: httpx.Client) -> None:
    """An output bomb downloads as a few MB whose package declares 4 GiB inside."""
    emulator.hub.update_knobs({"output_bomb": "zeros"})
    response = client.get(f"/files/{output_of(emulator, client)}/content")
    assert int(response.headers["content-length"]) == len(response.content) < 5 * 1024**2
    with zipfile.ZipFile(BytesIO(response.content)) as package:
        assert max(info.file_size for info in package.infolist()) == 4 * 1024**3
