"""The hub gate (hold work while the hub cannot serve it) and the request budget."""

from __future__ import annotations

import asyncio

from daemon.hub.budget import (
    DEFAULT_BACKOFF,
    MIN_RATE,
    Bucket,
    after_answer,
    after_refusal,
    wait_for_slot,
)
from daemon.hub.gate import Gate, Hold

ROUTE = "POST /renderocr/jobs"


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_run_of_network_failures_closes_the_gate_and_one_answer_opens_it() -> None:
    """Three failures in a row mean "down"; any answer reopens at once, telling the owner."""
    changes: list[object] = []
    gate = Gate(threshold=3, clock=Clock(), on_change=changes.append)
    gate.unreachable(ROUTE, "no connection")
    gate.answered(ROUTE)  # an answer between resets the count
    gate.unreachable(ROUTE, "no connection")
    gate.unreachable(ROUTE, "no connection")
    assert gate.closure is None
    gate.unreachable(ROUTE, "no connection")
    assert gate.closure is not None
    assert gate.closure.hold is Hold.DOWN
    assert "hub unreachable since" in (gate.describe() or "")
    gate.answered("GET /files")
    assert gate.closure is None
    assert [c is None for c in changes] == [False, True]


def test_requests_wait_while_closed_and_go_on_when_it_opens() -> None:
    """A request for a closed route waits in admission (it does not fail) until it opens."""

    async def scenario() -> list[str]:
        gate = Gate(clock=Clock())
        gate.key_rejected("HTTP 401")
        seen: list[str] = []

        async def request() -> None:
            async with gate.admission("GET /files"):
                seen.append("sent")

        task = asyncio.create_task(request())
        await asyncio.sleep(0.05)
        seen.append(f"waiting={gate.waiting}")
        gate.answered("GET /files")
        await asyncio.wait_for(task, 1)
        return seen

    assert asyncio.run(scenario()) == ["waiting=1", "sent"]


def test_a_refused_route_holds_only_that_route_and_lets_one_trial_through() -> None:
    """A plan refusal of creations leaves other routes free; one creation is tried at a time."""

    async def scenario() -> tuple[bool, bool, int]:
        clock = Clock()
        gate = Gate(clock=clock)
        gate.refused(ROUTE, "the plan does not include RenderOCR")
        async with gate.admission("GET /files") as trial:
            other_free = not trial
        clock.now += 5  # past the first turn
        async with gate.admission(ROUTE) as trial:
            first = trial
            waiter = asyncio.create_task(_enter(gate))
            await asyncio.sleep(0.05)
            held = gate.waiting
        waiter.cancel()
        return other_free, first, held

    assert asyncio.run(scenario()) == (True, True, 1)


async def _enter(gate: Gate) -> None:
    async with gate.admission(ROUTE):
        pass


def test_a_closed_gate_probes_and_the_probe_answer_opens_it() -> None:
    """While down, the gate's probe runs by itself; its answer opens the gate."""

    async def scenario() -> int:
        gate = Gate(threshold=1, probe_max=0.05)
        probes: list[int] = []

        async def probe() -> None:
            probes.append(1)
            gate.answered("GET /files")

        gate.probe = probe
        gate.unreachable(ROUTE, "no connection")
        for _ in range(100):
            if gate.closure is None:
                break
            await asyncio.sleep(0.02)
        await gate.aclose()
        return len(probes)

    assert asyncio.run(scenario()) == 1


def test_the_budget_spaces_requests_at_its_rate_after_a_burst() -> None:
    """At 60 a minute, after the burst each request waits a second for its token."""
    bucket = Bucket.full(60.0, 0.0)
    waits = []
    for _ in range(6):
        wait, bucket = wait_for_slot(bucket, 0.0)
        waits.append(round(wait, 6))
    assert waits == [0.0, 0.0, 0.0, 0.0, 1.0, 2.0]


def test_a_429_holds_every_request_and_halves_the_rate_then_it_recovers() -> None:
    """Retry-After holds all requests; the rate halves and climbs back with answers."""
    bucket = after_refusal(Bucket.full(120.0, 0.0), 10.0, 30.0)
    assert bucket.rate == 60.0
    wait, _ = wait_for_slot(bucket, 10.0)
    assert wait >= 30.0
    no_hint = after_refusal(Bucket.full(120.0, 0.0), 10.0, None)
    assert no_hint.hold_until == 10.0 + DEFAULT_BACKOFF
    floor = Bucket.full(120.0, 0.0)
    for _ in range(20):
        floor = after_refusal(floor, 0.0, 1.0)
    assert floor.rate == MIN_RATE
    for _ in range(10_000):
        floor = after_answer(floor)
    assert floor.rate == 120.0


def test_an_unlimited_budget_only_honours_retry_after() -> None:
    """With no limit of its own, requests go at once, except while a 429 holds them."""
    bucket = Bucket.full(0.0, 0.0)
    assert wait_for_slot(bucket, 5.0)[0] == 0.0
    held = after_refusal(bucket, 5.0, 2.0)
    assert wait_for_slot(held, 5.0)[0] == 2.0
