"""Where blocking work runs: on the event loop while it stays short, else in a thread.

Every hop to a thread costs the event loop a wake-up and, under the GIL, a hand-over that
lets the other thread run for up to a switch interval while the loop waits (the convoy
effect). For a scan of 100 KB, hashing it, checking and fsyncing its output and committing
its state changes take well under a millisecond each on a local disk, far less than the
hops around them: run on the loop they cut the daemon's CPU per file by about a quarter
(bench/perf (a)). On a slow disk or a network share the same calls can block for long,
so every inline call is timed, and one that waits over ``SLOW_SECONDS`` sends all such
work to threads for ``COOL_DOWN_SECONDS`` before the loop tries again. Waiting is the wall
time less the thread's own CPU time (computing holds the GIL in a thread too) and less
the time it was runnable but waiting for a CPU (Linux's schedstat): on a busy machine a
preempted call is not a slow disk, and threads would only add switching. Large inputs
and outputs always go to a thread, and so does everything when a folder is on network
storage: a hung share would otherwise freeze the whole loop, not one thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

from daemon.logs import get_logger

log = get_logger(component="offload")

P = ParamSpec("P")
R = TypeVar("R")

SLOW_SECONDS = 0.1  # an inline call waiting this long stalls every transfer: stop it
COOL_DOWN_SECONDS = 600.0
SMALL_BYTES = 4 * 1024 * 1024  # hashing or checking this much takes a few ms at most


def runs_inline(size: int, now: float, threaded_until: float) -> bool:
    """Whether work on ``size`` bytes runs on the event loop at ``now`` (pure)."""
    return size <= SMALL_BYTES and now >= threaded_until


def threaded_until_after(waited: float, now: float, threaded_until: float) -> float:
    """The new end of the threaded period once an inline call waited ``waited`` s (pure)."""
    if waited > SLOW_SECONDS:
        return max(threaded_until, now + COOL_DOWN_SECONDS)
    return threaded_until


class _SchedstatFd:
    """This thread's ``/proc/thread-self/schedstat``: a descriptor names the thread that
    opened it, so each thread keeps its own, closed when the thread's locals go."""

    def __init__(self) -> None:
        try:
            self.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.fd = -1  # not Linux, or no /proc: the kernel does not say

    def __del__(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)


_local = threading.local()


def run_delay() -> float:
    """Seconds the calling thread has spent runnable but waiting for a CPU, in all; 0.0
    where the kernel does not say (only differences between two readings mean anything)."""
    schedstat: _SchedstatFd | None = getattr(_local, "schedstat", None)
    if schedstat is None:
        schedstat = _local.schedstat = _SchedstatFd()
    if schedstat.fd < 0:
        return 0.0
    # "on-CPU ns, waiting ns, time slices"; pread re-reads the current values each time.
    try:
        return int(os.pread(schedstat.fd, 64, 0).split()[1]) / 1e9
    except (OSError, ValueError, IndexError):  # a kernel that words it otherwise
        return 0.0


class Offload:
    """Runs blocking calls inline or in a thread; shared by the state and the file work."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, *, allowed: bool = True
    ) -> None:
        """``allowed=False`` (folders on network storage) keeps all such work in threads."""
        self.clock = clock
        self.allowed = allowed
        self.threaded_until = 0.0

    def inline_now(self, size: int = 0) -> bool:
        """Whether work on ``size`` bytes should run on the event loop now."""
        return self.allowed and runs_inline(size, self.clock(), self.threaded_until)

    def waited(self, seconds: float, what: str) -> None:
        """Record how long an inline call of ``what`` waited; overruns turn threads on."""
        before = self.threaded_until
        self.threaded_until = threaded_until_after(seconds, self.clock(), before)
        if self.threaded_until != before:
            log.warning(
                "blocking work is slow here; running it in threads for a while",
                what=what,
                waited_s=round(seconds, 3),
                threaded_for_s=COOL_DOWN_SECONDS,
            )

    @contextlib.contextmanager
    def timing(self, what: str) -> Iterator[None]:
        """Time the inline call made inside and record how long it waited."""
        wall, cpu, queued = time.perf_counter(), time.thread_time(), run_delay()
        try:
            yield
        finally:
            computed = time.thread_time() - cpu
            preempted = run_delay() - queued
            self.waited(time.perf_counter() - wall - computed - preempted, what)

    async def run(self, size: int, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """``fn(*args, **kwargs)``, inline when ``size`` bytes are small and calls are fast."""
        if not self.inline_now(size):
            return await asyncio.to_thread(fn, *args, **kwargs)
        with self.timing(getattr(fn, "__name__", "call")):
            return fn(*args, **kwargs)
