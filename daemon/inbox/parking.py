"""Parking: quiet candidates that wait (placeholders, incomplete or unreadable files).

A scanner may leave thousands of empty placeholders in the inbox, and they may wait
for ever. Looking at each on every tick costs a core; a parked file costs one dict entry
and nothing per tick. It is looked at again only when something can have changed: at
the time it is due (``next_look``: to show as stalled, or to give up on it), at a
rescan or a watcher event that finds its signature changed, or when an event says it
was removed.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator

from daemon.inbox.stability import Sighting


class Parking:
    """Parked sightings by stored path, with the times they are due again."""

    def __init__(self) -> None:
        self._parked: dict[str, tuple[Sighting, float]] = {}
        self._due: list[tuple[float, str]] = []  # a heap; entries of unparked paths go stale

    def __len__(self) -> int:
        return len(self._parked)

    def __contains__(self, rel: object) -> bool:
        return rel in self._parked

    def get(self, rel: str) -> Sighting | None:
        """The parked sighting of ``rel``, or None."""
        found = self._parked.get(rel)
        return None if found is None else found[0]

    def park(self, rel: str, sighting: Sighting, due: float) -> None:
        """Park ``rel`` until ``due`` (inf: until a change or a rescan moves it)."""
        self._parked[rel] = (sighting, due)
        if due < math.inf:
            heapq.heappush(self._due, (due, rel))

    def unpark(self, rel: str) -> Sighting | None:
        """Take ``rel`` out; its sighting, or None when it was not parked."""
        found = self._parked.pop(rel, None)
        return None if found is None else found[0]

    def due(self, now: float) -> list[tuple[str, Sighting]]:
        """Take out and return every parked sighting due by ``now``."""
        taken = []
        while self._due and self._due[0][0] <= now:
            due, rel = heapq.heappop(self._due)
            found = self._parked.get(rel)
            if found is not None and found[1] == due:  # else a stale entry
                del self._parked[rel]
                taken.append((rel, found[0]))
        return taken

    def next_due(self) -> float:
        """When the next parked sighting is due (inf when none is)."""
        while self._due:
            due, rel = self._due[0]
            found = self._parked.get(rel)
            if found is not None and found[1] == due:
                return due
            heapq.heappop(self._due)  # stale: drop it now
        return math.inf

    def items(self) -> Iterator[tuple[str, Sighting]]:
        """(path, sighting) of every parked file (a copy: parking may change meanwhile)."""
        return iter([(rel, found[0]) for rel, found in self._parked.items()])

    def keep_only(self, seen: set[str]) -> list[str]:
        """Forget parked paths a full scan no longer found; return them."""
        gone = [rel for rel in self._parked if rel not in seen]
        for rel in gone:
            del self._parked[rel]
        return gone
