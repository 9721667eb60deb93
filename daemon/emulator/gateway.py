"""The gateway's decisions: API keys, the knobs in force, rate windows, outages, refused
routes, and the faults drawn for a request or a job.

A real hub sits behind a gateway (Zuplo) whose policies answer before the backend does;
the emulator keeps those decisions here, apart from the files and jobs they guard. The
faults that strike the backend's work (failed jobs, lost or dropped creates, stalled
downloads) are drawn here too: they share the knobs and the seeded ``random.Random``
streams, one per client job, so that a run's luck does not depend on how the clients'
requests interleave. Its one lock is only ever held briefly, so the HTTP layer may call
it straight from its event loop.
"""

from __future__ import annotations

import enum
import math
import random
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from daemon.emulator.clock import Clock
from daemon.emulator.knobs import Faults, Knobs
from daemon.emulator.ledger import Ledger
from daemon.emulator.settings import HubSettings

_RATE_WINDOW = timedelta(minutes=1)


def bearer_key(authorization: str | None) -> str | None:
    """Return the key of an ``Authorization: Bearer <key>`` header, or None."""
    scheme, _, key = (authorization or "").strip().partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


class Access(enum.Enum):
    """The outcome of checking an Authorization header."""

    GRANTED = "granted"
    MISSING = "missing"
    MALFORMED = "malformed"
    UNKNOWN = "unknown"
    REVOKED = "revoked"


@dataclass(frozen=True)
class Fault:
    """A fault drawn for one request."""

    kind: Literal["error", "rate_limit", "drop"]
    status: int = 0
    retry_after: float = 0.0


class Gateway:
    """Keys, knobs, rate windows, outages and drawn faults of one hub; thread-safe."""

    def __init__(self, settings: HubSettings, clock: Clock, ledger: Ledger) -> None:
        self._settings = settings
        self._clock = clock
        self._ledger = ledger
        self._lock = threading.Lock()
        self._rng = random.Random(settings.seed)
        self._streams: dict[str, random.Random] = {}
        self._initial_knobs = Knobs(settings.faults, settings.storage, settings.variants)
        self._knobs = self._initial_knobs
        self._outage_from = clock.now()  # when the ``outage`` knob was last set
        self._armed_drops: dict[str, int] = {}  # upload filename -> creates still to cut
        self._api_keys = frozenset(settings.api_keys)
        self._revoked = frozenset(settings.revoked_keys)
        self._windows: dict[str, deque[datetime]] = {}  # /files limit, per key
        self._key_windows: dict[str, deque[datetime]] = {}  # requests_per_minute, per key

    # -- auth ---------------------------------------------------------------------------

    def check_key(self, authorization: str | None) -> Access:
        """Judge an Authorization header against the known and revoked keys."""
        if not (authorization or "").strip():
            return Access.MISSING
        key = bearer_key(authorization)
        if key is None:
            return Access.MALFORMED
        with self._lock:
            if key in self._revoked:
                return Access.REVOKED
            return Access.GRANTED if key in self._api_keys else Access.UNKNOWN

    def set_keys(
        self, api_keys: Iterable[str] | None = None, revoked: Iterable[str] | None = None
    ) -> dict[str, list[str]]:
        """Replace the valid and/or revoked keys; return both lists."""
        with self._lock:
            if api_keys is not None:
                self._api_keys = frozenset(api_keys)
            if revoked is not None:
                self._revoked = frozenset(revoked)
            return {"api_keys": sorted(self._api_keys), "revoked": sorted(self._revoked)}

    # -- knobs --------------------------------------------------------------------------

    @property
    def knobs(self) -> Knobs:
        """Every knob in force.

        Read without the lock: ``Knobs`` is immutable and replaced whole, and taking a
        reference is atomic, so every request pays no lock to look at its knobs.
        """
        return self._knobs

    @property
    def faults(self) -> Faults:
        """The request-fault knobs in force."""
        return self._knobs.faults

    def update_knobs(self, changes: Mapping[str, object]) -> Knobs:
        """Change any knobs, all or none (ValueError names a bad one); return them all.

        Setting ``outage`` to a number starts that many seconds of outage now.
        """
        now = self._clock.now()
        with self._lock:
            self._knobs = self._knobs.updated(changes)
            if "outage" in changes:
                self._outage_from = now
            return self._knobs

    def reset_knobs(self) -> Knobs:
        """Put every knob back to how the hub was built."""
        now = self._clock.now()
        with self._lock:
            self._knobs = self._initial_knobs
            self._outage_from = now
            self._armed_drops.clear()
            return self._knobs

    # -- draws --------------------------------------------------------------------------

    def _stream(self, key: str | None) -> random.Random:
        """The random stream of one client job (by its trace header), or the shared one.

        With one shared stream, the draws a request gets depend on how many requests of
        other clients came first: the last file of a seeded run then meets whatever
        streak of faults the seed holds at that point, alone. Call under ``_lock``.
        """
        if key is None or self._settings.seed is None:
            return self._rng
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = random.Random(f"{self._settings.seed}/{key}")
        return stream

    def draw_fault(self, stream: str | None = None) -> Fault | None:
        """Decide whether this request is dropped, answered 5xx or 429; count it.

        ``stream`` names the client job the request is for (see ``_stream``)."""
        with self._lock:
            knobs = self._knobs.faults
            total = knobs.drop_rate + knobs.error_rate + knobs.rate_limit_rate
            if total <= 0:
                return None
            rng = self._stream(stream)
            draw = rng.random()
            fault: Fault | None = None
            if draw < knobs.drop_rate:
                fault = Fault("drop")
            elif draw < knobs.drop_rate + knobs.error_rate:
                fault = Fault("error", status=rng.choice((500, 502, 503)))
            elif draw < total:
                fault = Fault("rate_limit", status=429, retry_after=knobs.retry_after)
        if fault is not None:
            self._ledger.count_fault(fault.kind)
        return fault

    def _use_up(self, name: str, kind: str) -> bool:
        """Take one from the count-down fault knob ``name``; count ``kind`` if there was one."""
        with self._lock:
            left = getattr(self._knobs.faults, name)
            if left <= 0:
                return False
            self._knobs = self._knobs.updated({name: left - 1})
        self._ledger.count_fault(kind)
        return True

    def draw_processing_time(self) -> float:
        """Seconds a job takes to convert: fixed, or drawn from the shared stream."""
        low, high = self._settings.processing_range
        if low == high:
            return low
        with self._lock:
            return self._rng.uniform(low, high)

    def draw_job_failure(self, source_name: str) -> bool:
        """Whether a job on the upload ``source_name`` fails (``job_failure_rate``); counted."""
        # Keyed by the input's name: whether its n-th conversion fails is then fixed by
        # the seed, however the clients' requests interleave.
        with self._lock:
            rate = self._knobs.faults.job_failure_rate
            failed = rate > 0 and self._stream(f"job:{source_name}").random() < rate
        if failed:
            self._ledger.count_fault("job_failure")
        return failed

    def take_stall(self) -> bool:
        """Use up one of the stalled downloads still to come; False when none is left."""
        return self._use_up("stall_downloads", "stall")

    def take_lost_reply(self, job_id: str) -> bool:
        """Whether the reply creating ``job_id`` is to be lost (``lose_create_replies``)."""
        if not self._use_up("lose_create_replies", "lost_reply"):
            return False
        self._ledger.update_job(job_id, reply_lost=True)
        return True

    def take_create_drop(self, body: object, filename_of: Callable[[object], str | None]) -> bool:
        """Whether a create request is to be cut before any job is made.

        Either ``drop_create_requests`` still counts down, or a job for the same upload
        filename failed and ``drop_create_after_failure`` armed drops for that name. The
        name, not the file_id, is matched: a client may upload the scan again to retry.
        ``filename_of`` names the upload a file_id stands for, after settling due jobs
        (a failure due by now arms its drops first).
        """
        if self._use_up("drop_create_requests", "dropped_create"):
            return True
        if not self._armed_drops and self._knobs.faults.drop_create_after_failure <= 0:
            return False  # nothing armed, nothing to arm: no need to settle
        name = filename_of(body.get("file_id") if isinstance(body, dict) else None)
        with self._lock:
            left = self._armed_drops.get(name or "", 0)
            if left <= 0:
                return False
            if left > 1:
                self._armed_drops[name or ""] = left - 1
            else:
                del self._armed_drops[name or ""]
        self._ledger.count_fault("dropped_create")
        return True

    def arm_drops(self, filename: str) -> None:
        """A job on ``filename`` failed: arm drop_create_after_failure for that name."""
        with self._lock:
            count = self._knobs.faults.drop_create_after_failure
            if count > 0:
                self._armed_drops[filename] = count

    # -- gateway policies ---------------------------------------------------------------

    def outage(self, public: bool = False) -> str | None:
        """The ``outage_mode`` if an outage is on for this request, else None; counted."""
        with self._lock:
            faults, started = self._knobs.faults, self._outage_from
        if faults.outage is False or (public and faults.outage_spares_engines):
            return None
        now = self._clock.now()
        if faults.outage is not True and now >= started + timedelta(seconds=faults.outage):
            return None
        self._ledger.count_fault("outage")
        return faults.outage_mode

    def refusal(self, route: str) -> int | None:
        """``refuse_status`` if ``route`` is the refused one (``refuse_route``), else None."""
        faults = self.faults
        if not faults.refuse_route or route != faults.refuse_route:
            return None
        self._ledger.count_fault("refused_route")
        return faults.refuse_status

    def throttle(self, key: str) -> float | None:
        """Apply the per-key limit on /files; return Retry-After seconds when over it.

        A sliding one-minute window, as Zuplo's rate-limit policy uses; refused requests
        do not count against the window.
        """
        return self._slide(self._windows, key, self.faults.files_rate_limit)

    def limit_requests(self, key: str) -> float | None:
        """Apply ``requests_per_minute`` (every authenticated route); Retry-After or None."""
        return self._slide(self._key_windows, key, self.faults.requests_per_minute)

    def _slide(self, windows: dict[str, deque[datetime]], key: str, limit: int) -> float | None:
        if limit <= 0:
            return None
        now = self._clock.now()
        with self._lock:
            window = windows.setdefault(key, deque())
            while window and window[0] <= now - _RATE_WINDOW:
                window.popleft()
            if len(window) < limit:
                window.append(now)
                return None
            wait = (window[0] + _RATE_WINDOW - now).total_seconds()
        self._ledger.count_fault("throttle")
        return float(max(1, math.ceil(wait)))
