"""The poll scheduler: which job to look at, when and how (pure decisions, and a run)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import httpx

from daemon.emulator.app import create_app
from daemon.emulator.hub import DEFAULT_API_KEY, Hub, HubSettings
from daemon.hub.client import HubClient
from daemon.hub.models import RemoteJob
from daemon.hub.polls import (
    LIST_AGE,
    Durations,
    Poller,
    Watch,
    choose,
    estimate_end,
    long_poll_wait,
    next_due,
)
from tests.scans import make_scan


def watch(job_id: str = "j", started: float = 0.0, due: float = 0.0, **changes: object) -> Watch:
    """A watched job (outside an event loop: its future is never used here)."""
    w = Watch.__new__(Watch)
    values: dict[str, object] = {
        "remote_job_id": job_id,
        "engine": "ki/ocr",
        "pages": 1,
        "started": started,
        "due": due,
        "expected_end": None,
        "polls": 0,
        "busy": False,
    }
    values.update(changes)
    for name, value in values.items():
        setattr(w, name, value)
    return w


def test_nothing_due_sleeps_until_the_first_due_job() -> None:
    """With no job due, the scheduler sleeps until the earliest one is."""
    action = choose(
        10.0, [watch("a", due=15.0), watch("b", due=12.0)], can_list=True, long_polls=False
    )
    assert (action.kind, action.until) == ("sleep", 12.0)
    assert choose(10.0, [], can_list=True, long_polls=False).until == math.inf


def test_several_jobs_due_together_are_served_by_one_listing() -> None:
    """Two jobs due within moments of each other cost one list request, not two polls."""
    action = choose(
        10.0, [watch("a", due=9.0), watch("b", due=10.3)], can_list=True, long_polls=False
    )
    assert action.kind == "list"
    alone = choose(
        10.0,
        [watch("a", due=9.0), watch("b", due=30.0, expected_end=31.0)],
        can_list=False,
        long_polls=False,
    )
    assert (alone.kind, alone.watch is not None and alone.watch.remote_job_id) == ("poll", "a")


def test_a_job_of_unknown_end_is_read_by_listing_when_others_run() -> None:
    """A job whose end is unknown is looked at with a listing that informs every job."""
    action = choose(
        10.0,
        [watch("a", due=9.0), watch("b", due=40.0, expected_end=50.0)],
        can_list=True,
        long_polls=False,
    )
    assert action.kind == "list"


def test_progress_and_the_hubs_timestamps_give_the_end() -> None:
    """A job 40 % done after 4 s of the hub's clock ends 6 s later."""
    job = RemoteJob(
        job_id="j",
        status="processing",
        progress=0.4,
        created_at="2026-01-01T00:00:00Z",
        updated_at="2026-01-01T00:00:04Z",
    )
    end = estimate_end(watch(started=100.0), job, now=104.0)
    assert end is not None
    assert abs(end - 110.0) < 1e-6
    assert estimate_end(watch(), RemoteJob(job_id="j", status="queued", progress=0), 5.0) is None


def test_with_long_polls_a_job_of_known_end_is_long_polled_not_listed() -> None:
    """When the hub honours ?wait, jobs of estimated end get long polls, never listings."""
    jobs = [watch("a", due=9.0, expected_end=12.0), watch("b", due=9.5, expected_end=13.0)]
    action = choose(10.0, jobs, can_list=True, long_polls=True)
    assert (action.kind, action.watch is not None and action.watch.remote_job_id) == ("poll", "a")
    unknown = [watch("a", due=9.0), watch("b", due=9.5, expected_end=13.0)]
    assert choose(10.0, unknown, can_list=True, long_polls=True).kind == "list"


def test_a_long_poll_starts_before_the_expected_end_and_holds_just_past_it() -> None:
    """With ?wait honoured a job is asked near its end with a wait that covers it."""
    near = watch(expected_end=100.0)
    assert next_due(near, 50.0, max_wait=10.0, prior=None) == 100.0 - 10.0 + 1.0
    assert long_poll_wait(near, 95.0, 10.0) == 6.0
    assert long_poll_wait(near, 99.5, 10.0) == 1.5
    assert long_poll_wait(watch(), 0.0, 0.0) == 0.0


def test_without_wait_a_plain_poll_looks_just_after_the_expected_end() -> None:
    """A hub that ignores ?wait is asked once, just after the job should have ended."""
    assert next_due(watch(expected_end=100.0), 50.0, max_wait=0.0, prior=None) == 100.3


def test_a_new_job_is_first_read_after_a_share_of_its_expected_length() -> None:
    """A long job is first read later than a short one, so one listing reads several."""
    short = next_due(watch(started=0.0), 0.0, max_wait=10.0, prior=None)
    long = next_due(watch(started=0.0), 0.0, max_wait=10.0, prior=60.0)
    assert (short, long) == (LIST_AGE, 12.0)


def test_durations_are_learned_per_page_and_engine() -> None:
    """The prior is the learned seconds per page times the pages; unknown before any job."""
    durations = Durations()
    assert durations.prior("ki/ocr", 3) is None
    durations.learn("ki/ocr", 2, 10.0)
    assert durations.prior("ki/ocr", 3) == 15.0
    durations.learn("ki/ocr", 1, 10.0)
    assert durations.prior("ki/ocr", 1) == 5.0 + 0.2 * (10.0 - 5.0)


def test_poller_follows_jobs_to_their_end_with_few_requests(tmp_path: Path) -> None:
    """Eight jobs of 1.5 s against the emulator's app end with about one request each."""
    hub = Hub(tmp_path / "hub", HubSettings(processing_time=1.5))
    transport = httpx.ASGITransport(app=create_app(hub))

    async def scenario() -> tuple[list[str], dict[str, int]]:
        async with HubClient.connect(
            "http://hub.test", DEFAULT_API_KEY, transport=transport
        ) as client:
            ids = []
            for n in range(8):
                scan = make_scan("png", n)
                info = await client.upload(io_of(scan), f"{n}.png", "image/png", len(scan))
                ids.append((await client.create_job(info.file_id, "ki/ocr", "jpn", "docx")).job_id)
            poller = Poller(client, max_wait=10.0)
            runner = asyncio.create_task(poller.run())
            done = await asyncio.gather(
                *(poller.until_final(i, engine="ki/ocr", pages=1) for i in ids)
            )
            runner.cancel()
            return [job.status for job in done], poller.requests

    statuses, requests = asyncio.run(scenario())
    assert statuses == ["completed"] * 8
    assert requests["poll"] + requests["list"] <= 12


def io_of(data: bytes) -> object:
    """A binary stream over ``data``."""
    import io

    return io.BytesIO(data)
