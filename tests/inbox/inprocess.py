"""An intake in this process over a real state database, with a clock the test moves.

No worker runs: the tests see what intake queues, and play the worker's part (claiming,
finishing a job) through the same store.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.inbox.enqueue import Enqueuer
from daemon.inbox.filters import NameFilter
from daemon.inbox.intake import Intake, IntakeSettings
from daemon.inbox.routing import Router
from daemon.inbox.stability import Patience
from daemon.jobs.store import Store
from daemon.jobs.writer import Writer
from daemon.outbox.permissions import OutputPermissions

DEFAULTS = {"engine": "ki/ocr", "language": "jpn", "output_format": "docx", "on_success": "keep"}


@dataclass
class Clock:
    """A clock that moves only when told."""

    now: float = 1_000_000.0
    moves: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock on."""
        self.now += seconds


@asynccontextmanager
async def intake_of(
    folders: dict[str, Path], clock: Clock, patience: Patience
) -> AsyncIterator[Intake]:
    """An intake of ``folders`` with its own writer, closed afterwards."""
    writer = Writer(Store(f"sqlite:///{folders['state'] / 'state.db'}"))
    inbox = folders["inbox"].absolute()
    settings = IntakeSettings(
        inbox=inbox,
        outbox=folders["outbox"].absolute(),
        router=Router(inbox, [], DEFAULTS),
        perms=OutputPermissions(),
        name_filter=NameFilter(),
        patience=patience,
    )
    enqueuer = Enqueuer(writer, settings.outbox, settings.router, settings.perms, clock=clock)
    intake = Intake(settings, writer, enqueuer, lambda: None, clock=clock)
    try:
        await intake.load_known()
        yield intake
    finally:
        writer.close()


def table(folders: dict[str, Path], name: str = "jobs") -> list[dict[str, Any]]:
    """Every row of a table of the state database."""
    with sqlite3.connect(folders["state"] / "state.db") as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(f"SELECT * FROM {name} ORDER BY rowid")]
