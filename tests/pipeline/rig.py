"""The worker rig: the pipeline in-process, in burst mode, against the emulator's own app.

``rig(tmp_path)`` builds every part the service would (state database and writer, hub
client with its gate and budget, poll scheduler, steps, worker) over
``httpx.ASGITransport(create_app(hub))``: no socket, no subprocess, so a pipeline
behaviour (a fault, a resume, a lost reply) is a test that runs in well under a second.
``Rig.add`` puts an input in the inbox and its job in the queue as intake would;
``Rig.run`` runs the worker until nothing is left to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from daemon.emulator.app import create_app
from daemon.emulator.hub import DEFAULT_API_KEY, Hub, HubSettings
from daemon.hub.client import HubClient, Limits
from daemon.hub.gate import Gate
from daemon.hub.polls import Poller
from daemon.jobs.model import Job, NewJob
from daemon.jobs.store import Store
from daemon.jobs.views import Views
from daemon.jobs.writer import Writer
from daemon.outbox.permissions import OutputPermissions
from daemon.pipeline.commit import Commit
from daemon.pipeline.delivery import Delivery
from daemon.pipeline.ledger import HubLedger
from daemon.pipeline.outcomes import Outcomes, OutcomeSettings
from daemon.pipeline.settings import StepSettings
from daemon.pipeline.steps import Steps
from daemon.pipeline.worker import Worker, WorkerSettings
from tests.scans import make_scan


@dataclass
class Rig:
    """Every part of the pipeline, wired as the service wires them."""

    hub: Hub
    store: Store
    writer: Writer
    client: HubClient
    gate: Gate
    poller: Poller
    steps: Steps
    worker: Worker
    inbox: Path
    outbox: Path

    def add(self, rel: str, kind: str = "png", seed: int = 1) -> Job:
        """Drop a scan at ``rel`` in the inbox and queue its job (as intake would)."""
        path = self.inbox / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make_scan(kind, seed))
        st = os.stat(path)
        fmt = {"png": "png", "pdf": "pdf", "tiff": "tiff", "jpeg": "jpeg", "bmp": "bmp"}[kind]
        new = NewJob(rel, st.st_size, st.st_mtime_ns, st.st_ino, fmt, "ki/ocr", "jpn", "docx")
        output = rel.rsplit(".", 1)[0] + ".docx"
        return self.store.add_jobs([(new, output, None)], 0.0)[rel]

    async def run(self, timeout: float = 30.0) -> list[Job]:
        """Run the worker (and the poll scheduler) until no job is left; the jobs then."""
        poller = asyncio.create_task(self.poller.run())
        try:
            await asyncio.wait_for(self.worker.run(asyncio.Event(), burst=True), timeout)
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        return sorted(Views(self.store).jobs(), key=lambda job: job.id)

    def ledger(self) -> dict[str, Any]:
        """What the emulated hub received."""
        return self.hub.ledger()


@contextlib.asynccontextmanager
async def rig(
    tmp_path: Path,
    hub_settings: HubSettings | None = None,
    *,
    max_conversions: int = 2,
    max_attempts: int = 3,
    poll_wait: float = 10.0,
) -> AsyncIterator[Rig]:
    """A rig over a fresh inbox, outbox, state database and emulated hub."""
    inbox, outbox, state = (tmp_path / name for name in ("inbox", "outbox", "state"))
    for folder in (inbox, outbox, state):
        folder.mkdir(exist_ok=True)
    hub = Hub(tmp_path / "hub", hub_settings or HubSettings(processing_time=0.0))
    store = Store(f"sqlite:///{state / 'state.db'}")
    writer = Writer(store)
    gate = Gate(probe_max=0.2)
    transport = httpx.ASGITransport(app=create_app(hub))
    client = HubClient(
        httpx.AsyncClient(base_url="http://hub.test", transport=transport),
        DEFAULT_API_KEY,
        limits=Limits(deadline=10.0),
        gate=gate,
    )
    perms = OutputPermissions()
    poller = Poller(client, max_wait=poll_wait)
    commit = Commit(writer, instance="rig", lease=30.0)
    settings = StepSettings(
        inbox=inbox,
        outbox=outbox,
        held=state / "held",
        instance="rig",
        perms=perms,
        max_conversions=max_conversions,
        resubmit_delay=0.01,
    )
    ledger = HubLedger(writer)
    delivery = Delivery(settings, client, commit, ledger)
    steps = Steps(settings, writer, client, poller, commit, delivery=delivery, ledger=ledger)
    outcomes = Outcomes(
        OutcomeSettings(inbox=inbox, outbox=outbox, instance="rig", perms=perms),
        writer,
        commit,
        forget=steps.forget,
    )
    worker = Worker(
        WorkerSettings(instance="rig", max_attempts=max_attempts), writer, steps, commit, outcomes
    )
    try:
        yield Rig(hub, store, writer, client, gate, poller, steps, worker, inbox, outbox)
    finally:
        await gate.aclose()
        await client.aclose()
        writer.close()
