"""Progress: a live bar with the counts per status while ``once`` runs on a terminal.

Only for a person watching: the command line starts it when stderr is a terminal, and
never otherwise (logs and pipes get no carriage returns or bars). The counts are this
run's jobs: the unfinished ones and those that changed since the run started.

The elapsed time comes before the counts, so a narrow terminal shortens the counts, never
the time. While the bar shows, whatever is written to stderr (the log) goes through the
bar's console line by line: each line is printed above the bar, whole (the terminal
wraps it, not a hard line break), and never mixed into the bar.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column
from rich.text import Text

from daemon.jobs.model import Status
from daemon.jobs.views import Views

REFRESH_SECONDS = 0.25
LABEL = "converting"
MAX_BAR, MIN_BAR = 40, 5  # columns of the bar itself
ELAPSED = 8  # "H:MM:SS" and a spare column for runs over ten hours


def counts_text(counts: dict[str, int]) -> str:
    """``3 queued · 2 processing · 10 completed · 1 failed``."""
    return " · ".join(f"{counts.get(s.value, 0)} {s.value}" for s in Status)


def fit(width: int, done: int, total: int, counts: str) -> tuple[int, str]:
    """(bar width, counts text) for a terminal ``width`` columns wide (pure): the label,
    ``done/total`` and the elapsed time always show whole; the bar gives way first (down
    to ``MIN_BAR``), then the counts are shortened with an ellipsis."""
    mofn = len(f"{done}/{total}") if total else 3
    room = width - len(LABEL) - mofn - ELAPSED - 4  # four single spaces between columns
    bar = max(MIN_BAR, min(MAX_BAR, room - len(counts)))
    space = max(0, room - bar)
    if len(counts) > space:
        counts = counts[: max(0, space - 1)] + "…" if space else ""
    return bar, counts


def done_and_total(counts: dict[str, int]) -> tuple[int, int]:
    """(jobs final, jobs in this run)."""
    done = counts.get(Status.COMPLETED.value, 0) + counts.get(Status.FAILED.value, 0)
    return done, sum(counts.values())


class LineProxy:
    """Stands in for ``sys.stderr`` while the bar shows: each complete line is printed
    by the bar's console above the bar (lines from several threads never mix)."""

    def __init__(self, console: Console, original: TextIO) -> None:
        self._console = console
        self._original = original
        self._pending = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        """Print the complete lines of ``text``; keep a partial one for later."""
        with self._lock:
            *lines, self._pending = (self._pending + text).split("\n")
            for line in lines:
                self._console.print(Text.from_ansi(line), soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        """Print a partial line too."""
        with self._lock:
            if self._pending:
                self._console.print(Text.from_ansi(self._pending), soft_wrap=True)
                self._pending = ""

    @property
    def rich_proxied_file(self) -> TextIO:
        """The terminal itself: where a rich console writes (never back into this)."""
        return self._original

    def isatty(self) -> bool:
        """As the terminal it stands in for."""
        return self._original.isatty()

    def fileno(self) -> int:
        """The terminal's descriptor."""
        return self._original.fileno()


class ProgressBar:
    """A rich progress bar on stderr showing counts per status."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._bar = BarColumn(bar_width=MAX_BAR)
        self._progress = Progress(
            TextColumn(f"[bold]{LABEL}"),
            self._bar,
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[counts]}", table_column=Column(no_wrap=True)),
            console=self.console,
            redirect_stdout=False,
            redirect_stderr=False,  # LineProxy does it, whole lines and thread-safe
        )
        self._task: TaskID | None = None
        self._stderr: TextIO | None = None

    def __enter__(self) -> ProgressBar:
        self._progress.start()
        self._task = self._progress.add_task("converting", total=None, counts="scanning")
        self._stderr = sys.stderr
        sys.stderr = LineProxy(self.console, sys.stderr)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stderr is not None:
            sys.stderr.flush()
            sys.stderr = self._stderr
            self._stderr = None
        self._progress.stop()

    def update(self, counts: dict[str, int]) -> None:
        """Show ``counts``."""
        if self._task is None:
            return
        done, total = done_and_total(counts)
        bar, text = fit(self.console.width, done, total, counts_text(counts))
        self._bar.bar_width = bar
        self._progress.update(self._task, completed=done, total=total or None, counts=text)

    def refresh(self) -> None:
        """Draw the bar now (else it is drawn several times a second)."""
        self._progress.refresh()


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
