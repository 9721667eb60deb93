"""Committing a job's progress: every stage change goes through the single writer, as the
job's holder, and renews (or gives up) its lease.

Shared by the worker (outcomes) and the steps (results), so that a failure later in a
step is handled from the stage last committed (``latest``), never from where the step
began.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from daemon.jobs.model import FINAL_STAGES, Job, Stage
from daemon.jobs.writer import Writer


class Commit:
    """``await commit(job, stage, **changes)``: the job as committed."""

    def __init__(
        self,
        writer: Writer,
        *,
        instance: str,
        lease: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.writer = writer
        self.instance = instance
        self.lease = lease
        self.clock = clock
        self.latest: dict[int, Job] = {}  # each running job as last committed

    async def __call__(
        self, job: Job, stage: Stage, *, along: Callable[[], object] | None = None, **changes: Any
    ) -> Job:
        """Commit the move; ``along`` is another store call made in the same transaction
        (what the hub holds, recorded together with the stage it makes true)."""
        now = self.clock()
        # Every change renews the lease; a deferred or final job is let go at once.
        let_go = stage in FINAL_STAGES or changes.get("next_attempt_at") is not None
        changes["lease_until"] = None if let_go else now + self.lease
        advance = functools.partial(
            self.writer.store.advance,
            job.id,
            stage,
            now,
            current=job,
            owner=self.instance,
            **changes,
        )
        if along is not None:
            first = along

            def both() -> Job:
                first()
                return advance()

            new = await self.writer.call(both)
        else:
            new = await self.writer.call(advance)
        if job.id in self.latest:
            self.latest[job.id] = new
        return new
