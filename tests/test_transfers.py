"""The transfer process: the hub client served from a child, its framing, and its deaths."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.emulator.hub import DEFAULT_API_KEY
from daemon.emulator.hub import HubSettings as EmulatorSettings
from daemon.emulator.server import EmulatorServer
from daemon.errors import AuthRejected, HubBusy, HubUnavailable, JobFailed
from daemon.hub.api import InputUpload, JobRun
from daemon.hub.client import HubClient, RemoteJob, RunEvent
from daemon.hub.transfer_child import ClientConfig, Frames, frame, portable
from daemon.hub.transfers import TransferProcess, answer_limit
from daemon.inbox.inputs import InputChanged, signature_of
from daemon.inbox.stability import Signature
from daemon.service import use_transfer_process
from tests.helpers import alive, wait_async, wait_for
from tests.scans import make_scan


def config_for(url: str, key: str = DEFAULT_API_KEY) -> ClientConfig:
    """Client settings for a test against the emulator at ``url``."""
    return ClientConfig(
        url, key, timeout=30.0, deadline=60.0, min_transfer_rate=1024.0, max_connections=8
    )


def upload_of(inbox: Path, name: str) -> InputUpload:
    """The request to upload ``inbox/name`` as it is now."""
    signature = signature_of((inbox / name).stat())
    return InputUpload(inbox, name, signature, False, name, "image/png")


@pytest.fixture
def slow_hub() -> Iterator[EmulatorServer]:
    """An emulator whose jobs take a minute, so that a long poll stays open."""
    with EmulatorServer(EmulatorSettings(processing_time=60.0, seed=3)) as server:
        yield server


async def long_poll_in_flight(
    proc: TransferProcess, hub: HubClient, inbox: Path
) -> tuple[RemoteJob, asyncio.Future[RemoteJob]]:
    """Upload ``inbox/a.png``, create its job, and leave its long poll open in the child."""
    sent = await hub.upload_input(upload_of(inbox, "a.png"))
    job = await hub.create_job(sent.file_id, "ki/ocr", "jpn", "docx")
    polling = asyncio.ensure_future(hub.get_job(job.job_id, wait=30))
    await wait_async(lambda: bool(proc._pending), 10, "the long poll to be sent")
    return job, polling


def test_round_trip_through_the_child(emulator: EmulatorServer, tmp_path: Path) -> None:
    """Upload, create, long-poll, list and download all work through the child process."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    data = make_scan("png", seed=4)
    (inbox / "a.png").write_bytes(data)

    async def scenario() -> tuple[int | None, int]:
        proc = TransferProcess(config_for(emulator.url))
        hub = HubClient.over(proc)
        try:
            sent = await hub.upload_input(upload_of(inbox, "a.png"))
            job = await hub.create_job(sent.file_id, "ki/ocr", "jpn", "docx")
            done = await hub.get_job(job.job_id, wait=10)
            assert done.status == "completed"
            assert done.output_file_id is not None
            size = await hub.download(done.output_file_id, tmp_path / "out.docx")
            assert [j.job_id for j in await hub.list_jobs()] == [job.job_id]
            assert sent.file_id in {f.file_id for f in await hub.list_files()}
            assert await hub.engines()
            assert sent.sha256 == hashlib.sha256(data).hexdigest()
            return proc.pid, size
        finally:
            await hub.aclose()

    pid, size = asyncio.run(scenario())
    assert pid is not None
    assert pid != os.getpid()
    assert (tmp_path / "out.docx").stat().st_size == size > 0
    wait_for(lambda: not alive(pid), 10, "the child to exit after aclose")


def test_errors_cross_with_their_class_and_fields(emulator: EmulatorServer, tmp_path: Path) -> None:
    """A refusal in the child arrives as the daemon's own exception class, code included."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.png").write_bytes(make_scan("png"))
    stale = upload_of(inbox, "a.png")
    (inbox / "a.png").write_bytes(make_scan("png", seed=9) + b"more")

    async def scenario() -> BaseException:
        proc = TransferProcess(config_for(emulator.url))
        hub = HubClient.over(proc)
        try:
            with pytest.raises(InputChanged) as caught:
                await hub.upload_input(stale)
            return caught.value
        finally:
            await hub.aclose()

    error = asyncio.run(scenario())
    assert isinstance(error, JobFailed)
    assert error.code == "input_changed"
    assert "a.png changed" in str(error)


def test_api_key_change_reaches_the_running_child(emulator: EmulatorServer) -> None:
    """A wrong key is rejected; ``set_api_key`` fixes the running child without a restart."""

    async def scenario() -> tuple[int | None, int | None]:
        proc = TransferProcess(config_for(emulator.url, key="wrong-key"))
        hub = HubClient.over(proc)
        try:
            with pytest.raises(AuthRejected):
                await hub.list_jobs()
            before = proc.pid
            hub.set_api_key(DEFAULT_API_KEY)
            assert await hub.list_jobs() == []
            return before, proc.pid
        finally:
            await hub.aclose()

    before, after = asyncio.run(scenario())
    assert before == after is not None


def test_killed_child_fails_calls_in_flight_and_is_replaced(
    slow_hub: EmulatorServer, tmp_path: Path
) -> None:
    """SIGKILL of the child mid-call fails that call as retryable; the next call respawns."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.png").write_bytes(make_scan("png"))

    async def scenario() -> tuple[int, int | None, HubUnavailable]:
        proc = TransferProcess(config_for(slow_hub.url))
        hub = HubClient.over(proc)
        try:
            job, polling = await long_poll_in_flight(proc, hub, inbox)
            first = proc.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            with pytest.raises(HubUnavailable) as caught:
                await asyncio.wait_for(polling, 20)
            again = await hub.get_job(job.job_id)
            assert again.job_id == job.job_id
            return first, proc.pid, caught.value
        finally:
            await hub.aclose()

    first, second, error = asyncio.run(scenario())
    assert error.code == "transfer_process"
    assert second is not None
    assert second != first


def test_cancelled_call_is_dropped_and_the_child_serves_on(
    slow_hub: EmulatorServer, tmp_path: Path
) -> None:
    """Cancelling a call in the daemon cancels it in the child; the same child goes on."""
    (tmp_path / "a.png").write_bytes(make_scan("png"))

    async def scenario() -> None:
        proc = TransferProcess(config_for(slow_hub.url))
        hub = HubClient.over(proc)
        try:
            _, polling = await long_poll_in_flight(proc, hub, tmp_path)
            pid = proc.pid
            polling.cancel()
            with pytest.raises(asyncio.CancelledError):
                await polling
            assert proc._pending == {}
            assert len(await asyncio.wait_for(hub.list_jobs(), 10)) == 1
            assert proc.pid == pid
        finally:
            await hub.aclose()

    asyncio.run(scenario())


def test_stopped_child_is_replaced_after_twice_its_deadline(emulator: EmulatorServer) -> None:
    """A child that stops answering (SIGSTOP) fails the call as retryable and is replaced."""
    config = ClientConfig(
        emulator.url,
        DEFAULT_API_KEY,
        timeout=1.0,
        deadline=1.0,
        min_transfer_rate=1024.0,
        max_connections=4,
    )

    async def scenario() -> tuple[int, HubUnavailable, float, int | None]:
        proc = TransferProcess(config)
        hub = HubClient.over(proc)
        try:
            assert await hub.list_jobs() == []
            first = proc.pid
            assert first is not None
            os.kill(first, signal.SIGSTOP)
            started = asyncio.get_running_loop().time()
            with pytest.raises(HubUnavailable) as caught:
                await hub.list_jobs()
            waited = asyncio.get_running_loop().time() - started
            await wait_async(lambda: proc.pid is None, 10, "the stuck child to be reaped")
            assert await hub.list_jobs() == []
            return first, caught.value, waited, proc.pid
        finally:
            await proc.aclose()

    first, error, waited, second = asyncio.run(scenario())
    assert error.code == "transfer_process"
    assert "did not answer list_jobs" in str(error)
    assert 1.5 <= waited < 10
    assert not alive(first)
    assert second is not None
    assert second != first


def test_answer_limit_is_twice_the_childs_own_deadline() -> None:
    """The daemon's wait for an answer covers the long poll and the upload's size."""
    config = config_for("http://hub.test")  # deadline 60 s, 1 KiB/s at least
    upload = InputUpload(Path("/in"), "a.pdf", Signature(10240, 0, 1), False, "a.pdf", "x")
    assert answer_limit(config, "list_jobs", ()) == 120.0
    assert answer_limit(config, "get_job", ("j1", 10)) == 140.0
    assert answer_limit(config, "upload_input", (upload,)) == 140.0
    assert answer_limit(config, "download", ("f1", Path("/out"))) is None


def test_answer_limit_of_each_step_of_a_run() -> None:
    """A run's steps wait as an upload first (or a poll), then a poll; the download, not at all."""
    config = config_for("http://hub.test")  # deadline 60 s, 1 KiB/s at least
    upload = InputUpload(Path("/in"), "a.png", Signature(1024 * 20, 1, 1), False, "a", "x")
    run = JobRun("ki/ocr", "jpn", "docx", 10, 2.0, Path("/out"))
    assert answer_limit(config, "upload_and_run", (upload, "0" * 64, run)) == 160.0
    assert answer_limit(config, "upload_and_run", (upload, "0" * 64, run), "uploaded") == 140.0
    assert answer_limit(config, "run_job", ("f1", run)) == 140.0
    assert answer_limit(config, "run_job", ("f1", run), "polled") == 140.0
    assert answer_limit(config, "run_job", ("f1", run), "download") is None


def test_closed_process_refuses_new_calls(emulator: EmulatorServer) -> None:
    """After ``aclose`` a call fails as retryable instead of starting another child."""

    async def scenario() -> HubUnavailable:
        proc = TransferProcess(config_for(emulator.url))
        hub = HubClient.over(proc)
        await hub.list_jobs()
        await hub.aclose()
        with pytest.raises(HubUnavailable) as caught:
            await hub.list_jobs()
        assert proc.pid is None
        return caught.value

    assert asyncio.run(scenario()).code == "stopping"


_ORPHAN = textwrap.dedent(
    """
    import asyncio, sys
    from daemon.hub.transfer_child import ClientConfig
    from daemon.hub.transfers import TransferProcess

    async def main():
        config = ClientConfig(sys.argv[1], "k", timeout=5.0, deadline=5.0,
                              min_transfer_rate=1.0, max_connections=2)
        hub = TransferProcess(config)
        await hub.start()
        print("PID", hub.pid, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def test_child_dies_with_a_killed_daemon(emulator: EmulatorServer) -> None:
    """SIGKILL of the daemon takes its transfer process with it (no orphan holds the pool)."""
    with subprocess.Popen(
        [sys.executable, "-c", _ORPHAN, emulator.url], stdout=subprocess.PIPE, text=True
    ) as parent:
        try:
            assert parent.stdout is not None
            lines = iter(parent.stdout.readline, "")
            child = next(int(line.split()[1]) for line in lines if line.startswith("PID "))
            assert alive(child)
            parent.kill()
            parent.wait(10)
            wait_for(lambda: not alive(child), 10, "the orphaned child to die")
        finally:
            parent.kill()


@given(
    messages=st.lists(
        st.one_of(st.integers(), st.text(), st.binary(max_size=300), st.none()), max_size=8
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
)
def test_frames_survive_any_chunking(messages: list[Any], cuts: list[int]) -> None:
    """Messages cut into arbitrary pieces come out whole, in order, each exactly once."""
    stream = b"".join(frame(m) for m in messages)
    received: list[Any] = []
    frames = Frames(received.append)
    points = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    for start, end in itertools.pairwise(points):
        frames.feed(stream[start:end])
    assert received == messages


def test_portable_keeps_fields_and_replaces_what_cannot_cross() -> None:
    """The daemon's exceptions cross with their fields; others become a RuntimeError."""
    busy = HubBusy("slow down", retry_after=2.5)
    crossed = pickle.loads(pickle.dumps(portable(busy)))
    assert isinstance(crossed, HubBusy)
    assert crossed.retry_after == 2.5
    assert crossed.code == "rate_limited"

    class Local(Exception):
        """Defined in a function, so pickle cannot name it."""

    replaced = portable(Local("boom"))
    assert type(replaced) is RuntimeError
    assert "Local: boom" in str(replaced)


@pytest.mark.parametrize(
    ("setting", "cores", "expected"),
    [("auto", 1, False), ("auto", 2, True), ("auto", 8, True), (False, 8, False), (True, 1, True)],
)
def test_transfer_process_decision(setting: bool | str, cores: int, expected: bool) -> None:
    """ "auto" uses a child with two or more cores; a boolean setting always wins."""
    assert use_transfer_process(setting, cores) is expected


def test_child_imports_stay_small() -> None:
    """The transfer process loads no pydantic, SQLAlchemy, logging setup or httpx CLI."""
    probe = (
        "import sys, daemon.hub.transfer_child\n"
        "heavy = ('pydantic', 'sqlalchemy', 'structlog', 'daemon.logs', 'daemon.hub.client',"
        " 'rich', 'click', 'pygments', 'prometheus_client')\n"
        "print(' '.join(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split() == []


def test_client_reads_the_childs_bodies_into_models(emulator: EmulatorServer) -> None:
    """Bodies come back from the child as plain JSON; the daemon's client makes the models."""

    async def scenario() -> tuple[Any, Any]:
        proc = TransferProcess(config_for(emulator.url))
        try:
            raw = await proc.list_jobs()
            engines = await HubClient.over(proc).engines()
            return raw, engines
        finally:
            await proc.aclose()

    raw, engines = asyncio.run(scenario())
    assert raw["data"] == []
    assert engines
    assert all(engine.id for engine in engines)


def run_of(dest: Path, wait: int = 10) -> JobRun:
    """A conversion to docx, polled at the shortest allowed interval, saved to ``dest``."""
    return JobRun("ki/ocr", "jpn", "docx", wait, 1.0, dest)


async def run_all(hub: HubClient, inbox: Path, name: str, dest: Path) -> list[RunEvent]:
    """Upload ``inbox/name`` and collect every step of its ``run_job``."""
    sent = await hub.upload_input(upload_of(inbox, name))
    return [event async for event in hub.run_job(sent.file_id, run_of(dest))]


@pytest.mark.parametrize("where", ["child", "in-process"])
def test_run_job_streams_create_polls_and_download(
    emulator: EmulatorServer, tmp_path: Path, where: str
) -> None:
    """One run_job call creates, long-polls and downloads, reporting each step in order."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.png").write_bytes(make_scan("png", seed=5))
    dest = tmp_path / "out.docx"

    async def scenario() -> list[RunEvent]:
        config = config_for(emulator.url)
        calls = TransferProcess(config) if where == "child" else config.api()
        hub = HubClient.over(calls)
        try:
            return await run_all(hub, inbox, "a.png", dest)
        finally:
            await hub.aclose()

    events = asyncio.run(scenario())
    kinds = [e.kind for e in events]
    assert kinds[0] == "created"
    assert kinds[-2:] == ["download", "written"]
    assert set(kinds[1:-2]) == {"polled"}
    created, final = events[0].job, events[-3].job
    assert created is not None
    assert final is not None
    assert created.status == "queued"
    assert final.status == "completed"
    assert final.job_id == created.job_id
    assert events[-1].written == dest.stat().st_size > 0
    assert dest.read_bytes()[:2] == b"PK"


def test_run_job_of_a_failed_job_downloads_nothing(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    """A job the hub fails ends the run at its last poll: no download is attempted."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "bad.png").write_bytes(b"this is not a picture at all")
    dest = tmp_path / "out.docx"

    async def scenario() -> list[RunEvent]:
        hub = HubClient.over(TransferProcess(config_for(emulator.url)))
        try:
            return await run_all(hub, inbox, "bad.png", dest)
        finally:
            await hub.aclose()

    events = asyncio.run(scenario())
    assert [e.kind for e in events][-1] == "polled"
    final = events[-1].job
    assert final is not None
    assert final.status == "failed"
    assert final.error is not None
    assert not dest.exists()


def test_closing_a_run_early_cancels_it_in_the_child(
    slow_hub: EmulatorServer, tmp_path: Path
) -> None:
    """Leaving a run_job after its job is created cancels the poll there; the child serves on."""
    (tmp_path / "a.png").write_bytes(make_scan("png"))

    async def scenario() -> None:
        proc = TransferProcess(config_for(slow_hub.url))
        hub = HubClient.over(proc)
        try:
            sent = await hub.upload_input(upload_of(tmp_path, "a.png"))
            steps = hub.run_job(sent.file_id, run_of(tmp_path / "out.docx", wait=30))
            first = await anext(steps)
            assert first.kind == "created"

            def polled() -> bool:
                requests: dict[str, int] = slow_hub.hub.ledger()["requests"]
                return requests.get("GET /renderocr/jobs/{job_id}", 0) > 0

            await wait_async(polled, 10, "the first poll")
            pid = proc.pid
            await steps.aclose()
            assert proc._streams == {}
            jobs = await asyncio.wait_for(hub.list_jobs(), 10)
            assert [j.job_id for j in jobs] == [first.job.job_id if first.job else None]
            assert proc.pid == pid
        finally:
            await hub.aclose()

    asyncio.run(scenario())


def test_stopped_child_fails_a_run_after_twice_a_polls_deadline(
    slow_hub: EmulatorServer, tmp_path: Path
) -> None:
    """A child stopped (SIGSTOP) while it follows a job fails the run as retryable."""
    (tmp_path / "a.png").write_bytes(make_scan("png"))
    config = ClientConfig(
        slow_hub.url,
        DEFAULT_API_KEY,
        timeout=1.0,
        deadline=1.0,
        min_transfer_rate=1024.0,
        max_connections=4,
    )

    async def scenario() -> tuple[HubUnavailable, float]:
        proc = TransferProcess(config)
        hub = HubClient.over(proc)
        try:
            sent = await hub.upload_input(upload_of(tmp_path, "a.png"))
            steps = hub.run_job(sent.file_id, run_of(tmp_path / "out.docx", wait=1))
            assert (await anext(steps)).kind == "created"
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGSTOP)
            started = asyncio.get_running_loop().time()
            with pytest.raises(HubUnavailable) as caught:
                async for _ in steps:
                    pass
            return caught.value, asyncio.get_running_loop().time() - started
        finally:
            await proc.aclose()

    error, waited = asyncio.run(scenario())
    assert error.code == "transfer_process"
    assert "did not answer run_job" in str(error)
    assert waited < 15


@pytest.mark.parametrize("where", ["child", "in-process"])
def test_upload_and_run_converts_in_one_call(
    emulator: EmulatorServer, tmp_path: Path, where: str
) -> None:
    """upload_and_run uploads, then creates, follows and fetches the job of what it sent."""
    (tmp_path / "a.png").write_bytes(make_scan("png", seed=6))
    digest = hashlib.sha256((tmp_path / "a.png").read_bytes()).hexdigest()
    dest = tmp_path / "out.docx"

    async def scenario() -> list[RunEvent]:
        config = config_for(emulator.url)
        hub = HubClient.over(TransferProcess(config) if where == "child" else config.api())
        try:
            steps = hub.upload_and_run(upload_of(tmp_path, "a.png"), digest, run_of(dest))
            return [event async for event in steps]
        finally:
            await hub.aclose()

    events = asyncio.run(scenario())
    assert [e.kind for e in events[:2]] == ["uploaded", "created"]
    assert [e.kind for e in events[-2:]] == ["download", "written"]
    sent, created = events[0].sent, events[1].job
    assert sent is not None
    assert sent.sha256 == digest
    assert created is not None
    assert created.file_id == sent.file_id
    assert events[-1].written == dest.stat().st_size > 0


def test_upload_and_run_creates_no_job_for_other_bytes(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    """When the bytes sent are not the version hashed, the run ends after the upload."""
    (tmp_path / "a.png").write_bytes(make_scan("png", seed=7))

    async def scenario() -> list[RunEvent]:
        hub = HubClient.over(TransferProcess(config_for(emulator.url)))
        try:
            run = run_of(tmp_path / "out.docx")
            steps = hub.upload_and_run(upload_of(tmp_path, "a.png"), "0" * 64, run)
            return [event async for event in steps]
        finally:
            await hub.aclose()

    events = asyncio.run(scenario())
    assert [e.kind for e in events] == ["uploaded"]
    assert len(emulator.hub.ledger()["uploads"]) == 1
    assert emulator.hub.ledger()["jobs"] == []
