"""Stability: when a file in the inbox counts as completely written (pure functions).

A file is taken once its signature (size, mtime, inode) has not changed for the quiet
period. A file that keeps changing is waited for as long as it changes; an empty file
(a scanner's placeholder) is never taken while it stays empty.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Signature:
    """What a stat call says about a file, enough to notice any change."""

    size: int
    mtime_ns: int
    inode: int


@dataclass(frozen=True)
class Sighting:
    """A signature and since when it has been seen unchanged."""

    signature: Signature
    since: float


def observe(previous: Sighting | None, signature: Signature, now: float) -> Sighting:
    """Record a new look at a file: keep ``since`` only when nothing changed."""
    if previous is not None and previous.signature == signature:
        return previous
    return Sighting(signature, now)


def is_stable(sighting: Sighting, now: float, quiet_period: float) -> bool:
    """Whether the file is unchanged for the quiet period and not an empty placeholder."""
    return sighting.signature.size > 0 and now - sighting.since >= quiet_period
