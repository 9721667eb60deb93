"""Circuit breaker: stop sending new work to a hub that keeps failing (pure, time passed in).

After ``threshold`` transient failures in a row the breaker opens: no new job is started
for ``cooldown`` seconds. Then it is half-open: work starts again, and the first outcome
closes it (a success) or opens it for another, longer cooldown (a failure). Jobs already
running keep their own backoff; the breaker only keeps a failing hub from being flooded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

MAX_COOLDOWN = 300.0


@dataclass(frozen=True)
class Breaker:
    """The breaker's state; every transition returns a new value."""

    threshold: int = 5
    cooldown: float = 15.0
    failures: int = 0
    open_until: float | None = None
    trips: int = 0

    def allows(self, now: float) -> bool:
        """Whether new work may start now."""
        return self.open_until is None or now >= self.open_until

    def is_open(self, now: float) -> bool:
        """Whether the breaker currently holds new work back."""
        return not self.allows(now)

    def success(self) -> Breaker:
        """A call to the hub succeeded: close."""
        if self.failures == 0 and self.open_until is None:
            return self
        return replace(self, failures=0, open_until=None, trips=0)

    def failure(self, now: float) -> Breaker:
        """A call to the hub failed transiently: count it, and open at the threshold."""
        failures = self.failures + 1
        if failures < self.threshold:
            return replace(self, failures=failures)
        wait = min(MAX_COOLDOWN, self.cooldown * 2**self.trips)
        return replace(self, failures=0, open_until=now + wait, trips=self.trips + 1)
