"""A simulated hub and a virtual-time event loop, to count the poll scheduler's requests.

The scheduler's economy (requests per job at any job length) depends on minutes of job
time; here those minutes pass in milliseconds. ``SimHub`` answers as the emulator does:
a job's progress moves in tenths, ``updated_at`` is when the current tenth was reached,
every timestamp is in whole seconds, and a long poll holds until the job ends or its
wait runs out (or returns at once when the hub ignores ``wait``). ``VirtualLoop`` jumps
its clock to the next timer whenever nothing is ready, so ``asyncio.sleep(60)`` takes
no real time.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from daemon.hub.client import HubClient
from daemon.hub.models import RemoteJob
from daemon.hub.polls import Durations, Poller

EPOCH = 1_800_000_000.0  # the hub's wall clock at virtual time 0


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose time jumps to the next timer when nothing else is ready."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0

    def time(self) -> float:
        """The virtual time, in seconds."""
        return self._now

    def _run_once(self) -> None:
        ready = cast(Any, self)._ready
        scheduled = cast(Any, self)._scheduled
        self._now += 1e-6  # a real clock moves on a little at every turn of the loop
        if not ready and scheduled:
            self._now = max(self._now, scheduled[0].when() + 1e-6)
        cast(Any, super())._run_once()


def _stamp(seconds: float) -> str:
    """A hub timestamp: whole seconds, as the emulator writes them."""
    moment = datetime.fromtimestamp(int(EPOCH + seconds), UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class SimJob:
    """One job at the simulated hub: created at ``created``, ends ``length`` later."""

    job_id: str
    created: float
    length: float

    def at(self, now: float) -> RemoteJob:
        """The job as the hub shows it at ``now``."""
        end = self.created + self.length
        if now >= end:
            stamp = _stamp(end)
            return RemoteJob(
                job_id=self.job_id,
                status="completed",
                progress=1.0,
                output_file_id=f"out-{self.job_id}",
                created_at=_stamp(self.created),
                updated_at=stamp,
                completed_at=stamp,
            )
        tenth = min(9, int((now - self.created) / self.length * 10))
        reached = self.created + self.length * tenth / 10
        return RemoteJob(
            job_id=self.job_id,
            status="processing",
            progress=tenth / 10,
            created_at=_stamp(self.created),
            updated_at=_stamp(reached),
        )


@dataclass
class SimHub:
    """The hub's two status routes, with a count of each request."""

    honour_wait: bool = True
    jobs: dict[str, SimJob] = field(default_factory=dict)
    polls: int = 0
    listings: int = 0
    gaps: list[float] = field(default_factory=list)  # between two plain looks at one job
    _asked: dict[str, float] = field(default_factory=dict)

    def now(self) -> float:
        """The virtual time."""
        return asyncio.get_running_loop().time()

    async def get_job(self, job_id: str, *, wait: float = 0.0) -> RemoteJob:
        """``GET /renderocr/jobs/{id}[?wait=N]``."""
        self.polls += 1
        job = self.jobs[job_id]
        now = self.now()
        if job_id in self._asked and not (self.honour_wait and wait > 0):
            self.gaps.append(now - self._asked[job_id])
        self._asked[job_id] = now
        if self.honour_wait and wait > 0:
            await asyncio.sleep(max(0.0, min(wait, job.created + job.length - now)))
        return job.at(self.now())

    async def list_jobs(self) -> list[RemoteJob]:
        """``GET /renderocr/jobs``: every job."""
        self.listings += 1
        now = self.now()
        return [job.at(now) for job in self.jobs.values()]


@dataclass(frozen=True)
class Economy:
    """What one simulated run cost."""

    files: int
    polls: int
    listings: int
    latencies: list[float]  # hub done -> the scheduler knows, per job
    min_gap: float  # the shortest time between two plain looks at one job

    @property
    def reads_per_file(self) -> float:
        """Status requests per file (the other three: upload, create, download)."""
        return (self.polls + self.listings) / self.files


def simulate(
    files: int,
    lengths: tuple[float, float],
    *,
    in_flight: int = 16,
    honour_wait: bool = True,
    seed: int = 1,
    gap: float = 0.05,
) -> Economy:
    """``files`` jobs of random length in ``lengths``, ``in_flight`` at a time, each
    submitted ``gap`` after the one before (as a worker does), followed to their end."""
    hub = SimHub(honour_wait=honour_wait)
    rng = random.Random(seed)
    latencies: list[float] = []
    loop = VirtualLoop()
    try:
        loop.run_until_complete(_run(hub, files, lengths, in_flight, rng, gap, latencies))
    finally:
        loop.close()
    return Economy(files, hub.polls, hub.listings, latencies, min(hub.gaps, default=99.0))


async def _run(
    hub: SimHub,
    files: int,
    lengths: tuple[float, float],
    in_flight: int,
    rng: random.Random,
    gap: float,
    latencies: list[float],
) -> None:
    loop = asyncio.get_running_loop()
    poller = Poller(cast(HubClient, hub), max_wait=10.0, durations=Durations(), clock=loop.time)
    runner = loop.create_task(poller.run())
    slots = asyncio.Semaphore(in_flight)

    async def one(n: int) -> None:
        async with slots:
            await asyncio.sleep(gap)
            job = SimJob(f"j{n}", loop.time(), rng.uniform(*lengths))
            hub.jobs[job.job_id] = job
            final = await poller.until_final(job.job_id, engine="ki/ocr", pages=1)
            assert final.status == "completed"
            latencies.append(loop.time() - (job.created + job.length))

    await asyncio.gather(*(one(n) for n in range(files)))
    runner.cancel()
