"""Backoff: how long to wait before retrying a transient fault (pure).

Capped exponential backoff with full jitter (the AWS architecture blog's recommendation
for many clients sharing one server), with the server's ``Retry-After`` as a floor (up
to an hour).
"""

from __future__ import annotations

import random

BASE_SECONDS = 1.0
CAP_SECONDS = 300.0
# A Retry-After is honoured up to an hour: a longer one (a broken proxy, "inf") would
# leave a job waiting for days while it looks merely slow.
RETRY_AFTER_CAP_SECONDS = 3600.0


def retry_delay(
    attempt: int,
    *,
    retry_after: float | None = None,
    rng: random.Random | None = None,
    base: float = BASE_SECONDS,
    cap: float = CAP_SECONDS,
) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry)."""
    ceiling = min(cap, base * 2 ** max(attempt - 1, 0))
    jittered = (rng or random).uniform(0.0, ceiling)
    if retry_after is not None:
        return max(jittered, min(retry_after, RETRY_AFTER_CAP_SECONDS))
    return jittered
