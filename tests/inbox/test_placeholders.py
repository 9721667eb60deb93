"""Placeholders cost nothing while they wait: parked, not looked at per tick (#35, minor)."""

from __future__ import annotations

import asyncio
import gc
import math
import time
import tracemalloc
from pathlib import Path

from daemon.inbox.stability import Patience
from tests.inbox.inprocess import Clock, intake_of, table
from tests.scans import make_scan

PATIENCE = Patience(quiet_period=1.0, stalled_after=60.0, incomplete_timeout=3600.0)


def placeholders(inbox: Path, count: int) -> list[Path]:
    """``count`` empty files in a few folders."""
    made = []
    for index in range(count):
        folder = inbox / f"scanner-{index % 4}"
        folder.mkdir(exist_ok=True)
        path = folder / f"scan-{index:05d}.pdf"
        path.touch()
        made.append(path)
    return made


def test_placeholders_are_parked_noted_once_and_cost_no_tick(folders: dict[str, Path]) -> None:
    """Quiet empty files leave the tick; once stalled they are noted once and never due again."""
    clock = Clock()
    made = placeholders(folders["inbox"], 3000)

    async def scenario() -> None:
        async with intake_of(folders, clock, PATIENCE) as intake:
            await intake.scan()
            assert len(intake.sightings) == 3000
            clock.advance(PATIENCE.quiet_period + 0.1)
            await intake.tick()
            assert not intake.sightings  # parked: a tick no longer looks at them
            assert len(intake.parked) == 3000
            assert table(folders, "waiting") == []
            clock.advance(PATIENCE.stalled_after)
            await intake.tick()  # due: shown as stalled, then parked for good
            assert len(table(folders, "waiting")) == 3000
            assert not intake.sightings
            assert intake.parked.next_due() == math.inf
            started = time.process_time()
            for _ in range(200):
                clock.advance(1.0)
                await intake.tick()
            assert time.process_time() - started < 0.5  # 200 ticks: no per-file work
            assert not intake.pending()

    asyncio.run(scenario())
    assert len(made) == 3000


def test_a_parked_placeholder_is_taken_once_filled_and_forgotten_once_removed(
    folders: dict[str, Path],
) -> None:
    """An event on a parked file wakes it: filled it is queued, removed it leaves status."""
    clock = Clock()
    filled, removed, *_ = placeholders(folders["inbox"], 10)

    async def scenario() -> None:
        async with intake_of(folders, clock, PATIENCE) as intake:
            await intake.scan()
            clock.advance(PATIENCE.quiet_period + PATIENCE.stalled_after)
            await intake.tick()
            await intake.tick()
            assert len(table(folders, "waiting")) == 10
            filled.write_bytes(make_scan("pdf", 1))
            intake.hint(str(filled), is_dir=False)
            removed.unlink()
            intake.hint(str(removed), is_dir=False)
            await intake.tick()
            clock.advance(PATIENCE.quiet_period + 0.1)
            await intake.tick()
            assert len(intake.parked) == 8

    asyncio.run(scenario())
    assert [row["path"] for row in table(folders)] == ["scanner-0/scan-00000.pdf"]
    waiting = {row["path"] for row in table(folders, "waiting")}
    assert len(waiting) == 8
    assert "scanner-1/scan-00001.pdf" not in waiting


def test_a_rescan_that_misses_a_parked_file_forgets_it(folders: dict[str, Path]) -> None:
    """A placeholder removed without an event is dropped at the next full rescan."""
    clock = Clock()
    gone, *_ = placeholders(folders["inbox"], 3)

    async def scenario() -> None:
        async with intake_of(folders, clock, PATIENCE) as intake:
            await intake.scan()
            clock.advance(PATIENCE.quiet_period + PATIENCE.stalled_after)
            await intake.tick()
            await intake.tick()
            gone.unlink()
            await intake.scan()
            assert len(intake.parked) == 2

    asyncio.run(scenario())
    assert len(table(folders, "waiting")) == 2


def test_memory_per_parked_placeholder_is_bounded(folders: dict[str, Path]) -> None:
    """Each parked placeholder costs intake under a kilobyte (path, signature, parking)."""
    clock = Clock()
    count = 5000
    placeholders(folders["inbox"], count)

    async def scenario() -> int:
        async with intake_of(folders, clock, PATIENCE) as intake:
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            await intake.scan()
            clock.advance(PATIENCE.quiet_period + 0.1)
            await intake.tick()
            await asyncio.to_thread(len, [])  # a worker thread keeps its last result
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            assert len(intake.parked) == count
            return held

    per_file = asyncio.run(scenario()) / count
    assert per_file < 1024, f"{per_file:.0f} bytes per parked placeholder"
