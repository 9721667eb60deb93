"""Stability: when a file in the inbox counts as completely written (pure functions).

A file is taken once its signature (size, mtime, inode) has not changed for the quiet
period. There is no give-up cliff: a file that keeps changing is waited for as long as
it changes. Three kinds of file wait although they are quiet:

- an empty file (a scanner's placeholder) waits for content, for ever in the daemon;
- a file whose content check found it incomplete (a PDF without ``%%EOF``, a TIFF whose
  pages point past its end...) waits for the rest, and fails with that reason once it
  has stayed unchanged for ``incomplete_timeout``;
- a file the daemon may not read waits the same way, with its own code, for a person
  to fix its permissions.

Any of them shows as *stalled* once it has waited ``stalled_after``. While such a file
waits quietly, intake does not look at it on every tick (it is *parked*): only at the
time ``next_look`` names, at a rescan, or when an event names it. ``once`` runs are
impatient: they cannot wait for a writer (or a person) that may never come, so such a
file fails as soon as it has been quiet for the quiet period.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Signature:
    """What a stat call says about a file, enough to notice any change."""

    size: int
    mtime_ns: int
    inode: int


@dataclass(frozen=True, slots=True)
class Sighting:
    """A signature, since when it is unchanged, and what holds the file back."""

    signature: Signature
    since: float  # the signature has been unchanged since then
    first_seen: float | None = None  # when intake first saw the file (None: same as since)
    problem: str | None = None  # why a quiet file cannot be taken yet
    problem_code: str = "incomplete"  # the code it shows (and fails) with: or "unreadable"

    @property
    def waiting_since(self) -> float:
        """When intake started waiting for this file."""
        return self.since if self.first_seen is None else self.first_seen


@dataclass(frozen=True)
class Patience:
    """How long intake waits, from the settings."""

    quiet_period: float
    stalled_after: float = 300.0
    incomplete_timeout: float = 3600.0
    impatient: bool = False  # ``once``: a file held back ends after the quiet period


class Verdict(enum.Enum):
    """What intake does with a candidate on this tick."""

    WAIT = "wait"  # still changing, empty, or incomplete (or unreadable) within its time
    CHECK = "check"  # quiet: open it, check type and completeness, then queue it
    GIVE_UP = "give_up"  # empty, incomplete or unreadable too long: check again, then fail it


def observe(previous: Sighting | None, signature: Signature, now: float) -> Sighting:
    """Record a new look at a file: keep ``since`` only when nothing changed."""
    if previous is None:
        return Sighting(signature, now, now)
    if previous.signature == signature:
        return previous
    return Sighting(signature, now, previous.waiting_since)


def with_problem(sighting: Sighting, problem: str | None, code: str = "incomplete") -> Sighting:
    """The sighting with what holds it back recorded (None: nothing, as far as we know)."""
    return dataclasses.replace(sighting, problem=problem, problem_code=code)


def quiet_for(sighting: Sighting, now: float) -> float:
    """Seconds the file has been unchanged."""
    return max(0.0, now - sighting.since)


def verdict(sighting: Sighting, now: float, patience: Patience) -> Verdict:
    """Decide what to do with a candidate now."""
    quiet = quiet_for(sighting, now)
    if quiet < patience.quiet_period:
        return Verdict.WAIT
    if sighting.signature.size == 0:
        return Verdict.GIVE_UP if patience.impatient else Verdict.WAIT
    if sighting.problem is None:
        return Verdict.CHECK
    if patience.impatient or quiet >= patience.incomplete_timeout:
        return Verdict.GIVE_UP
    return Verdict.WAIT


def stall(sighting: Sighting, now: float, patience: Patience) -> tuple[str, str] | None:
    """(code, reason) when the file has waited too long to show as normal, else None."""
    if now - sighting.waiting_since < patience.stalled_after:
        return None
    if sighting.signature.size == 0:
        return "empty_file", "the file is still empty (0 bytes): a placeholder nobody filled"
    if sighting.problem is not None and quiet_for(sighting, now) >= patience.quiet_period:
        return sighting.problem_code, sighting.problem
    return None


def is_parkable(sighting: Sighting, now: float, patience: Patience) -> bool:
    """Whether a file that must wait is quiet, so only time or a change can move it on."""
    return quiet_for(sighting, now) >= patience.quiet_period


def next_look(sighting: Sighting, patience: Patience, *, stalled: bool) -> float:
    """When a parked file needs looking at again: to show it as stalled, or to give up
    on it (an empty file waits for ever: inf once it shows as stalled)."""
    due = [] if stalled else [sighting.waiting_since + patience.stalled_after]
    if sighting.signature.size > 0 and sighting.problem is not None:
        due.append(sighting.since + patience.incomplete_timeout)
    return min(due, default=math.inf)
