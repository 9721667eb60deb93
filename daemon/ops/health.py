"""Health: is the daemon alive and seeing the inbox? Heartbeat file, watchdog, self-exit.

``Monitor`` runs on the daemon's event loop every ``heartbeat_interval`` seconds. It asks
the state table for the queue (through the single writer, so a stuck writer shows), asks
the service whether the watcher, intake and pipeline are alive, and then: pings systemd's
watchdog only when all is well, updates ``STATUS=`` and the metrics, and writes the
heartbeat file that ``ldx-hotfolder health`` (and Docker's ``HEALTHCHECK``) read. A
component that stays dead for ``stall_timeout`` makes the daemon exit non-zero, so that
systemd or Docker restart it. ``Deadman`` is a thread that does the same when the event
loop itself stops running (a stuck loop cannot judge itself).

The decisions (``assess``, ``verdict``, ``status_line``) are pure functions of their
inputs, with the time passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.jobs.model import Status
from daemon.jobs.views import Views
from daemon.jobs.writer import Writer
from daemon.logs import get_logger
from daemon.ops import metrics
from daemon.ops.notify import Notifier

log = get_logger(component="health")
EXIT_UNHEALTHY = 70  # EX_SOFTWARE: the service manager restarts us (Restart=on-failure)


@dataclass(frozen=True)
class Liveness:
    """What the service says about its parts at one moment."""

    watcher: bool
    intake: bool
    pipeline: bool
    paused: str | None = None
    holding_back: str | None = None
    in_flight: int = 0


@dataclass(frozen=True)
class Snapshot:
    """The queue as the state table shows it."""

    counts: dict[str, int]
    oldest_waiting_at: float | None


def take_snapshot(store: Views) -> Snapshot:
    """Read the queue (runs in the single writer)."""
    return Snapshot(store.counts(), store.oldest_unfinished())


@dataclass(frozen=True)
class Heartbeat:
    """What the daemon last said about itself; the content of the heartbeat file."""

    time: float
    pid: int
    started_at: float
    healthy: bool
    problems: list[str] = field(default_factory=list)
    paused: str | None = None
    holding_back: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    oldest_waiting_at: float | None = None
    in_flight: int = 0
    version: str = __version__

    def to_json(self) -> str:
        """The file content."""
        return json.dumps(asdict(self), ensure_ascii=False, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Heartbeat:
        """Parse a file written by ``to_json``; ValueError when it is not one."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a heartbeat object")
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        try:
            return cls(**known)
        except TypeError as exc:
            raise ValueError(str(exc)) from None


# -- pure decisions ----------------------------------------------------------------------


def assess(live: Liveness, probe_waiting: float | None, stall_timeout: float) -> list[str]:
    """What is wrong with the daemon right now (empty when it is healthy).

    ``probe_waiting`` is how long the current question to the state table has waited.
    A paused pipeline (rejected key) is not a fault of the daemon: it waits for a person.
    """
    problems = []
    if not live.watcher:
        problems.append("the inbox watcher has stopped (blind to new files until a rescan)")
    if not live.intake:
        problems.append("intake has stopped: no new file is taken")
    if not live.pipeline:
        problems.append("the pipeline has stopped: no job is processed")
    if probe_waiting is not None and probe_waiting > stall_timeout:
        problems.append(f"the state database has not answered for {probe_waiting:.0f} s")
    return problems


def age_text(seconds: float) -> str:
    """A short human duration: ``42 s``, ``7 min``, ``3.5 h``, ``2.0 d``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def status_line(beat: Heartbeat, now: float) -> str:
    """The one line systemd shows as the service's status."""
    counts = ", ".join(f"{beat.counts.get(s.value, 0)} {s.value}" for s in Status)
    parts = [counts]
    if beat.oldest_waiting_at is not None:
        parts.append(f"oldest waiting {age_text(max(0.0, now - beat.oldest_waiting_at))}")
    if beat.paused:
        parts.append(f"PAUSED: {beat.paused}")
    elif beat.holding_back:
        parts.append(f"holding back: {beat.holding_back}")
    parts += [f"UNHEALTHY: {problem}" for problem in beat.problems]
    return "; ".join(parts)


def verdict(beat: Heartbeat | None, now: float, max_age: float) -> tuple[bool, list[str]]:
    """Whether a heartbeat shows a live, seeing daemon, and the reasons in words."""
    if beat is None:
        return False, ["no heartbeat: the daemon is not running (or not started yet)"]
    age = now - beat.time
    if age > max_age:
        return False, [
            f"the last heartbeat is {age_text(age)} old (limit {max_age:g} s): "
            "the daemon is stuck or stopped"
        ]
    if not beat.healthy:
        return False, list(beat.problems)
    notes = [f"healthy (pid {beat.pid}, heartbeat {age_text(max(0.0, age))} ago)"]
    if beat.paused:
        notes.append(f"work is paused: {beat.paused}")
    elif beat.holding_back:
        notes.append(f"new work is held back: {beat.holding_back}")
    return True, notes


# -- the heartbeat file --------------------------------------------------------------------


def write_heartbeat(path: Path, beat: Heartbeat) -> None:
    """Replace the heartbeat file atomically (no fsync: it is rewritten every few seconds)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(beat.to_json(), encoding="utf-8")
    os.replace(tmp, path)


def read_heartbeat(path: Path) -> Heartbeat | None:
    """The heartbeat in ``path``, or None when there is none (or it is unreadable)."""
    try:
        return Heartbeat.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def remove_heartbeat(path: Path) -> None:
    """Remove the heartbeat file on a clean stop: ``health`` then says "not running"."""
    with contextlib.suppress(OSError):  # gone already, or never writable
        path.unlink()


# -- the monitor on the event loop -----------------------------------------------------------


class Monitor:
    """Judges the daemon's health every few seconds and tells systemd, files and metrics."""

    def __init__(
        self,
        db: Writer,
        views: Views,
        liveness: Callable[[], Liveness],
        notifier: Notifier,
        *,
        heartbeat_file: Path,
        interval: float,
        stall_timeout: float,
        watchdog_interval: float | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.views = views
        self.liveness = liveness
        self.notifier = notifier
        self.heartbeat_file = heartbeat_file
        self.interval = min(interval, watchdog_interval or interval)
        self.stall_timeout = stall_timeout
        self.clock = clock
        self.monotonic = monotonic
        self.started_at = clock()
        self.latest: Heartbeat | None = None
        self.last_beat = monotonic()  # read by Deadman from another thread
        self.failure: str | None = None  # set when the daemon should exit unhealthy
        self._snapshot = Snapshot({s.value: 0 for s in Status}, None)
        self._probe: asyncio.Future[Snapshot] | None = None
        self._probe_started = 0.0
        self._unhealthy_since: float | None = None
        self._write_failing = False

    async def prime(self) -> None:
        """Read the queue once before the first beat (so READY=1 shows real counts)."""
        self._snapshot = await self.db.call(take_snapshot, self.views)

    async def run(self, stop: asyncio.Event) -> None:
        """Beat until ``stop``; on a lasting fault set ``failure`` and ``stop``."""
        while not stop.is_set():
            await self.beat()
            if self.failure is not None:
                stop.set()
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)

    async def beat(self) -> Heartbeat:
        """One round: probe, judge, tell."""
        now = self.clock()
        self.last_beat = self.monotonic()
        waiting = self._collect_probe()
        live = self.liveness()
        problems = assess(live, waiting, self.stall_timeout)
        beat = Heartbeat(
            time=now,
            pid=os.getpid(),
            started_at=self.started_at,
            healthy=not problems,
            problems=problems,
            paused=live.paused,
            holding_back=live.holding_back,
            counts=dict(self._snapshot.counts),
            oldest_waiting_at=self._snapshot.oldest_waiting_at,
            in_flight=live.in_flight,
        )
        self.latest = beat
        self._tell(beat, live)
        await self._write(beat)
        self._judge(problems, now)
        return beat

    def _collect_probe(self) -> float | None:
        """Take a finished probe's result, start the next; how long a pending one waited."""
        probe = self._probe
        if probe is not None and not probe.done():
            return self.monotonic() - self._probe_started
        if probe is not None:
            try:
                self._snapshot = probe.result()
            except Exception as exc:  # the database failed: show it, keep judging
                log.warning("cannot read the queue from the state database", error=str(exc))
        self._probe = asyncio.ensure_future(self.db.call(take_snapshot, self.views))
        self._probe_started = self.monotonic()
        return None

    def _tell(self, beat: Heartbeat, live: Liveness) -> None:
        self.notifier.status(status_line(beat, beat.time))
        if beat.healthy:
            self.notifier.watchdog()
        for status, count in beat.counts.items():
            metrics.JOBS.labels(status=status).set(count)
        oldest = beat.oldest_waiting_at
        metrics.OLDEST_WAITING.set(max(0.0, beat.time - oldest) if oldest is not None else 0.0)
        metrics.IN_FLIGHT.set(live.in_flight)
        metrics.PAUSED.set(1 if live.paused else 0)
        for component in ("watcher", "intake", "pipeline"):
            metrics.UP.labels(component=component).set(1 if getattr(live, component) else 0)
        metrics.HEARTBEAT.set(beat.time)

    async def _write(self, beat: Heartbeat) -> None:
        try:
            await asyncio.to_thread(write_heartbeat, self.heartbeat_file, beat)
        except OSError:
            if not self._write_failing:  # once, not on every beat
                path = str(self.heartbeat_file)
                log.warning("cannot write the heartbeat file", path=path, exc_info=True)
            self._write_failing = True
            return
        if self._write_failing:
            log.info("the heartbeat file is written again", path=str(self.heartbeat_file))
        self._write_failing = False

    def _judge(self, problems: list[str], now: float) -> None:
        if not problems:
            if self._unhealthy_since is not None:
                log.info("healthy again")
            self._unhealthy_since = None
            return
        if self._unhealthy_since is None:
            self._unhealthy_since = now
            log.error("the daemon is unhealthy", problems=problems)
        if now - self._unhealthy_since >= self.stall_timeout:
            self.failure = "; ".join(problems)
            log.error(
                "unhealthy for too long; exiting so that the service is restarted",
                problems=problems,
                seconds=round(now - self._unhealthy_since, 1),
            )

    def healthz(self) -> tuple[bool, dict[str, Any]]:
        """The ``/healthz`` answer (called from the metrics thread)."""
        ok, notes = verdict(self.latest, self.clock(), self.stall_timeout)
        body: dict[str, Any] = {"ok": ok, "notes": notes}
        if self.latest is not None:
            body["heartbeat"] = asdict(self.latest)
        return ok, body

    async def close(self) -> None:
        """Settle the probe and remove the heartbeat file (a clean stop)."""
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(BaseException):
                await self._probe
        remove_heartbeat(self.heartbeat_file)


# -- the deadman thread -----------------------------------------------------------------------


def stalled(now: float, last_beat: float, timeout: float) -> bool:
    """Whether the loop has missed its beats for longer than ``timeout`` seconds."""
    return now - last_beat > timeout


def _exit_stuck(seconds: float) -> None:
    log.critical(
        "the event loop is stuck; exiting so that the service is restarted",
        seconds=round(seconds, 1),
    )
    os._exit(EXIT_UNHEALTHY)


class Deadman(threading.Thread):
    """Exits the process when the event loop stops beating (it cannot judge itself)."""

    def __init__(
        self,
        last_beat: Callable[[], float],
        timeout: float,
        *,
        on_stall: Callable[[float], None] = _exit_stuck,
        check_every: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name="deadman", daemon=True)
        self._last_beat = last_beat
        self._timeout = timeout
        self._on_stall = on_stall
        self._check_every = check_every
        self._monotonic = monotonic
        self._stopped = threading.Event()

    def run(self) -> None:
        """Check every ``check_every`` seconds until stopped or stalled."""
        while not self._stopped.wait(self._check_every):
            now, last = self._monotonic(), self._last_beat()
            if stalled(now, last, self._timeout):
                self._on_stall(now - last)
                return

    def stop(self) -> None:
        """Stop checking."""
        self._stopped.set()
