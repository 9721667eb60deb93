"""The hub gate: hold hub work while the hub cannot serve it, fail nothing, resume at once.

Three things make every request to the hub pointless for a while: the hub is down (a
run of network errors, timeouts or 5xx answers), the API key is rejected, or the hub
refuses one kind of request while the key works (402 for credit, 403 for a plan without
RenderOCR). Then the gate closes, for every route or for the refused one. A request for
a closed route waits in ``admission`` instead of failing, so no job fails and no error
file appears: the job simply waits, and ``status``, ``explain`` and ``health`` say why.

While the gate is closed it probes: for a hub that is down or a rejected key, one cheap
request (``probe``, the client's ``GET /files``, with the key read anew) after a second
and then at doubling intervals up to ``probe_max`` (at most 30 s); for a refused route,
one waiting request of that route goes through at those intervals (only a real creation
can tell whether the plan or the credit allows one now). Any answer but the same
refusal opens the gate, and every waiting request goes on at once.

Whatever the gate closes for next, while closed for a hub that is down or a rejected key
it probes (a plan refusal that turns into a rejected key is probed too). An answer to the
probe that proves nothing (a 404 or a redirect where the file list should be) opens the
gate, and the work tells: when it meets the same refusal within ``probe_max`` seconds,
the gate closes as it was (same ``since``) and goes on probing at the interval it had
reached, so a hub that answers the probe but refuses the work costs one probe and one
try per interval, never a loop. Until a request carrying the key is answered 2xx, such
an opening is ``unproven``: ``held_for_person`` still names the rejected key, so
``health`` does not turn green on an answer that proved nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

FIRST_PROBE = 1.0
PROBE_MAX = 30.0
THRESHOLD = 3  # transient failures in a row, with no answer between, that mean "down"
EVERY_ROUTE = "*"


class Hold(enum.StrEnum):
    """Why the gate is closed."""

    DOWN = "hub_unreachable"
    KEY = "auth_rejected"
    REFUSED = "hub_refused"


@dataclass(frozen=True)
class Closure:
    """A closed gate: why, since when (epoch seconds), for which route."""

    hold: Hold
    since: float
    reason: str
    route: str = EVERY_ROUTE

    def covers(self, route: str) -> bool:
        """Whether requests of ``route`` wait while this closure lasts."""
        return self.route in (EVERY_ROUTE, route)

    def sentence(self, held: int) -> str:
        """What ``status``, ``health`` and the log say about it."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        jobs = f"{held} request(s) waiting" if held else "nothing waiting"
        if self.hold is Hold.DOWN:
            return (
                f"hub unreachable since {stamp}; all hub work is held, nothing fails, and it "
                f"resumes by itself when the hub answers ({jobs}; {self.reason})"
            )
        if self.hold is Hold.KEY:
            return (
                f"the LDX hub rejected the API key; all work is paused until it is accepted "
                f"(since {stamp}; {jobs}; {self.reason})"
            )
        return (
            f"the hub refuses {self.route} (since {stamp}): {self.reason}; those requests "
            f"wait and are tried again now and then ({jobs})"
        )


Probe = Callable[[], Awaitable[object]]


@dataclass(frozen=True)
class _Opened:
    """The closure the gate opened from last, when, and the probe interval it had."""

    closure: Closure
    at: float
    interval: float


class Gate:
    """Holds requests while the hub cannot serve them; see the module docstring."""

    def __init__(
        self,
        *,
        threshold: int = THRESHOLD,
        probe_max: float = PROBE_MAX,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[Closure | None], None] | None = None,
    ) -> None:
        self.closure: Closure | None = None
        self.waiting = 0  # requests held now
        self.probe: Probe | None = None  # set by the client: one cheap request
        self._threshold = threshold
        self._probe_max = probe_max
        self._clock = clock
        self._on_change = on_change or (lambda closure: None)
        self._failures = 0
        self._interval = min(FIRST_PROBE, probe_max)
        self._next_turn = 0.0  # when a waiting request of a refused route may go
        self._turn_taken = False
        self._changed = asyncio.Event()
        self._prober: asyncio.Task[None] | None = None
        self._opened: _Opened | None = None
        # A rejected key the gate opened from on an answer that did not prove it works.
        self.unproven: Closure | None = None

    def describe(self) -> str | None:
        """The closure in words, or None when the gate is open."""
        return None if self.closure is None else self.closure.sentence(self.waiting)

    def held_for_person(self) -> Closure | None:
        """What holds work until a person acts: a rejected key or a refused route, also
        while the gate is open on an answer that did not prove the key works again."""
        closure = self.closure
        if closure is not None:
            return None if closure.hold is Hold.DOWN else closure
        return self.unproven

    @contextlib.asynccontextmanager
    async def admission(self, route: str) -> AsyncIterator[bool]:
        """Wait until ``route`` may be asked; yield whether this request is a trial of a
        refused route (its outcome decides whether the gate opens)."""
        trial = await self._admit(route)
        try:
            yield trial
        finally:
            if trial:  # a trial that ended without an outcome (cancelled) frees its turn
                self._end_turn()

    async def _admit(self, route: str) -> bool:
        if self.closure is None or not self.closure.covers(route):
            return False
        self.waiting += 1
        try:
            while self.closure is not None and self.closure.covers(route):
                if self._may_try(route):
                    self._turn_taken = True
                    return True
                self._changed.clear()
                timeout = self._turn_wait()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout)
            return False
        finally:
            self.waiting -= 1

    def _may_try(self, route: str) -> bool:
        closure = self.closure
        return (
            closure is not None
            and closure.hold is Hold.REFUSED
            and closure.route == route
            and not self._turn_taken
            and self._clock() >= self._next_turn
        )

    def _turn_wait(self) -> float | None:
        closure = self.closure
        if closure is None or closure.hold is not Hold.REFUSED or self._turn_taken:
            return None
        return max(0.05, self._next_turn - self._clock())

    def _end_turn(self) -> None:
        if self._turn_taken:
            self._turn_taken = False
            self._next_turn = self._clock() + self._step()
            self._changed.set()

    def _step(self) -> float:
        interval = self._interval
        self._interval = min(self._probe_max, self._interval * 2)
        return interval

    # -- outcomes ----------------------------------------------------------------------

    def answered(self, route: str, *, proven: bool = True) -> None:
        """The hub answered ``route`` (anything but a refusal of the kind that closed it);
        ``proven``: a 2xx to a request carrying the key (else: a 404, a redirect...)."""
        self._failures = 0
        if proven:
            self.unproven = None
        closure = self.closure
        if closure is None:
            return
        if closure.hold is Hold.REFUSED and not closure.covers(route):
            return  # another route working says nothing about the refused one
        if closure.hold is Hold.KEY and not proven:
            self.unproven = closure
        self._open()

    def unreachable(self, route: str, reason: str) -> None:
        """A network error, timeout or 5xx on ``route``."""
        self._failures += 1
        if self.closure is None and self._failures >= self._threshold:
            self._close(Closure(Hold.DOWN, self._clock(), reason))
        elif self.closure is not None:
            self._end_turn()

    def key_rejected(self, reason: str) -> None:
        """The hub rejected the API key (or the key file cannot be read)."""
        self._failures = 0
        self._reclose(Closure(Hold.KEY, self._since(Hold.KEY), reason))

    def refused(self, route: str, reason: str) -> None:
        """The hub refuses ``route`` while the key works elsewhere."""
        self._failures = 0
        self._reclose(Closure(Hold.REFUSED, self._since(Hold.REFUSED), reason, route))

    def _since(self, hold: Hold) -> float:
        closure = self.closure
        return closure.since if closure is not None and closure.hold is hold else self._clock()

    def _reclose(self, closure: Closure) -> None:
        if self.closure is not None:
            was, self.closure = self.closure, closure  # still closed, maybe for a new reason
            self._end_turn()
            self._keep_probing()  # a refused plan that became a rejected key is probed too
            if (was.hold, was.route) != (closure.hold, closure.route):
                self._on_change(closure)  # say so: an outage became a rejected key...
            return
        self._close(closure)

    def _close(self, closure: Closure) -> None:
        relapse = self._relapse(closure)
        if relapse is not None:  # the last opening proved nothing: back off further
            closure = dataclasses.replace(closure, since=relapse.closure.since)
            self._interval = relapse.interval
        else:
            self._interval = min(FIRST_PROBE, self._probe_max)
        self.closure = closure
        self._next_turn = self._clock() + self._step()
        self._on_change(closure)
        self._keep_probing()

    def _relapse(self, closure: Closure) -> _Opened | None:
        """The opening ``closure`` undoes: the same refusal again within ``probe_max``."""
        opened = self._opened
        if opened is None or opened.closure.hold is not closure.hold:
            return None
        if opened.closure.route != closure.route:
            return None
        return opened if self._clock() - opened.at < self._probe_max else None

    def _keep_probing(self) -> None:
        """Start the prober unless one runs or the closure is a refused route's."""
        closure = self.closure
        if closure is None or closure.hold is Hold.REFUSED or self.probe is None:
            return
        if self._prober is not None and not self._prober.done():
            return
        with contextlib.suppress(RuntimeError):  # no loop: nothing to probe from
            self._prober = asyncio.get_running_loop().create_task(self._probing())

    def _open(self) -> None:
        was = self.closure
        if was is not None:
            self._opened = _Opened(was, self._clock(), self._interval)
        self.closure = None
        self._turn_taken = False
        self._interval = min(FIRST_PROBE, self._probe_max)
        self._changed.set()
        prober, self._prober = self._prober, None
        if prober is not None and prober is not asyncio.current_task():
            prober.cancel()
        if was is not None:
            self._on_change(None)

    async def _probing(self) -> None:
        """While closed for a hub that is down or a rejected key: one cheap request at
        growing intervals; its answer (through the client) opens or keeps the gate."""
        me = asyncio.current_task()
        # Ends when the gate opens, or another prober took over (it opened and closed).
        while self.closure is not None and self.closure.hold is not Hold.REFUSED:
            await asyncio.sleep(self._step())
            if self.probe is None or self.closure is None or self._prober is not me:
                return
            with contextlib.suppress(Exception):  # its outcome reached the gate already
                await self.probe()

    async def aclose(self) -> None:
        """Stop probing (the daemon stops)."""
        prober, self._prober = self._prober, None
        if prober is not None:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober
