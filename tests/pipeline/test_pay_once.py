"""Pay once: whatever the hub answers, each conversion is paid only when the hub lost or
expired what was paid for (issue #37, cases c to f), counted from the emulator's ledger."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from daemon.emulator.hub import HubSettings, paid_conversions
from daemon.hub.gate import Hold
from daemon.jobs.model import Stage, Status
from daemon.outbox.verify import verify_package
from tests.pipeline.rig import Rig, rig


async def when(
    predicate: Callable[[], bool], then: Callable[[], None], timeout: float = 20
) -> None:
    """Run ``then`` once ``predicate`` holds (a reaction to the hub's ledger, not a sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("the condition never came")
        await asyncio.sleep(0.01)
    then()


def hub_clock_for(r: Rig) -> None:
    """The steps read the hub's clock: a test that moves it moves the daemon's view too."""
    hub_clock = r.hub.clock
    r.steps.clock = r.steps.delivery.clock = r.steps.ledger.clock = lambda: (
        hub_clock.now().timestamp()
    )


def downloads_refused(r: Rig) -> int:
    """How many downloads the hub answered 404."""
    return sum(1 for d in r.ledger()["downloads"] if d["status"] == 404)


def test_a_clean_conversion_pays_once_and_publishes(tmp_path: Path) -> None:
    """One input: one upload, one paid conversion, one download, a valid output."""

    async def scenario() -> None:
        async with rig(tmp_path) as r:
            r.add("a/scan.png")
            (job,) = await r.run()
            assert job.status is Status.COMPLETED
            verify_package(r.outbox / "a" / "scan.docx", "docx")
            assert paid_conversions(r.ledger()) == 1

    asyncio.run(scenario())


def test_c_an_output_that_lags_behind_its_job_is_fetched_not_paid_again(tmp_path: Path) -> None:
    """A completed job whose output answers 404 for 5 s is "not yet": no second payment."""

    async def scenario() -> None:
        async with rig(tmp_path) as r:
            hub_clock_for(r)
            r.hub.update_knobs({"output_delay": 5.0})
            for n in range(3):
                r.add(f"s{n}.png", seed=n)
            lag = asyncio.create_task(
                when(lambda: downloads_refused(r) >= 3, lambda: r.hub.clock.advance(5.0))
            )
            jobs = await r.run()
            await lag
            assert [job.status for job in jobs] == [Status.COMPLETED] * 3
            assert paid_conversions(r.ledger()) == 3

    asyncio.run(scenario())


def test_c_an_output_never_there_costs_at_most_max_conversions(tmp_path: Path) -> None:
    """An output that always answers 404 is waited for until its expiry, then converted
    again, at most ``max_conversions`` times in all; then the job fails saying so."""

    async def scenario() -> None:
        async with rig(tmp_path, max_conversions=2) as r:
            hub_clock_for(r)
            r.hub.update_knobs({"output_missing": True})
            r.add("a.png")

            def expire() -> None:
                r.hub.clock.advance(4 * 24 * 3600.0)  # past the outputs' expiry

            first = asyncio.create_task(when(lambda: downloads_refused(r) >= 1, expire))
            second = asyncio.create_task(
                when(
                    lambda: paid_conversions(r.ledger()) >= 2 and downloads_refused(r) >= 2, expire
                )
            )
            (job,) = await r.run()
            await asyncio.gather(first, second)
            assert job.status is Status.FAILED
            assert job.error_code == "too_many_conversions"
            assert paid_conversions(r.ledger()) == 2

    asyncio.run(scenario())


def test_d_a_lost_creation_after_a_failure_never_adopts_the_failed_job(tmp_path: Path) -> None:
    """The hub fails a job, then the next creation is lost before the hub made one: the
    earlier failed job is not adopted; one more real conversion completes the file."""

    async def scenario() -> None:
        async with rig(tmp_path, max_conversions=3) as r:
            r.hub.update_knobs({"job_failure_rate": 1.0, "drop_create_after_failure": 1})

            def heal() -> None:
                r.hub.update_knobs({"job_failure_rate": 0.0})

            failed = [j for j in r.ledger()["jobs"] if j.get("outcome") == "failed"]
            assert not failed
            healer = asyncio.create_task(
                when(lambda: any(j["outcome"] == "failed" for j in r.ledger()["jobs"]), heal)
            )
            r.add("a.png")
            (job,) = await r.run()
            await healer
            assert job.status is Status.COMPLETED
            ledger = r.ledger()
            assert ledger["faults"]["dropped_create"] == 1
            assert paid_conversions(ledger) == 2  # the failed one and the one that worked

    asyncio.run(scenario())


def test_e_a_lost_creation_reply_is_adopted_even_with_paged_lists_and_skewed_clocks(
    tmp_path: Path,
) -> None:
    """The hub made the job but its answer was lost: the daemon finds and follows it (the
    listing shows only the newest job; the hub's clock is an hour off), paying once."""

    async def scenario() -> None:
        async with rig(tmp_path) as r:
            r.hub.update_knobs(
                {"lose_create_replies": 1, "list_limit": 1, "timestamp_skew": -3600.0}
            )
            r.add("a.png")
            (job,) = await r.run()
            assert job.status is Status.COMPLETED
            ledger = r.ledger()
            assert ledger["faults"]["lost_reply"] == 1
            assert paid_conversions(ledger) == 1

    asyncio.run(scenario())


def test_f_a_plan_that_refuses_creation_holds_work_and_fails_nothing(tmp_path: Path) -> None:
    """403 on creation only (the key works elsewhere): work is held with its own message,
    nothing fails, nothing is paid; once the plan allows it, every file converts."""

    async def scenario() -> None:
        async with rig(tmp_path) as r:
            r.hub.update_knobs({"refuse_route": "POST /renderocr/jobs", "refuse_status": 403})
            for n in range(2):
                r.add(f"s{n}.png", seed=n)
            run = asyncio.create_task(r.run())
            await when(lambda: r.gate.closure is not None, lambda: None)
            closure = r.gate.closure
            assert closure is not None
            assert closure.hold is Hold.REFUSED
            assert "refuses POST /renderocr/jobs" in (r.gate.describe() or "")
            assert paid_conversions(r.ledger()) == 0
            r.hub.update_knobs({"refuse_route": ""})
            jobs = await run
            assert [job.status for job in jobs] == [Status.COMPLETED] * 2
            assert paid_conversions(r.ledger()) == 2

    asyncio.run(scenario())


def test_f_a_credit_refusal_holds_work_and_fails_nothing(tmp_path: Path) -> None:
    """402 on creation (credit used up) holds new conversions; none fails; they go on later."""

    async def scenario() -> None:
        async with rig(tmp_path) as r:
            r.hub.update_knobs({"refuse_route": "POST /renderocr/jobs", "refuse_status": 402})
            r.add("a.png")
            run = asyncio.create_task(r.run())
            await when(lambda: r.gate.closure is not None, lambda: None)
            stage = r.store.get(1)
            assert stage is not None
            assert stage.status is not Status.FAILED
            r.hub.update_knobs({"refuse_route": ""})
            (job,) = await run
            assert job.status is Status.COMPLETED

    asyncio.run(scenario())


def test_a_hub_failure_is_converted_again_within_the_ceiling(tmp_path: Path) -> None:
    """upstream_service_error on every conversion: converted again up to the ceiling, then
    failed with the hub's reason (the error file names it), never more conversions."""

    async def scenario() -> None:
        async with rig(tmp_path, HubSettings(processing_time=0.0), max_conversions=2) as r:
            r.hub.update_knobs({"job_failure_rate": 1.0})
            r.add("a.png")
            (job,) = await r.run()
            assert job.status is Status.FAILED
            assert job.error_code == "upstream_service_error"
            assert paid_conversions(r.ledger()) == 2
            assert (r.outbox / "a.png.error.txt").exists()
            assert job.stage is Stage.FAILED

    asyncio.run(scenario())
