"""Stalls: the inputs shown as stalled (the table's ``waiting`` list), written in batches.

Intake decides per file whether it has waited too long (``stability.stall``); this keeps
what is noted and writes the changes of a whole tick in a few statements: a scanner's
100,000 placeholders turning stalled together cost a hundred writer calls, not 100,000
commits, and ten log lines plus a count, not 100,000. A write that fails (a full disk
under the database) is kept and tried again at the next flush.
"""

from __future__ import annotations

from itertools import islice

from daemon.jobs.writer import Writer
from daemon.logs import get_logger

log = get_logger(component="intake")
NOTES_PER_CALL = 1000  # waiting rows written per writer call
LOGGED_PER_FLUSH = 10  # stalled inputs named in the log per flush; the rest are counted

Note = tuple[str, str, str, float]  # (path, code, reason, waiting since)


class Stalls:
    """The paths noted as stalled, and the notes and clears still to be written."""

    def __init__(self, db: Writer) -> None:
        self.db = db
        self.noted: set[str] = set()
        self._pending: dict[str, Note] = {}
        self._clears: set[str] = set()

    def __contains__(self, rel: object) -> bool:
        return rel in self.noted or rel in self._pending

    def judge(self, rel: str, stalled: tuple[str, str] | None, since: float) -> bool:
        """Note ``rel`` as stalled with (code, reason), or clear it (None); return whether
        it shows as stalled once written."""
        if stalled is None:
            self.forget(rel)
            return False
        if rel not in self:
            self._pending[rel] = (rel, stalled[0], stalled[1], since)
            self._clears.discard(rel)
        return True

    def forget(self, rel: str) -> None:
        """``rel`` is stalled no more (taken, changed or gone)."""
        self._pending.pop(rel, None)
        if rel in self.noted:
            self._clears.add(rel)

    async def flush(self, now: float) -> None:
        """Write what changed; StateUnavailable leaves the rest for the next flush."""
        if self._clears:
            clears = list(self._clears)
            await self.db.call(self.db.store.clear_waiting, clears)
            self._clears.difference_update(clears)
            self.noted.difference_update(clears)
        written: list[Note] = []
        try:
            while self._pending:
                batch = list(islice(self._pending.values(), NOTES_PER_CALL))
                await self.db.call(self.db.store.note_waiting_many, batch, now)
                for note in batch:
                    del self._pending[note[0]]
                    self.noted.add(note[0])
                written += batch
        finally:
            _log_noted(written, now)


def _log_noted(notes: list[Note], now: float) -> None:
    for rel, code, reason, since in notes[:LOGGED_PER_FLUSH]:
        waited = round(now - since)
        log.warning("an input is stalled", path=rel, code=code, reason=reason, waited=waited)
    if len(notes) > LOGGED_PER_FLUSH:
        log.warning(
            "more inputs are stalled; `ldx-hotfolder status` lists them by reason",
            count=len(notes) - LOGGED_PER_FLUSH,
        )
