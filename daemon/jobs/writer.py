"""The single writer: every store call of the running daemon is committed in one place.

SQLite allows one writer at a time, and its WAL reset bug makes concurrent writers
unsafe on older libraries. Calls made while a commit is under way are run together in
the next transaction (group commit): one fsync for many small state changes. A caller's
await returns only after its change is committed.

Where they run is the ``Offload``'s decision. With an SQLite file on a local disk a
commit takes a fraction of a millisecond, so the calls made in one turn of the event
loop are committed at the end of that turn on the loop itself, with no thread hop. A
PostgreSQL server (network round trips), or a commit that turned out slow, sends them to
one dedicated thread instead, which keeps the event loop free while a commit waits. The
loop only goes back to committing inline once that thread has nothing in hand, so the
two never write at once.

PostgreSQL aborts a whole transaction at the first failed statement, where SQLite only
fails that statement; so when a call of a batch fails in the database, the batch is
rolled back and its calls run again one transaction each, and one call's error never
takes the others' changes with it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from sqlalchemy.exc import DBAPIError

from daemon.jobs.offload import Offload
from daemon.jobs.store import Store

P = ParamSpec("P")
R = TypeVar("R")
MAX_BATCH = 128


@dataclass
class _Call:
    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    outcome: tuple[bool, Any] = field(default=(False, None))


class _RollBack(Exception):
    """Internal: undo a batch in which a call failed in the database."""


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.cancelled():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def _settle_all(calls: list[_Call]) -> None:
    for call in calls:
        _settle(call.future, *call.outcome)


class Db:
    """Runs ``Store`` methods in group commits, awaitable from the event loop: inline at
    the end of a loop turn when ``offload`` allows it, else on one dedicated thread."""

    def __init__(self, store: Store, offload: Offload | None = None) -> None:
        self.store = store
        self.offload = offload  # None: always the thread
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._in_thread = 0  # calls handed to the thread and not yet settled
        self._pending: list[_Call] = []  # inline calls waiting for the end of the turn
        self._thread = threading.Thread(target=self._serve, name="db-writer", daemon=True)
        self._thread.start()

    async def call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn(*args, **kwargs)`` in the next group commit; return once committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        call = _Call(lambda: fn(*args, **kwargs), loop, future)
        if self._inline(loop):
            if not self._pending:
                loop.call_soon(self._commit_pending)
            self._pending.append(call)
        else:
            self._in_thread += 1
            self._queue.put(call)
        return await future

    def _inline(self, loop: asyncio.AbstractEventLoop) -> bool:
        if self.offload is None or self._in_thread:
            return False
        if self._pending and self._pending[0].loop is not loop:
            return False
        return bool(self._pending) or self.offload.inline_now()

    def _commit_pending(self) -> None:
        """Commit the calls of this loop turn, on the loop (scheduled by ``call``)."""
        batch, self._pending = self._pending, []
        if not batch:  # close() committed them already
            return
        assert self.offload is not None  # calls are only pending inline when it is set
        with self.offload.timing("state commit"):
            self._commit(batch)
        _settle_all(batch)

    def _settle_from_thread(self, calls: list[_Call]) -> None:
        self._in_thread -= len(calls)
        _settle_all(calls)

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._collect(first)
            self._run(batch)
            if stop:
                return

    def _collect(self, first: _Call) -> tuple[list[_Call], bool]:
        batch = [first]
        while len(batch) < MAX_BATCH:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                return batch, True
            batch.append(nxt)
        return batch, False

    def _run(self, batch: list[_Call]) -> None:
        self._commit(batch)
        by_loop: dict[asyncio.AbstractEventLoop, list[_Call]] = {}
        for call in batch:
            by_loop.setdefault(call.loop, []).append(call)
        for loop, calls in by_loop.items():
            # one wake-up per batch, not per call
            loop.call_soon_threadsafe(self._settle_from_thread, calls)

    def _commit(self, batch: list[_Call]) -> None:
        if not self._run_together(batch) and len(batch) > 1:
            for call in batch:
                self._run_together([call])

    def _run_together(self, batch: list[_Call]) -> bool:
        """Run ``batch`` in one transaction; False when it was rolled back because a
        call failed in the database (the calls are then to be run again one by one)."""
        try:
            with self.store.batch():
                for call in batch:
                    try:
                        call.outcome = (True, call.fn())
                    except DBAPIError as exc:
                        call.outcome = (False, exc)
                        raise _RollBack from exc
                    except Exception as exc:
                        call.outcome = (False, exc)
        except _RollBack:
            return False
        except Exception as exc:  # the commit itself failed: nothing of the batch holds
            for call in batch:
                call.outcome = (False, exc)
        return True

    def close(self) -> None:
        """Finish pending calls, then close the store."""
        if self._pending:  # only when a loop turn ended in close() itself
            self._commit_pending()
        self._queue.put(None)
        self._thread.join(timeout=30)
        self.store.close()
