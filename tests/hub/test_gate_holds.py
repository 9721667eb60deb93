"""The gate against a hostile hub: held work is probed and resumes, whatever the recheck says."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest

from daemon.errors import AuthRejected, ConfigError
from daemon.hub.client import HubClient
from daemon.hub.gate import Gate, Hold

BASE = "http://hub.test"
KEY = "key-0123456789"
JOB = {"job_id": "j" * 32, "file_id": "f" * 32, "status": "queued"}


@dataclass
class HostileHub:
    """Answers GET /files with ``recheck`` (404, 302...; None: honestly), every other route
    401 until the key is accepted again; counts what it was asked."""

    recheck: int | None
    key_ok: bool = False
    asked: Counter[str] = field(default_factory=Counter)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        route = f"{request.method} {request.url.path}"
        self.asked[route] += 1
        if route == "GET /files" and self.recheck is not None:
            return httpx.Response(self.recheck, headers={"location": "/login"}, text="<html/>")
        if not self.key_ok:
            return httpx.Response(401, json={"code": "unauthorized", "message": "bad key"})
        return httpx.Response(202, json=JOB)


def client_for(hub: HostileHub, gate: Gate, key_source: object = None) -> HubClient:
    http = httpx.AsyncClient(base_url=BASE, transport=httpx.MockTransport(hub))
    return HubClient(http, KEY, gate=gate, key_source=key_source)  # type: ignore[arg-type]


async def create(client: HubClient) -> None:
    await client.create_job("f" * 32, "ki/ocr", "jpn", "docx")


async def until_created(client: HubClient, timeout: float) -> int:
    """Try as a job's step would (held, retried) until a creation goes through; the tries."""
    tries = 0
    async with asyncio.timeout(timeout):
        while True:
            tries += 1
            try:
                await create(client)
                return tries
            except AuthRejected:
                await asyncio.sleep(0.05)  # the worker's hold, shortened


@pytest.mark.parametrize("recheck", [404, 302, 400])
def test_a_recheck_that_proves_nothing_never_holds_work_for_ever(recheck: int) -> None:
    """A rejected key, then a recheck answered 404/302/400: the work keeps being tried at
    growing intervals (never a hot loop), the hold keeps its start, and once the key is
    accepted the work goes through although the recheck still says nothing."""
    hub = HostileHub(recheck)

    async def scenario() -> tuple[int, set[float]]:
        gate = Gate(probe_max=0.4)
        client = client_for(hub, gate)
        with pytest.raises(AuthRejected):
            await create(client)
        assert gate.closure is not None
        assert gate.closure.hold is Hold.KEY
        starts = {gate.closure.since}
        trying = asyncio.ensure_future(until_created(client, 30))
        loop = asyncio.get_running_loop()
        end = loop.time() + 3.0
        while loop.time() < end:  # three seconds of a hub refusing the key
            if gate.closure is not None:
                starts.add(gate.closure.since)
            await asyncio.sleep(0.01)
        asked = sum(hub.asked.values())
        hub.key_ok = True
        await trying
        await gate.aclose()
        await client.aclose()
        return asked, starts

    asked, starts = asyncio.run(scenario())
    assert len(starts) == 1  # one hold, however often the recheck opened the gate
    assert hub.asked["GET /files"] >= 2  # probed on
    assert asked < 60  # backing off towards probe_max, not looping


def test_a_refused_plan_that_becomes_a_rejected_key_is_probed() -> None:
    """Closed for a refused route, then for the key: the probe starts, and a fixed key
    opens the gate (before, nothing probed and work waited for ever)."""
    probes: list[float] = []

    async def scenario() -> Gate:
        gate = Gate(probe_max=0.1)

        async def probe() -> None:
            probes.append(asyncio.get_running_loop().time())
            if len(probes) >= 2:
                gate.answered("GET /files")  # the key works again

        gate.probe = probe
        gate.refused("POST /renderocr/jobs", "the plan does not include RenderOCR")
        gate.key_rejected("the LDX hub rejected the API key (HTTP 401)")
        async with asyncio.timeout(10):
            async with gate.admission("POST /files"):
                pass
        await gate.aclose()
        return gate

    gate = asyncio.run(scenario())
    assert gate.closure is None
    assert len(probes) == 2


def test_an_unreadable_key_file_while_held_is_the_reason_then_resumes() -> None:
    """While held, a key file turned UTF-16 becomes the hold's reason (never its content);
    once fixed, the probe reads it and work resumes."""
    hub = HostileHub(None)
    readable = [False]

    def key_source() -> str:
        if not readable[0]:
            raise ConfigError("the API key file /etc/k is UTF-16 text; save it as UTF-8")
        return KEY

    async def scenario() -> list[str]:
        gate = Gate(probe_max=0.2)
        client = client_for(hub, gate, key_source)
        with pytest.raises(AuthRejected):
            await create(client)
        reasons: list[str] = []
        async with asyncio.timeout(10):
            while gate.closure is not None and "UTF-16" not in gate.closure.reason:
                await asyncio.sleep(0.02)
        assert gate.closure is not None
        reasons.append(gate.closure.sentence(gate.waiting))
        readable[0] = True
        hub.key_ok = True
        await until_created(client, 10)
        await gate.aclose()
        await client.aclose()
        return reasons

    reasons = asyncio.run(scenario())
    assert "UTF-16" in reasons[0]
    assert hub.asked["POST /renderocr/jobs"] >= 2
