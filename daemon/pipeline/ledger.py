"""The hub ledger: what the hub holds for each job and what it billed, committed as the
pipeline learns it.

Every remote job's last known state (its output and that output's expiry) goes to
``remote_jobs``, the pages the hub billed for it to ``usage`` (once, whatever happens
after), and the page budget's running sums and the pages metric follow at once, so they
never drift from the database.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from daemon.jobs.model import Job, RemoteRecord
from daemon.jobs.writer import Writer
from daemon.ops import metrics
from daemon.pipeline.budget import PageBudget, PageLimits


def folder_of(path: str) -> str:
    """The first folder below the inbox of an input path ("" at the top)."""
    head, sep, _ = path.partition("/")
    return head if sep else ""


class HubLedger:
    """Records remote outcomes and billing through the single writer."""

    def __init__(
        self,
        writer: Writer,
        *,
        pages: PageBudget | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.writer = writer
        self.pages = pages or PageBudget(PageLimits())  # the page budget; none by default
        self.clock = clock

    async def record(
        self,
        job: Job,
        remote_job_id: str,
        *,
        status: str,
        output: str | None = None,
        expires: float | None = None,
        pages: int | None = None,
        error: str | None = None,
    ) -> None:
        """Update what the hub holds for ``remote_job_id`` (and note what it billed)."""
        record = RemoteRecord(
            job.id,
            remote_job_id,
            job.remote_file_id or "",
            None,
            status,
            output,
            expires,
            pages,
            error,
        )
        store, now = self.writer.store, self.clock()

        def save() -> bool:
            # The record has no creation time: the row keeps the one noted at creation.
            store.record_remote(record, now)
            return store.record_usage(job, record, folder_of(job.path), now)

        billed = await self.writer.call(save)
        # At once after the commit: the budget's sums stay in step with the database.
        self.pages.settle(job.id, pages if billed else None)
        if billed and pages is not None:
            metrics.record_pages(folder_of(job.path), pages)
