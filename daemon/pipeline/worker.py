"""The worker: claims due jobs, runs their steps, and carries out the fault policy.

One asyncio task per job in flight (at most ``max_in_flight``, fewer while the hub's
request budget is cut after a 429), no thread per job. A job's task takes the step of
its stage (``daemon.pipeline.steps``) until the job is final; whatever a step raises
goes through ``faults.decide`` and the decision is carried out here: retry later,
fail (with an error file), withdraw, send back, hold, or let go.

Jobs are claimed with a lease (``Store.claim``) so that several instances can share one
database: the leases of the jobs in flight are renewed every third of ``lease``,
every change is written only while this instance still holds the job (``LeaseLost``
otherwise), and a deferred or finished job is let go at once. ``run`` goes on until it
is stopped; ``run(burst=True)`` returns as soon as nothing is left to do (arq's burst
mode), for ``once`` and for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from daemon.errors import LeaseLost, StateUnavailable
from daemon.hub.client import current_job
from daemon.jobs.model import FINAL_STAGES, Job, Stage
from daemon.jobs.writer import Writer
from daemon.logs import get_logger
from daemon.ops import metrics
from daemon.pipeline import faults
from daemon.pipeline.commit import Commit
from daemon.pipeline.outcomes import Outcomes
from daemon.pipeline.steps import Steps

log = get_logger(component="worker")
STATE_RETRY_SECONDS = 5.0
REARM_CHECK_SECONDS = 60.0


@dataclass(frozen=True)
class WorkerSettings:
    """The values the worker needs (from the configuration, read once)."""

    instance: str
    lease: float = 30.0
    max_in_flight: int = 16
    max_attempts: int = 8
    auto_retry_after: float = 1800.0  # 0: failed jobs are never re-armed by themselves
    auto_retry_limit: int = 3
    shared: bool = False  # a shared database: note this instance's heartbeat in it


@dataclass
class Brakes:
    """What holds new work back (set by the service's monitors)."""

    disk_low: bool = False
    budget_share: Callable[[], float] = field(default=lambda: 1.0)  # the request budget
    reasons: Callable[[], str | None] = field(default=lambda: None)  # the gate
    # The page budget: holds only the jobs whose next step pays for a new conversion
    # (those at the hub go on), and says when it lifts by itself (the period turns).
    new_work: Callable[[], str | None] = field(default=lambda: None)
    lifts_in: Callable[[], float | None] = field(default=lambda: None)


class Worker:
    """Schedules job tasks and carries out what their faults mean."""

    def __init__(
        self,
        settings: WorkerSettings,
        writer: Writer,
        steps: Steps,
        commit: Commit,
        outcomes: Outcomes,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        """``outcomes`` carries out what the fault policy decides for each job."""
        self.settings = settings
        self.writer = writer
        self.steps = steps
        self.outcomes = outcomes
        self.clock = clock
        self.rng = rng or random.Random()
        self.brakes = Brakes()
        self.commit = commit
        self.active: dict[int, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._next_rearm = 0.0

    def wake(self) -> None:
        """Look for runnable jobs now (new work arrived, a slot freed, the hub is back)."""
        self._wake.set()

    def holding_back(self) -> str | None:
        """Why no new job starts now, or None."""
        return self._stopped() or self.brakes.new_work()

    def _stopped(self) -> str | None:
        """Why no job at all is claimed now, or None."""
        if self.brakes.disk_low:
            return "free disk space is low"
        return self.brakes.reasons()

    # -- scheduling --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, burst: bool = False) -> None:
        """Start due jobs until ``stop`` (or, in burst mode, until nothing is left)."""
        stopping = asyncio.ensure_future(stop.wait())
        stopping.add_done_callback(lambda _: self._wake.set())  # a stop ends any sleep
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self._start_due()
                    await self._rearm_cooled_down()
                    if burst and await self.idle():
                        return
                    await self._sleep_until_needed()
                except StateUnavailable as exc:
                    log.error("the state database failed; retrying", error=exc.message)
                    await _wait(stop, STATE_RETRY_SECONDS)
        finally:
            stopping.cancel()

    async def _start_due(self) -> None:
        share = max(0.1, min(1.0, self.brakes.budget_share()))
        limit = max(1, int(self.settings.max_in_flight * share))
        free = limit - len(self.active)
        if free <= 0 or self._stopped() is not None:
            return
        s = self.settings
        new_work = self.brakes.new_work() is None
        claims = await self.writer.call(
            self.writer.store.claim,
            self.clock(),
            free,
            list(self.active),
            s.instance,
            s.lease,
            new_work=new_work,
        )
        for claim in claims:
            job = claim.job
            if claim.taken_over and claim.previous_owner is not None:
                self.steps.taken_over[job.id] = claim.previous_owner
                log.warning(
                    "took over a job whose lease expired",
                    job_id=job.id,
                    path=job.path,
                    stage=job.stage.value,
                    previous_instance=claim.previous_owner,
                    lease_expired_at=claim.previous_lease,
                )
            self.active[job.id] = asyncio.create_task(self._drive(job), name=f"job-{job.id}")

    async def keep_leases(self, stop: asyncio.Event) -> None:
        """Renew the leases of the jobs in flight until ``stop``; a job another instance
        took over meanwhile is let go. Nothing is written while nothing runs, unless a
        shared database wants this instance's heartbeat."""
        while not stop.is_set():
            await _wait(stop, self.settings.lease / 3)
            if stop.is_set() or not (self.active or self.settings.shared):
                continue
            now = self.clock()
            seen = now if self.settings.shared else None
            try:
                lost = await self.writer.call(
                    self.writer.store.renew,
                    self.settings.instance,
                    list(self.active),
                    now + self.settings.lease,
                    seen,
                )
            except StateUnavailable as exc:
                log.error("cannot renew the leases", error=exc.message)
                continue
            for job_id in lost:
                task = self.active.get(job_id)
                if task is not None:
                    log.warning("another instance took this job over; letting go", job_id=job_id)
                    task.cancel()

    async def _rearm_cooled_down(self) -> None:
        s = self.settings
        if s.auto_retry_after <= 0 or self.clock() < self._next_rearm:
            return
        self._next_rearm = self.clock() + min(REARM_CHECK_SECONDS, max(0.2, s.auto_retry_after / 4))
        rearmed = await self.writer.call(
            self.writer.store.rearm_due,
            self.clock(),
            s.auto_retry_after,
            faults.REARM_CODES,
            s.auto_retry_limit,
            self.steps.output_kept,
        )
        for job in rearmed:
            log.info(
                "failed job re-armed after its cool-down",
                job_id=job.id,
                path=job.path,
                resumes_at=job.stage.value,
            )

    async def _sleep_until_needed(self) -> None:
        timeout: float | None = None
        if self.settings.auto_retry_after > 0:
            timeout = max(0.0, self._next_rearm - self.clock())
        if self._stopped() is None and len(self.active) < self.settings.max_in_flight:
            new_work = self.brakes.new_work() is None
            store, me = self.writer.store, self.settings.instance
            due = await self.writer.call(store.next_due, me, new_work=new_work)
            if due is not None:
                wait = max(0.0, due - self.clock())
                timeout = wait if timeout is None else min(timeout, wait)
            lifts = None if new_work else self.brakes.lifts_in()
            if lifts is not None:
                timeout = lifts if timeout is None else min(timeout, lifts)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    async def idle(self) -> bool:
        """Whether no job is running or waiting."""
        if self.active:
            return False
        return await self.writer.call(self.writer.store.unfinished_count) == 0

    async def shutdown(self, grace: float) -> None:
        """Let running steps finish for up to ``grace`` seconds, then cancel them.

        Cancelling is safe: every step is redone from the table on the next start.
        """
        waiting = [task for job_id, task in self.active.items() if self._waits_on_hub(job_id)]
        for task in waiting:
            task.cancel()  # only waiting on the hub: nothing to finish
        if self.active:
            _, pending = await asyncio.wait(list(self.active.values()), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        try:  # let the other instances take what is left at once, not after the lease
            await self.writer.call(self.writer.store.release, self.settings.instance, self.clock())
        except StateUnavailable as exc:
            log.error("cannot release the leases", error=exc.message)

    def _waits_on_hub(self, job_id: int) -> bool:
        job = self.commit.latest.get(job_id)
        return job is not None and job.stage is Stage.SUBMITTED

    # -- one job -----------------------------------------------------------------------

    async def _drive(self, job: Job) -> None:
        current_job.set(job.id)  # this task's requests carry the job id
        started = self.clock()
        timer = metrics.StageTimer(self.clock)
        self.commit.latest[job.id] = job
        try:
            while job.stage not in FINAL_STAGES:
                with timer.stage(job.stage):
                    job = await self.steps.for_stage(job.stage)(job)
            if job.stage is Stage.DONE:
                self.outcomes.completed(job, started, timer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._handle(self.commit.latest.get(job.id, job), exc)
        finally:
            last = self.commit.latest.pop(job.id, job)
            if last.stage in FINAL_STAGES:
                self.steps.forget(job.id)
            self.active.pop(job.id, None)
            self.wake()

    async def _handle(self, job: Job, exc: Exception) -> None:
        """Carry out what the fault policy decides for ``exc``."""
        if isinstance(exc, StateUnavailable):
            log.error("cannot record a job's step", job_id=job.id, error=exc.message)
            return  # the row keeps its stage; the job is redone once the database is back
        decision = faults.decide(exc, job, max_attempts=self.settings.max_attempts, rng=self.rng)
        decision = faults.cleaned(decision)  # no secret or control character goes further
        if getattr(decision, "code", None) == "internal":
            log.error("unexpected error in a job step", job_id=job.id, exc_info=exc)
        try:
            await self.outcomes.carry_out(job, decision)
        except LeaseLost:
            self.outcomes.let_go(job)
        except StateUnavailable as db_exc:
            # Cannot even record the outcome; the row keeps its stage and is redone later.
            log.error("cannot record a job's outcome", job_id=job.id, error=db_exc.message)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
