"""Progress: a live bar with the counts per status while ``once`` runs on a terminal.

Only for a person watching: the command line starts it when stderr is a terminal, and
never otherwise (logs and pipes get no carriage returns or bars). The counts are this
run's jobs: the unfinished ones and those that changed since the run started.
"""

from __future__ import annotations

import asyncio

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from daemon.jobs.model import Status
from daemon.jobs.views import Views

REFRESH_SECONDS = 0.25


def counts_text(counts: dict[str, int]) -> str:
    """``3 queued · 2 processing · 10 completed · 1 failed``."""
    return " · ".join(f"{counts.get(s.value, 0)} {s.value}" for s in Status)


def done_and_total(counts: dict[str, int]) -> tuple[int, int]:
    """(jobs final, jobs in this run)."""
    done = counts.get(Status.COMPLETED.value, 0) + counts.get(Status.FAILED.value, 0)
    return done, sum(counts.values())


class ProgressBar:
    """A rich progress bar on stderr showing counts per status."""

    def __init__(self, console: Console | None = None) -> None:
        self._progress = Progress(
            TextColumn("[bold]converting"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
        )
        self._task: TaskID | None = None

    def __enter__(self) -> ProgressBar:
        self._progress.start()
        self._task = self._progress.add_task("converting", total=None, counts="scanning")
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, counts: dict[str, int]) -> None:
        """Show ``counts``."""
        if self._task is None:
            return
        done, total = done_and_total(counts)
        self._progress.update(
            self._task, completed=done, total=total or None, counts=counts_text(counts)
        )


async def follow(views: Views, since: float, bar: ProgressBar) -> None:
    """Refresh ``bar`` from the state table until cancelled."""
    with bar:
        try:
            while True:
                bar.update(await asyncio.to_thread(views.counts_since, since))
                await asyncio.sleep(REFRESH_SECONDS)
        except asyncio.CancelledError:
            bar.update(await asyncio.to_thread(views.counts_since, since))  # the final counts
            raise
