"""The request budget: one rate for every request the daemon sends to the hub.

The hub limits requests per key (the vendor's scripts mention about 100 a minute), and
every request counts, whatever the job: uploads, creations, polls, downloads, listings.
``Budget`` is a token bucket shared by all of them: at most ``per_minute`` requests a
minute, in bursts of a few. A 429 slows the whole daemon, not one job: every request
waits out the ``Retry-After`` (or a backoff when the hub gives none), the rate is halved,
and it climbs back to the configured one gradually while answers come (additive
increase, multiplicative decrease, as TCP does). The decisions are pure functions of
the state and the time; ``RequestBudget`` only sleeps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

BURST = 4.0  # requests that may go at once after a quiet spell
MIN_RATE = 6.0  # per minute: a 429 storm never stops the daemon altogether
RECOVERY_MINUTES = 5.0  # from the floor back to the configured rate, with answers flowing
DEFAULT_BACKOFF = 5.0  # seconds every request waits after a 429 that names no Retry-After
MAX_HOLD = 600.0  # a Retry-After is honoured up to ten minutes, for all requests


@dataclass(frozen=True)
class Bucket:
    """The budget's state: the rate now, the tokens left, and a hold after a 429."""

    limit: float  # per minute, as configured (0: no limit)
    rate: float  # per minute, now
    tokens: float
    stamp: float  # when ``tokens`` was counted
    hold_until: float = 0.0  # no request before this (Retry-After)

    @classmethod
    def full(cls, limit: float, now: float) -> Bucket:
        """A bucket at the configured rate with a full burst."""
        return cls(limit, limit, min(BURST, max(limit, 1.0)), now)

    def refill(self, now: float) -> Bucket:
        """The tokens earned since ``stamp`` (negative tokens: requests already waiting)."""
        earned = max(0.0, now - self.stamp) * self.rate / 60.0
        return replace(self, tokens=min(BURST, self.tokens + earned), stamp=now)


def wait_for_slot(bucket: Bucket, now: float) -> tuple[float, Bucket]:
    """(seconds to wait, bucket after taking a token at the end of that wait)."""
    if bucket.limit <= 0:
        return max(0.0, bucket.hold_until - now), bucket
    start = max(now, bucket.hold_until, bucket.stamp)
    taken = bucket.refill(start).tokens - 1.0  # below 0: requests queued for future tokens
    wait = max(0.0, -taken) * 60.0 / bucket.rate
    return start + wait - now, replace(bucket, tokens=taken, stamp=start)


def after_refusal(bucket: Bucket, now: float, retry_after: float | None) -> Bucket:
    """A 429: every request waits ``retry_after`` (or a default backoff), rate halved."""
    hold = min(MAX_HOLD, retry_after if retry_after is not None else DEFAULT_BACKOFF)
    rate = max(MIN_RATE, bucket.rate / 2) if bucket.limit > 0 else bucket.rate
    until = max(bucket.hold_until, now + hold)
    return replace(bucket, rate=rate, tokens=0.0, stamp=now, hold_until=until)


def after_answer(bucket: Bucket) -> Bucket:
    """An answer that was no 429: the rate climbs back one step towards the limit."""
    if bucket.limit <= 0 or bucket.rate >= bucket.limit:
        return bucket
    step = (bucket.limit - MIN_RATE) / (RECOVERY_MINUTES * bucket.limit)
    return replace(bucket, rate=min(bucket.limit, bucket.rate + max(step, 0.1)))


class RequestBudget:
    """The token bucket every hub request takes a token from (``take``)."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic) -> None:
        """``per_minute`` 0 means no limit of the daemon's own (a 429 still holds all)."""
        self._clock = clock
        self._bucket = Bucket.full(per_minute, clock())
        self.refused = 0  # 429 answers seen (metrics, benchmarks)

    @property
    def rate(self) -> float:
        """Requests per minute allowed now."""
        return self._bucket.rate

    @property
    def share(self) -> float:
        """The rate now as a share of the configured one (1.0 when unlimited)."""
        limit = self._bucket.limit
        return 1.0 if limit <= 0 else self._bucket.rate / limit

    def held_for(self) -> float:
        """Seconds every request still waits after a 429."""
        return max(0.0, self._bucket.hold_until - self._clock())

    async def take(self) -> None:
        """Wait for this request's turn."""
        delay, self._bucket = wait_for_slot(self._bucket, self._clock())
        while delay > 0:
            await asyncio.sleep(delay)
            delay = self.held_for()  # a 429 that came meanwhile holds this request too

    def answered(self) -> None:
        """The hub answered (not with a 429)."""
        self._bucket = after_answer(self._bucket)

    def refusal(self, retry_after: float | None) -> None:
        """The hub answered 429: slow everything down."""
        self.refused += 1
        self._bucket = after_refusal(self._bucket, self._clock(), retry_after)
