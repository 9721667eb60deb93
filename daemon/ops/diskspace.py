"""Disk space: hold intake and new jobs back while the outbox or state disk is nearly full.

A full disk is not any job's fault, so it must not fail jobs: below the watermark the
daemon stops taking files and starting jobs, says so once, and resumes by itself once
space is freed (and says that once too).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from daemon.logs import get_logger

log = get_logger(component="diskspace")
CHECK_SECONDS = 5.0
MB = 1024 * 1024


def lowest_free(paths: Iterable[Path]) -> tuple[int, Path | None]:
    """The least free space (bytes) among the disks holding ``paths``."""
    lowest: tuple[int, Path | None] = (2**63, None)
    for path in paths:
        try:
            free = shutil.disk_usage(path).free
        except OSError:
            continue
        if free < lowest[0]:
            lowest = (free, path)
    return lowest


def is_low(free: int, min_free_mb: float) -> bool:
    """Whether ``free`` bytes is below the watermark."""
    return free < min_free_mb * MB


class DiskMonitor:
    """Checks free space every few seconds (or at once when asked) and reports changes."""

    def __init__(
        self, paths: list[Path], min_free_mb: float, on_change: Callable[[bool], None]
    ) -> None:
        self.paths = paths
        self.min_free_mb = min_free_mb
        self.on_change = on_change
        self.low = False
        self._poke = asyncio.Event()

    def check_now(self) -> None:
        """Ask for a check as soon as possible (a write just failed with ENOSPC)."""
        self._poke.set()

    def check(self) -> bool:
        """Look at the disks once; report a change of state; return whether space is low."""
        free, where = lowest_free(self.paths)
        low = is_low(free, self.min_free_mb)
        if low != self.low:
            self.low = low
            if low:
                log.error(
                    "free disk space is low; no new files are taken until space is freed",
                    free_mb=round(free / MB, 1),
                    min_free_space_mb=self.min_free_mb,
                    path=str(where),
                )
            else:
                log.info("free disk space is back; resuming", free_mb=round(free / MB, 1))
            self.on_change(low)
        return low

    async def run(self, stop: asyncio.Event) -> None:
        """Check until ``stop`` is set."""
        while not stop.is_set():
            self.check()
            self._poke.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), CHECK_SECONDS)
