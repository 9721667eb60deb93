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
from pathlib import Path

from daemon.errors import LeaseLost, StateUnavailable
from daemon.hub.client import current_job
from daemon.jobs.model import FINAL_STAGES, Job, Stage
from daemon.jobs.writer import Writer
from daemon.logs import get_logger
from daemon.ops import metrics
from daemon.outbox import publish as outbox
from daemon.outbox.permissions import OutputPermissions
from daemon.pipeline import faults
from daemon.pipeline.commit import Commit
from daemon.pipeline.hooks import HookEvent, Hooks
from daemon.pipeline.steps import Steps

log = get_logger(component="worker")
STATE_RETRY_SECONDS = 5.0
REARM_CHECK_SECONDS = 60.0


@dataclass(frozen=True)
class WorkerSettings:
    """The values the worker needs (from the configuration, read once)."""

    inbox: Path
    outbox: Path
    instance: str
    perms: OutputPermissions
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
        *,
        hooks: Hooks | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.writer = writer
        self.steps = steps
        self.hooks = hooks
        self.clock = clock
        self.rng = rng or random.Random()
        self.brakes = Brakes()
        self.commit = commit
        self.active: dict[int, asyncio.Task[None]] = {}
        self.on_input_changed: Callable[[str], None] = lambda path: None
        self.on_disk_full: Callable[[], None] = lambda: None
        self._wake = asyncio.Event()
        self._next_rearm = 0.0
        self._disk_full_said = False

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
                self._completed(job, started, timer)
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

    def _completed(self, job: Job, started: float, timer: metrics.StageTimer) -> None:
        metrics.record_finished("completed")
        if self._disk_full_said:
            self._disk_full_said = False
            log.info("outputs are written again")
        log.info(
            "job completed",
            job_id=job.id,
            path=job.path,
            output=job.output,
            seconds=round(self.clock() - started, 3),
            stages=timer.summary(),
            remote_job_id=job.remote_job_id,
        )
        self._tell_hooks(job)

    async def _handle(self, job: Job, exc: Exception) -> None:
        """Carry out what the fault policy decides for ``exc``."""
        if isinstance(exc, StateUnavailable):
            log.error("cannot record a job's step", job_id=job.id, error=exc.message)
            return  # the row keeps its stage; the job is redone once the database is back
        decision = faults.decide(exc, job, max_attempts=self.settings.max_attempts, rng=self.rng)
        if getattr(decision, "code", None) == "internal":
            log.error("unexpected error in a job step", job_id=job.id, exc_info=exc)
        try:
            await self._carry_out(job, decision)
        except LeaseLost:
            self._let_go(job)
        except StateUnavailable as db_exc:
            # Cannot even record the outcome; the row keeps its stage and is redone later.
            log.error("cannot record a job's outcome", job_id=job.id, error=db_exc.message)

    async def _carry_out(self, job: Job, decision: faults.Decision) -> None:
        if isinstance(decision, faults.LetGo):
            self._let_go(job)
        elif isinstance(decision, faults.Retry):
            await self._defer(job, decision)
        elif isinstance(decision, faults.Hold):
            await self._hold(job, decision)
        elif isinstance(decision, faults.Send):
            await self._send_back(job, decision)
        elif isinstance(decision, faults.Withdraw):
            await self._withdraw(job, decision)
        elif job.stage is Stage.PUBLISHED:  # the output is out: only the input is stuck
            await self._leave_input(job, decision.message)
        else:
            await self._fail(job, decision.code, decision.message)

    def _let_go(self, job: Job) -> None:
        log.warning(
            "another instance took this job over (this one's lease expired); letting go",
            job_id=job.id,
            path=job.path,
        )

    async def _defer(self, job: Job, retry: faults.Retry) -> None:
        attempts = job.attempts + 1 if retry.counts or retry.grows else job.attempts
        metrics.record_error(retry.code, "retry", job.stage)
        log.warning(
            "step will be retried",
            job_id=job.id,
            path=job.path,
            stage=job.stage.value,
            error=retry.message,
            retry_in=round(retry.delay, 2),
            attempt=attempts,
        )
        await self.commit(
            job,
            job.stage,
            attempts=attempts,
            next_attempt_at=self.clock() + retry.delay,
            error_code=retry.code,
            error_message=retry.message,
        )

    async def _hold(self, job: Job, hold: faults.Hold) -> None:
        if hold.code == "disk_full":
            self.on_disk_full()  # the monitor pauses intake and new jobs
            if not self._disk_full_said:
                self._disk_full_said = True
                log.error("no space left on the disk; outputs wait until space is freed")
        await self.commit(
            job,
            job.stage,
            next_attempt_at=self.clock() + hold.delay,
            error_code=hold.code,
            error_message=hold.message,
        )

    async def _send_back(self, job: Job, send: faults.Send) -> None:
        log.warning(
            "the hub failed the job; converting it again",
            job_id=job.id,
            path=job.path,
            code=send.code,
            reason=send.message,
            retry_in=round(send.delay, 1),
        )
        await self.commit(
            job,
            send.stage,
            remote_job_id=None,
            output_file_id=None,
            next_attempt_at=self.clock() + send.delay,
            error_code=send.code,
            error_message=send.message,
        )

    async def _leave_input(self, job: Job, reason: str) -> None:
        """The output is published but the input cannot be deleted or archived: the job
        is done all the same (failing it would convert and pay again on retry), and the
        row and the log say why the input is still in the inbox."""
        policy = job.on_success or self.steps.settings.on_success
        verb = "deleted" if policy == "delete" else "archived"
        message = (
            f"the output {job.output} is published, but the input could not be {verb} "
            f"({reason}; tried {job.attempts + 1} times); it stays in the inbox"
        )
        done = await self.commit(
            job, Stage.DONE, attempts=0, error_code="input_kept", error_message=message
        )
        metrics.record_error("input_kept", "fail")
        metrics.record_finished("completed")
        where = "its folder" if verb == "deleted" else "its folder and archive_dir"
        log.error(
            f"job completed, but its input could not be {verb}",
            job_id=job.id,
            path=job.path,
            output=job.output,
            reason=reason,
            fix=f"check that the daemon may write to {where}; the input is not converted "
            "again, so remove or move it by hand",
        )
        self._tell_hooks(done)

    async def _fail(self, job: Job, code: str, message: str) -> None:
        failed = await self.commit(job, Stage.FAILED, error_code=code, error_message=message)
        text = outbox.error_text(job.path, code, message, self.clock(), job.id)
        try:
            await asyncio.to_thread(
                outbox.write_error_file, self.settings.outbox, job.path, text, self.settings.perms
            )
        except OSError as err:
            log.error("cannot write the error file", job_id=job.id, error=str(err))
        metrics.record_error(code, "fail")
        metrics.record_finished("failed")
        log.error(
            "job failed",
            job_id=failed.id,
            path=failed.path,
            code=code,
            reason=message,
            stages=metrics.stage_summary(),
            remote_job_id=failed.remote_job_id,
        )
        self._tell_hooks(failed)

    async def _withdraw(self, job: Job, withdraw: faults.Withdraw) -> None:
        """The input changed or vanished before its upload counted: drop the job (nothing
        was converted, so nothing is lost) and let intake take the file again once stable;
        the new version then converts once, as a new job."""
        await self.writer.call(self.writer.store.withdraw, job.id, self.settings.instance)
        self.steps.forget(job.id)
        log.info(
            "input changed before it was converted; job withdrawn, the file is taken again "
            "once it is stable",
            job_id=job.id,
            path=job.path,
            reason=withdraw.message,
        )
        self.on_input_changed(job.path)

    def _tell_hooks(self, job: Job) -> None:
        if self.hooks is None or not self.hooks.enabled:
            return
        s = self.settings
        output = s.outbox / job.output if job.output and job.stage is Stage.DONE else None
        self.hooks.fire(
            HookEvent(
                job_id=job.id,
                status=job.status.value,
                input_path=s.inbox / job.path,
                input_rel=job.path,
                output_path=output,
                output_rel=job.output if output is not None else None,
                remote_job_id=job.remote_job_id,
                error_code=job.error_code,
                error_message=job.error_message,
                rule=job.rule,
            )
        )


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
