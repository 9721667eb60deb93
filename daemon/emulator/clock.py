"""The emulator's clock: real UTC time plus a manual offset that tests can advance.

Every deadline in the emulator (file and job expiry, queue and processing times, rate-limit
windows) is measured on this clock, so a test fast-forwards a day with ``advance`` instead
of waiting for it. Listeners hear of every advance, so that long polls wake at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta


class Clock:
    """Aware UTC time, shifted forward by whatever ``advance`` added; thread-safe."""

    def __init__(self, offset: float = 0.0) -> None:
        if offset < 0:
            raise ValueError("a clock offset cannot be negative")
        self._offset = timedelta(seconds=offset)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    def now(self) -> datetime:
        """Return the current emulated time, an aware datetime in UTC."""
        with self._lock:
            offset = self._offset
        return datetime.now(UTC) + offset

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``; time never goes back."""
        if not seconds >= 0:  # also rejects NaN
            raise ValueError(f"the clock only moves forward, got {seconds!r} seconds")
        with self._lock:
            self._offset += timedelta(seconds=seconds)
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (from the advancing thread) after every ``advance``."""
        with self._lock:
            self._listeners.append(listener)

    @property
    def offset(self) -> float:
        """Seconds the clock runs ahead of real time."""
        with self._lock:
            return self._offset.total_seconds()
