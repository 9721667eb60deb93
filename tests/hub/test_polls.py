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
    is_rough,
    next_due,
)
from tests.hub.polls_sim import simulate
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
        "spread": 0.0,
        "rough": False,
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
    estimate = estimate_end(watch(started=100.0), job, now=104.0)
    assert estimate is not None
    end, spread = estimate
    assert abs(end - 110.0) < 1e-6
    assert spread == 2.5  # whole-second stamps: up to a second off, over 40 %
    assert estimate_end(watch(), RemoteJob(job_id="j", status="queued", progress=0), 5.0) is None


def test_with_long_polls_a_job_of_known_end_is_long_polled_not_listed() -> None:
    """When the hub honours ?wait, jobs of estimated end get long polls, never listings."""
    jobs = [watch("a", due=9.0, expected_end=12.0), watch("b", due=9.5, expected_end=13.0)]
    action = choose(10.0, jobs, can_list=True, long_polls=True)
    assert (action.kind, action.watch is not None and action.watch.remote_job_id) == ("poll", "a")
    unknown = [watch("a", due=9.0), watch("b", due=9.5, expected_end=13.0)]
    assert choose(10.0, unknown, can_list=True, long_polls=True).kind == "list"


def test_a_long_poll_starts_so_its_wait_covers_the_estimates_spread() -> None:
    """With ?wait honoured a job is asked before its end, so the wait reaches past it by
    the estimate's spread; an estimate too rough for one wait is refined half-way."""
    exact = watch(expected_end=100.0)
    assert next_due(exact, 50.0, max_wait=10.0, prior=None) == 100.0 - 10.0 + 1.0
    spread = watch(expected_end=100.0, spread=2.5)
    assert next_due(spread, 50.0, max_wait=10.0, prior=None) == 100.0 - 10.0 + 3.5
    assert not is_rough(2.5, 10.0)
    assert is_rough(10.0, 10.0)
    rough = watch(expected_end=100.0, spread=10.0, rough=True)
    assert next_due(rough, 50.0, max_wait=10.0, prior=None) == 75.0


def test_without_wait_a_plain_poll_looks_just_after_the_expected_end() -> None:
    """A hub that ignores ?wait is asked once, just after the job should have ended."""
    assert next_due(watch(expected_end=100.0), 50.0, max_wait=0.0, prior=None) == 100.3
    assert next_due(watch(expected_end=100.0), 99.9, max_wait=0.0, prior=None) == 100.9


def test_a_new_job_is_first_read_after_a_share_of_its_expected_length() -> None:
    """A long job is first read later than a short one, so one listing reads several."""
    short = next_due(watch(started=0.0), 0.0, max_wait=10.0, prior=None)
    long = next_due(watch(started=0.0), 0.0, max_wait=10.0, prior=60.0)
    longer = next_due(watch(started=0.0), 0.0, max_wait=10.0, prior=600.0)
    assert (short, next_due(watch(), 0.0, max_wait=10.0, prior=40.0)) == (LIST_AGE, 16.0)
    assert (long, longer) == (20.0, 20.0)  # no later than 20 s, however long the usual


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


def test_status_reads_per_file_stay_low_at_long_jobs_with_wait_honoured() -> None:
    """64 jobs of 30-90 s, 16 at a time: about one long poll each and a few shared
    listings (at most 1.5 status reads a file; 6.2 before the scheduler learned this)."""
    for seed in (1, 2, 3):
        economy = simulate(64, (30, 90), honour_wait=True, seed=seed)
        assert economy.reads_per_file <= 1.5
        assert max(economy.latencies) < 0.1  # a long poll answers as the job ends


def test_a_hub_that_ignores_wait_is_never_asked_twice_within_a_second() -> None:
    """Wait ignored: plain polls and listings, at most 3 status reads a file at 30-90 s
    jobs, never two plain looks at one job less than a second apart."""
    for lengths in ((3.0, 8.0), (30.0, 90.0)):
        economy = simulate(64, lengths, honour_wait=False, seed=1)
        assert economy.reads_per_file <= 3.0
        assert economy.min_gap >= 1.0
        assert sorted(economy.latencies)[len(economy.latencies) // 2] < 1.5


def test_status_reads_do_not_grow_with_job_length() -> None:
    """From 3 s to 5 min jobs, 16 at a time, a file costs about as many status reads."""
    reads = [
        simulate(48, lengths, honour_wait=True, seed=4).reads_per_file
        for lengths in ((3.0, 8.0), (30.0, 90.0), (100.0, 300.0))
    ]
    assert max(reads) <= 2.0, reads


def test_only_one_job_probes_while_nothing_is_learned() -> None:
    """The first 16 jobs of an engine never seen: one long poll probes, the others wait
    for its answer or a listing, so the first wave costs no 16 timed-out long polls."""
    economy = simulate(16, (30, 90), honour_wait=True, seed=5)
    assert economy.polls <= 16 + 2
    assert economy.reads_per_file <= 2.0
