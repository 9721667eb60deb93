"""Outcomes: what the fault policy decides for a job, carried out.

Each decision of ``faults.decide`` becomes one commit as the job's holder: a retry
deferred with its delay, a hold, a job sent back to an earlier stage, a withdrawal
(intake takes the file again), or a failure with its error file, its log line and its
hooks. A job whose output is published but whose input cannot be deleted or archived is
done all the same (failing it would pay again on retry).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from daemon.advice import os_error_text
from daemon.jobs.model import Job, Stage
from daemon.jobs.writer import Writer
from daemon.logs import get_logger
from daemon.ops import metrics
from daemon.outbox import publish as outbox
from daemon.outbox.permissions import OutputPermissions
from daemon.pipeline import faults
from daemon.pipeline.commit import Commit
from daemon.pipeline.hooks import HookEvent, Hooks

log = get_logger(component="worker")


@dataclass(frozen=True)
class OutcomeSettings:
    """The values carrying out outcomes needs."""

    inbox: Path
    outbox: Path
    instance: str
    perms: OutputPermissions
    on_success: str = "keep"
    auto_retry_after: float = 1800.0
    auto_retry_limit: int = 3


class Outcomes:
    """Carries out decisions; see the module docstring."""

    def __init__(
        self,
        settings: OutcomeSettings,
        writer: Writer,
        commit: Commit,
        *,
        hooks: Hooks | None = None,
        forget: Callable[[int], None] = lambda job_id: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``forget`` drops what the steps remember of a job that is final or gone."""
        self.settings = settings
        self.writer = writer
        self.commit = commit
        self.hooks = hooks
        self.forget = forget
        self.clock = clock
        self.on_input_changed: Callable[[str], None] = lambda path: None
        self.on_disk_full: Callable[[], None] = lambda: None
        self._disk_full_said = False

    def completed(self, job: Job, started: float, timer: metrics.StageTimer) -> None:
        """A job reached done: count it, say so in one line, tell the hooks."""
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

    async def carry_out(self, job: Job, decision: faults.Decision) -> None:
        """Do what ``decision`` says for ``job`` (committed as its holder)."""
        if isinstance(decision, faults.LetGo):
            self.let_go(job)
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

    def let_go(self, job: Job) -> None:
        """Another instance holds the job now: say so, change nothing."""
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
        policy = job.on_success or self.settings.on_success
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
        now = self.clock()
        text = outbox.error_text(
            job.path, code, message, now, job.id, auto_retry_at=self._auto_retry_at(failed, now)
        )
        try:
            await asyncio.to_thread(
                outbox.write_error_file, self.settings.outbox, job.path, text, self.settings.perms
            )
        except OSError as err:
            log.error("cannot write the error file", job_id=job.id, error=os_error_text(err))
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

    def _auto_retry_at(self, job: Job, now: float) -> float | None:
        """When the automatic re-arm takes ``job`` up again (None: it never will)."""
        s = self.settings
        if s.auto_retry_after <= 0 or job.error_code not in faults.REARM_CODES:
            return None
        return None if job.rearms >= s.auto_retry_limit else now + s.auto_retry_after

    async def _withdraw(self, job: Job, withdraw: faults.Withdraw) -> None:
        """The input changed or vanished before its upload counted: drop the job (nothing
        was converted, so nothing is lost) and let intake take the file again once stable;
        the new version then converts once, as a new job."""
        await self.writer.call(self.writer.store.withdraw, job.id, self.settings.instance)
        self.forget(job.id)
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
