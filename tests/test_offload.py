"""Where blocking work runs: inline on the event loop while short, in threads once slow."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError

from daemon.jobs import offload
from daemon.jobs.offload import COOL_DOWN_SECONDS, SLOW_SECONDS, SMALL_BYTES, Offload
from daemon.jobs.store import NewJob, Store
from daemon.jobs.writer import Db


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _new(path: str) -> NewJob:
    return NewJob(path, 10, 1, 7, "pdf", "ki/ocr", "jpn", "docx")


def _blocks_for(seconds: float) -> None:
    # Stands for a slow fsync: the thread waits without computing.
    time.sleep(seconds)


def _computes_for(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def _thread_of() -> int:
    return threading.get_ident()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A real SQLite state file."""
    return Store(f"sqlite:///{tmp_path / 'state.db'}")


def test_small_work_runs_inline_outside_a_threaded_period() -> None:
    """Up to SMALL_BYTES and once the threaded period is over, work runs on the loop."""
    assert offload.runs_inline(0, now=10.0, threaded_until=0.0)
    assert offload.runs_inline(SMALL_BYTES, now=10.0, threaded_until=10.0)
    assert not offload.runs_inline(SMALL_BYTES + 1, now=10.0, threaded_until=0.0)
    assert not offload.runs_inline(0, now=10.0, threaded_until=10.5)


def test_only_a_long_wait_starts_a_threaded_period() -> None:
    """A wait over SLOW_SECONDS sends work to threads for COOL_DOWN_SECONDS; never shorter."""
    assert offload.threaded_until_after(SLOW_SECONDS, now=5.0, threaded_until=0.0) == 0.0
    later = offload.threaded_until_after(SLOW_SECONDS * 2, now=5.0, threaded_until=0.0)
    assert later == 5.0 + COOL_DOWN_SECONDS
    far = 5.0 + COOL_DOWN_SECONDS * 3
    assert offload.threaded_until_after(1.0, now=5.0, threaded_until=far) == far


def test_small_calls_run_on_the_loop_and_large_ones_in_a_thread() -> None:
    """A small call runs on the event loop's thread; a large one in another thread."""
    work = Offload()

    async def threads() -> tuple[int, int, int]:
        loop_thread = threading.get_ident()
        small = await work.run(1024, _thread_of)
        large = await work.run(SMALL_BYTES + 1, _thread_of)
        return loop_thread, small, large

    loop_thread, small, large = asyncio.run(threads())
    assert small == loop_thread
    assert large != loop_thread


def test_a_call_that_waits_too_long_sends_work_to_threads_for_a_while() -> None:
    """After an inline call blocks past SLOW_SECONDS, calls run in threads for the cool-down."""
    clock = Clock()
    work = Offload(clock)

    async def scenario() -> list[bool]:
        loop_thread = threading.get_ident()
        seen = []
        await work.run(0, _blocks_for, SLOW_SECONDS * 1.5)
        seen.append(await work.run(0, _thread_of) == loop_thread)
        clock.now += COOL_DOWN_SECONDS - 1
        seen.append(await work.run(0, _thread_of) == loop_thread)
        clock.now += 1
        seen.append(await work.run(0, _thread_of) == loop_thread)
        return seen

    assert asyncio.run(scenario()) == [False, False, True]


def test_nothing_runs_inline_when_inline_work_is_not_allowed() -> None:
    """An Offload for folders on network storage sends even the smallest call to a thread."""
    work = Offload(allowed=False)

    async def threads() -> tuple[int, int]:
        return threading.get_ident(), await work.run(0, _thread_of)

    loop_thread, ran_on = asyncio.run(threads())
    assert ran_on != loop_thread
    assert not work.inline_now()


def test_computing_inline_for_long_does_not_count_as_waiting() -> None:
    """CPU time holds the GIL in a thread too, so only the wall time beyond it counts."""
    work = Offload()

    async def scenario() -> None:
        await work.run(0, _computes_for, SLOW_SECONDS * 1.5)

    asyncio.run(scenario())
    assert work.inline_now()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_time_waiting_for_a_cpu_does_not_count_as_waiting() -> None:
    """A call preempted by a busy neighbour on its CPU stays inline: that is no slow disk."""
    cpu = min(os.sched_getaffinity(0))
    spin = f"import os; os.sched_setaffinity(0, {{{cpu}}}); print(flush=True)\nwhile True: pass"
    work = Offload()
    allowed = os.sched_getaffinity(0)
    with subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE) as neighbour:
        try:
            assert neighbour.stdout is not None
            neighbour.stdout.readline()  # it runs on our CPU from here on
            os.sched_setaffinity(0, {cpu})
            queued = offload.run_delay()
            asyncio.run(work.run(0, _computes_for, SLOW_SECONDS * 1.5))
            preempted = offload.run_delay() - queued
        finally:
            os.sched_setaffinity(0, allowed)
            neighbour.kill()
    assert preempted > SLOW_SECONDS  # the call really waited for the CPU that long
    assert work.inline_now()


def test_calls_of_one_loop_turn_commit_together_on_the_loop(store: Store) -> None:
    """With an Offload, the state calls made in one loop turn run on the loop in one commit."""
    db = Db(store, Offload())
    commits: list[int] = []
    event.listen(store.engine, "commit", lambda _conn: commits.append(threading.get_ident()))

    async def scenario() -> int:
        await asyncio.gather(
            *(db.call(store.enqueue, _new(f"{n}.pdf"), f"{n}.docx", 1.0) for n in range(3))
        )
        return threading.get_ident()

    try:
        loop_thread = asyncio.run(scenario())
        assert commits == [loop_thread]
        assert {job.path for job in store.jobs()} == {"0.pdf", "1.pdf", "2.pdf"}
    finally:
        db.close()


def test_without_an_offload_every_call_runs_on_the_writer_thread(store: Store) -> None:
    """Without an Offload (a database server) the state calls run on the writer thread."""
    db = Db(store)

    async def scenario() -> tuple[int, int]:
        return threading.get_ident(), await db.call(_thread_of)

    try:
        loop_thread, writer = asyncio.run(scenario())
        assert writer != loop_thread
    finally:
        db.close()


def test_a_slow_inline_commit_moves_the_state_calls_to_the_writer_thread(store: Store) -> None:
    """After a commit that waited too long, calls go to the writer thread for the cool-down."""
    clock = Clock()
    db = Db(store, Offload(clock))

    async def scenario() -> list[bool]:
        loop_thread = threading.get_ident()
        await db.call(_blocks_for, SLOW_SECONDS * 1.5)
        on_loop = [await db.call(_thread_of) == loop_thread]
        clock.now += COOL_DOWN_SECONDS
        on_loop.append(await db.call(_thread_of) == loop_thread)
        return on_loop

    try:
        assert asyncio.run(scenario()) == [False, True]
    finally:
        db.close()


def test_no_inline_commit_while_the_writer_thread_holds_calls(store: Store) -> None:
    """While the writer thread has calls in hand, later calls queue behind them there."""
    clock = Clock()
    work = Offload(clock)
    db = Db(store, work)
    release = threading.Event()

    async def scenario() -> tuple[int, int, int]:
        loop_thread = threading.get_ident()
        work.threaded_until = clock.now + 1  # as after a slow commit
        held = asyncio.ensure_future(db.call(release.wait, 30))
        await asyncio.sleep(0)  # the call is now queued for the writer thread
        clock.now += 2  # the cool-down is over, but the thread still holds a call
        later = asyncio.ensure_future(db.call(_thread_of))
        await asyncio.sleep(0)
        release.set()
        await held
        return loop_thread, await later, await db.call(_thread_of)

    try:
        loop_thread, later, after = asyncio.run(scenario())
        assert later != loop_thread
        assert after == loop_thread
    finally:
        db.close()


def test_an_inline_call_failing_in_the_database_fails_alone(store: Store) -> None:
    """Inline group commit: a call failing in the database fails alone; its batch commits."""
    db = Db(store, Offload())

    def broken() -> None:
        with store._write() as conn:
            conn.execute(text("SELECT * FROM no_such_table"))

    async def scenario() -> list[object]:
        return await asyncio.gather(
            db.call(store.enqueue, _new("a.pdf"), "a.docx", 1.0),
            db.call(broken),
            db.call(store.enqueue, _new("b.pdf"), "b.docx", 1.0),
            return_exceptions=True,
        )

    try:
        results = asyncio.run(scenario())
        assert isinstance(results[1], DBAPIError)
        assert {job.path for job in store.jobs()} == {"a.pdf", "b.pdf"}
    finally:
        db.close()
